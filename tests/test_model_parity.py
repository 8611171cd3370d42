"""Our Llama against transformers on tiny random configs, through the production loader."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from homellm.engine.kv_cache import KVCache  # noqa: E402
from homellm.engine.loader import build_model  # noqa: E402
from homellm.model.formats.hf import read_hf, write_hf  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0)

CONFIGS = {
    "gqa-untied": dict(BASE, tie_word_embeddings=False),
    "mha-tied": dict(BASE, num_key_value_heads=4, tie_word_embeddings=True),
    "qkv-bias": dict(BASE, attention_bias=True, tie_word_embeddings=False),
    "rope-linear": dict(BASE, rope_scaling={"rope_type": "linear", "factor": 2.0},
                        tie_word_embeddings=False),
    "rope-llama3": dict(BASE, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, tie_word_embeddings=True),
    "head-dim": dict(BASE, head_dim=32, tie_word_embeddings=False),
}


def make_reference(config: dict, folder, seed=0):
    """A random transformers LlamaForCausalLM (qkv-bias via Qwen2 when asked), saved to folder."""
    torch.manual_seed(seed)
    if config.get("attention_bias"):
        cfg = transformers.Qwen2Config(**{k: v for k, v in config.items() if k != "attention_bias"},
                                       use_sliding_window=False)
        ref = transformers.Qwen2ForCausalLM(cfg)
    else:
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():  # biases and norms are zero/one at init: randomize them too
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.eval().save_pretrained(folder)
    return ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref = make_reference(CONFIGS[name], tmp_path)
    ours = build_model(read_hf(tmp_path), device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 37))
    with torch.no_grad():
        expected = ref(tokens).logits
    got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cached_decode_equals_full_forward(tmp_path):
    make_reference(CONFIGS["gqa-untied"], tmp_path)
    model = build_model(read_hf(tmp_path), device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 40))
    full = model(tokens)
    cache = KVCache(model.args, 64)
    parts = [model(tokens[:, :17], 0, cache)]  # a prompt, then a chunk, then one at a time
    parts.append(model(tokens[:, 17:30], 17, cache))
    for t in range(30, 40):
        parts.append(model(tokens[:, t:t + 1], t, cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_hf_write_round_trip_loads_in_transformers(tmp_path):
    ref = make_reference(CONFIGS["rope-llama3"], tmp_path / "src")
    ckpt = read_hf(tmp_path / "src")
    write_hf(tmp_path / "out", ckpt.args, ckpt.tensors, dtype=torch.float32)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, BASE["vocab_size"], (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ref(tokens).logits, rtol=1e-5, atol=1e-5)
    ours = build_model(read_hf(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(ours(tokens), ref(tokens).logits, rtol=1e-4, atol=1e-4)


def test_hf_write_leaves_nothing_on_failure(tmp_path):
    make_reference(CONFIGS["gqa-untied"], tmp_path / "src")
    ckpt = read_hf(tmp_path / "src")
    tensors = dict(ckpt.tensors, bad=object())  # not a tensor: fails midway
    with pytest.raises(AttributeError):
        write_hf(tmp_path / "out", ckpt.args, tensors)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_fast_decoder_on_a_float_hf_model_equals_the_pytorch_path(tmp_path):
    from homellm.engine import kernels
    from homellm.engine.generate import Engine
    from homellm.engine.sampling import SamplingParams
    if not kernels.available():
        pytest.skip(f"no C kernels here: {kernels.status()}")
    make_reference(CONFIGS["qkv-bias"], tmp_path)
    ckpt = read_hf(tmp_path)
    model = build_model(ckpt, device="cpu", dtype=torch.float32)
    fast, plain = Engine(model, ctx=64), Engine(model, ctx=64)
    assert fast.attach_fast_decoder(ckpt)
    prompt = [5, 17, 33, 2, 90, 11]
    greedy = SamplingParams(temperature=0)
    steps = [list(e.generate(prompt, greedy, max_tokens=20, top_logprobs=1)) for e in (fast, plain)]
    assert [s.token for s in steps[0]] == [s.token for s in steps[1]]
    for a, b in zip(steps[0][:-1], steps[1][:-1]):  # float weights: no activation rounding
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
