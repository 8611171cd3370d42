"""Per-request LoRA (engine/lora.py, network.h): adapters in PEFT's layout applied by the C runtime
row by row, and `serve --adapter NAME=PATH` serving each as the model `base:NAME`.

References: the PyTorch network on the dequantized weights with the adapter's PEFT layers
(train/adapter.py apply_adapter), within the C runtime's tolerance (2e-3 x max|logit|, as
tests/test_native.py); a row with an adapter, or none, among rows with others equals itself
alone bit for bit; served requests for different adapters at once equal each alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.kernels.native import NativeModel, SlotCache
from homellm.engine.lora import LoraAdapter
from homellm.errors import HomellmError

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, write_tiny_gguf  # noqa: E402
from test_kernels import _paths, quantized_tensors, reference_model  # noqa: E402
from test_serve import LiveServer  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")
ARGS = dataclasses.replace(TINY_LLAMA, num_attention_heads=6, num_key_value_heads=2)
SHAPES = {"q_proj": lambda a: (a.num_attention_heads * a.head_dim, a.hidden_size),
          "k_proj": lambda a: (a.num_key_value_heads * a.head_dim, a.hidden_size),
          "v_proj": lambda a: (a.num_key_value_heads * a.head_dim, a.hidden_size),
          "o_proj": lambda a: (a.hidden_size, a.num_attention_heads * a.head_dim),
          "gate_proj": lambda a: (a.intermediate_size, a.hidden_size),
          "up_proj": lambda a: (a.intermediate_size, a.hidden_size),
          "down_proj": lambda a: (a.hidden_size, a.intermediate_size)}


def write_adapter(folder: Path, args, targets: list[str], rank: int, alpha: float, seed: int,
                  layers=None, config: dict | None = None) -> Path:
    """A PEFT LoRA folder with random A and B (B nonzero: the adapter changes the outputs)."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers if layers is not None else range(args.num_hidden_layers):
        for t in targets:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_f, in_f = SHAPES[t](args)
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = (0.3 * rng.standard_normal((rank, in_f))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.3 * rng.standard_normal((out_f, rank))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "bias": "none", **(config or {})}))
    return folder


def ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = write_adapter(root / "a", ARGS, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], 4, 8.0, 1)
    b = write_adapter(root / "b", ARGS, ["k_proj", "up_proj"], 8, 32.0, 2, layers=[1])
    return a, b


def test_the_c_runtime_equals_the_pytorch_reference_with_peft_layers(adapters):
    from homellm.train.adapter import apply_adapter
    tensors = quantized_tensors(ARGS, Q.Q8_0)
    model = NativeModel(ARGS, tensors, 64)
    prompt = ids(30, 3, ARGS.vocab_size)
    cache = SlotCache(ARGS, 1, 64)
    base = model.batch(cache, prompt, range(30), [0] * 30, [True] * 30)
    for folder in adapters:
        ref_net = reference_model(ARGS, tensors)
        apply_adapter(ref_net, folder)
        with torch.inference_mode():
            ref = ref_net(torch.tensor([prompt]))[0].numpy()
        adapter = LoraAdapter(folder, ARGS)
        got = model.batch(cache, prompt, range(30), [0] * 30, [True] * 30, [adapter] * 30)
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() < 2e-3 * scale
        assert np.abs(base - ref).max() > 2e-2 * scale  # the adapter does change the outputs


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_rows_with_two_adapters_and_none_in_one_batch_equal_each_alone(adapters, path):
    """One batch: a prompt chunk with adapter a, one with none, decode rows with adapter b (its
    gate/up not fused: the unadapted rows take the same bits through the SiLU row step)."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    model = NativeModel(ARGS, quantized_tensors(ARGS, Q.Q4_1), 64, path=path, threads=2)
    a, b = (LoraAdapter(f, ARGS) for f in adapters)
    V = ARGS.vocab_size
    prompts = [ids(20, 4, V), ids(7, 5, V), ids(12, 6, V)]
    who = [a, None, b]
    alone = []
    for p, ad in zip(prompts, who):
        cache = SlotCache(ARGS, 1, 64)
        alone.append(model.batch(cache, p, range(len(p)), [0] * len(p), [True] * len(p), [ad] * len(p)))
    cache = SlotCache(ARGS, 3, 64)
    # b's first 9 rows first (so later it sends a chunk beside the others' whole prompts)
    first = model.batch(cache, prompts[2][:9], range(9), [2] * 9, [True] * 9, [b] * 9)
    toks, pos, slots, ads = [], [], [], []
    for s, (p, ad) in enumerate(zip(prompts, who)):
        start = 9 if s == 2 else 0
        toks += p[start:]; pos += range(start, len(p)); slots += [s] * (len(p) - start)
        ads += [ad] * (len(p) - start)
    together = model.batch(cache, toks, pos, slots, [True] * len(toks), ads)
    assert np.array_equal(together[:20], alone[0]) and np.array_equal(together[20:27], alone[1])
    assert np.array_equal(np.concatenate([first, together[27:]]), alone[2])


def test_alpha_pattern_and_rslora_scales(tmp_path):
    """PEFT's alpha_pattern (a module's own alpha) and use_rslora (alpha / sqrt(r)) set the
    scale: the same as an adapter whose B carries the factor."""
    plain = write_adapter(tmp_path / "plain", ARGS, ["up_proj", "q_proj"], 4, 4.0, 11)
    pattern = write_adapter(tmp_path / "pattern", ARGS, ["up_proj", "q_proj"], 4, 4.0, 11,
                            config={"alpha_pattern": {"up_proj": 12.0}})
    rs = write_adapter(tmp_path / "rs", ARGS, ["up_proj", "q_proj"], 4, 4.0, 11, config={"use_rslora": True})
    p, q, r = (LoraAdapter(f, ARGS) for f in (plain, pattern, rs))
    for (layer, which), (a, b, scale) in p.mats.items():
        assert q.mats[(layer, which)][2] == (3.0 if which == 5 else 1.0) * scale  # up_proj: 12 / 4
        assert r.mats[(layer, which)][2] == pytest.approx(4.0 / 2.0)               # 4 / sqrt(4)
    model = NativeModel(ARGS, quantized_tensors(ARGS, Q.Q8_0), 64)
    prompt = ids(12, 12, ARGS.vocab_size)
    outs = [model.batch(SlotCache(ARGS, 1, 64), prompt, range(12), [0] * 12, [True] * 12, [x] * 12)
            for x in (p, q)]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the pattern's larger up_proj scale tells
    from safetensors.numpy import load_file, save_file  # the pattern's factor folded into B
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    for key in tensors:
        if "up_proj.lora_B" in key:
            tensors[key] = tensors[key] * 3.0
    folded_dir = write_adapter(tmp_path / "folded", ARGS, ["up_proj", "q_proj"], 4, 4.0, 11)
    save_file(tensors, str(folded_dir / "adapter_model.safetensors"))
    folded = model.batch(SlotCache(ARGS, 1, 64), prompt, range(12), [0] * 12, [True] * 12,
                         [LoraAdapter(folded_dir, ARGS)] * 12)
    np.testing.assert_allclose(folded, outs[1], rtol=0, atol=1e-4 * np.abs(outs[1]).max())


def test_bad_adapters_are_clear_errors(tmp_path, adapters):
    cases = []
    wrong = write_adapter(tmp_path / "wrong", dataclasses.replace(ARGS, hidden_size=32, num_attention_heads=2,
                                                                  num_key_value_heads=1),
                          ["q_proj"], 4, 8.0, 7)
    cases.append((wrong, "do not fit the model's 64 -> 96 projection"))
    head = tmp_path / "head"
    write_adapter(head, ARGS, ["q_proj"], 4, 8.0, 8)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(head / "adapter_model.safetensors"))
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    t["base_model.model.lm_head.lora_B.weight"] = np.zeros((256, 4), np.float32)
    save_file(t, str(head / "adapter_model.safetensors"))
    cases.append((head, "adapts lm_head"))
    cut = tmp_path / "cut"
    write_adapter(cut, ARGS, ["q_proj"], 4, 8.0, 9)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[:len(data) - 100])
    cases.append((cut, "cut short"))
    dora = write_adapter(tmp_path / "dora", ARGS, ["q_proj"], 4, 8.0, 10, config={"use_dora": True})
    cases.append((dora, "use_dora adapters are not supported"))
    cases.append((tmp_path, "not a LoRA adapter"))
    for folder, needle in cases:
        with pytest.raises(HomellmError, match=needle) as e:
            LoraAdapter(folder, ARGS)
        assert str(folder) in str(e.value)


# -- served: `serve --adapter NAME=PATH` ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapters):
    from homellm.serve import ModelRegistry, ServeConfig, create_app
    from homellm.serve.web import web_router
    from homellm.store import open_store
    root = tmp_path_factory.mktemp("served")
    path = write_tiny_gguf(root / "tiny.gguf", ARGS, "q8_0", seed=5)
    registry = ModelRegistry({"tiny": path}, ServeConfig(
        ctx=128, max_batch=4, threads=2, keep_alive_s=-1, adapters={"a": adapters[0], "b": adapters[1]}))
    registry.check_adapters()
    store = open_store(root / "web.db")
    live = LiveServer(create_app(registry, extra_routers=[web_router(store)]))
    yield live, registry, path
    live.close()
    registry.close()
    store.close()


def complete(url, model, prompt, n=10):
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "logprobs": 2,
                                                  "logit_bias": {"2": -100}},  # no EOS: 10 tokens
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_served_adapters_are_models_and_share_one_batch(served):
    live, registry, path = served
    listed = [m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]]
    assert listed == ["tiny", "tiny:a", "tiny:b"]
    web = httpx.get(live.url + "/api/models").json()
    assert [m["id"] for m in web["models"]] == listed  # the web app's model selector
    prompts = {"tiny": "once upon a time", "tiny:a": "the cat sat", "tiny:b": "hello world"}
    alone = {m: complete(live.url, m, p) for m, p in prompts.items()}
    # the same prompt through the three models: three different replies
    same = {m: complete(live.url, m, "the cat sat")["logprobs"]["tokens"] for m in prompts}
    assert len({tuple(s) for s in same.values()}) == 3
    results, barrier = {}, threading.Barrier(3)

    def go(m):
        barrier.wait()
        results[m] = complete(live.url, m, prompts[m])

    threads = [threading.Thread(target=go, args=(m,)) for m in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    engine = registry.loaded["tiny"].engine
    assert engine.stats()["steps"] > 0 and list(registry.loaded) == ["tiny"]  # one base, one engine
    # the reference: the adapter's rows through the C runtime alone
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(path, as_numpy=True)
    tok = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    model = NativeModel(ckpt.args, ckpt.tensors, 128)
    model.adapter = registry.loaded["tiny"].adapters["a"]
    seq = tok.encode(prompts["tiny:a"])
    for _ in range(10):
        logits = model.forward(seq, 0)[-1]
        logits[2] = -np.inf
        seq.append(int(logits.argmax()))
        model.reset()
    assert alone["tiny:a"]["logprobs"]["tokens"] == [tok.decode([t]) for t in seq[-10:]]


def test_an_adapter_on_a_pytorch_base_is_a_400(tmp_path, adapters, monkeypatch):
    import asyncio

    from homellm.serve import ModelRegistry, ServeConfig
    from homellm.serve.errors import APIError
    monkeypatch.setenv("HOMELLM_RUNTIME", "torch")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", ARGS, "q8_0", seed=5)
    registry = ModelRegistry({"tiny": path}, ServeConfig(ctx=64, max_batch=1, adapters={"a": adapters[0]}))
    try:
        with pytest.raises(APIError, match="runs on PyTorch") as e:
            asyncio.run(registry.acquire("tiny:a"))
        assert e.value.status == 400
    finally:
        registry.close()


def test_serve_refuses_bad_adapter_flags(tmp_path, adapters):
    from homellm.cli.serve import parse_adapters
    from homellm.serve import ModelRegistry, ServeConfig
    assert parse_adapters([f"a={adapters[0]}", f"b.2={adapters[1]}"]) == {"a": str(adapters[0]), "b.2": str(adapters[1])}
    for bad, needle in ((["a"], "expected NAME=PATH"), ([f"a/b={adapters[0]}"], "expected NAME=PATH"),
                        ([f"a={adapters[0]}", f"a={adapters[1]}"], "given twice"),
                        ([f"a={tmp_path / 'none'}"], "is not a folder")):
        with pytest.raises(HomellmError, match=needle):
            parse_adapters(bad)
    other = write_adapter(tmp_path / "other", dataclasses.replace(ARGS, num_hidden_layers=3), ["q_proj"], 4, 8.0, 3)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", ARGS, "q8_0", seed=5)
    registry = ModelRegistry({"tiny": path}, ServeConfig(adapters={"x": other}))
    with pytest.raises(HomellmError, match="the model has 2 layers"):
        registry.check_adapters()


def test_keys_and_values_are_reused_only_with_the_same_adapter(adapters):
    """A slot, a prefix-cache entry or a fork computed with one adapter never serves a request
    with another (or none): each request equals itself on a fresh engine."""
    from homellm.engine.batch import BatchConfig, BatchEngine, Request
    from homellm.engine.sampling import SamplingParams
    model = NativeModel(ARGS, quantized_tensors(ARGS, Q.Q8_0), 96)
    a = LoraAdapter(adapters[0], ARGS)
    prompt = ids(30, 13, ARGS.vocab_size)
    greedy = SamplingParams(temperature=0)

    def run(engine, adapter, p=prompt):
        return [s.token for s in engine.generate(Request(p, greedy, max_tokens=6, adapter=adapter))
                if s.token is not None]

    fresh = {}
    for who in (None, a):
        engine = BatchEngine(model, BatchConfig(max_batch=1, ctx=96))
        fresh[who] = run(engine, who)
        engine.close()
    assert fresh[None] != fresh[a]
    engine = BatchEngine(model, BatchConfig(max_batch=1, ctx=96))
    try:
        assert run(engine, a) == fresh[a]
        assert run(engine, None) == fresh[None]      # the slot held a's keys: not reused
        run(engine, None, ids(20, 14, ARGS.vocab_size))  # a's and the base's go to the prefix cache
        assert run(engine, a) == fresh[a] and run(engine, None) == fresh[None]
        assert engine.prefix.hits >= 1
    finally:
        engine.close()


def test_echo_and_embeddings_of_an_adapter_are_the_adapters(served):
    """/v1/completions echo (teacher-forced logprobs) and /v1/embeddings for base:NAME run
    through the adapter, not the base."""
    live, registry, path = served
    from homellm.engine.generate import logsumexp
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(path, as_numpy=True)
    tok = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    model = NativeModel(ckpt.args, ckpt.tensors, 128, kv_dtype="f32")
    prompt = "the quick brown fox"
    ids_ = tok.encode(prompt)

    def echo(mid):
        r = httpx.post(live.url + "/v1/completions", json={"model": mid, "prompt": prompt, "echo": True,
                                                           "max_tokens": 0, "logprobs": 0}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]

    def embed(mid):
        r = httpx.post(live.url + "/v1/embeddings", json={"model": mid, "input": prompt}, timeout=120)
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"])

    complete(live.url, "tiny", "x", 1)  # (loaded)
    model.adapter = registry.loaded["tiny"].adapters["a"]
    logits = model.forward(ids_, 0, last_only=False)
    want = [float(logits[i, ids_[i + 1]]) - logsumexp(logits[i]) for i in range(len(ids_) - 1)]
    got_a, got_base = echo("tiny:a"), echo("tiny")
    assert got_a == pytest.approx(want, abs=1e-4)
    assert np.abs(np.array(got_a) - np.array(got_base)).max() > 1e-2
    vec = model.hidden_states(ids_).mean(0)
    assert np.allclose(embed("tiny:a"), vec / np.linalg.norm(vec), atol=1e-5)
    assert np.abs(embed("tiny:a") - embed("tiny")).max() > 1e-3
