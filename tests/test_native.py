"""The C runtime (engine/kernels/native.py, hl_forward + hl_decode) against the PyTorch reference.

Tolerances: |logits - ref| < 2e-3 * max|ref| against the float network on the dequantized
weights (two-level int8 activations, "hi"; measured ~3e-4); prefill (hl_forward) against
decode one token at a time (hl_decode) < 1e-4 * max|ref| (same quantization, other float order);
float weights (F32) with no activation quantization and a float32 KV cache < 1e-4; the float16
cache (the default) stores exactly numpy's float16 of the float32 keys and values.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.generate import Engine
from homellm.engine.kernels import native
from homellm.engine.kernels.native import NativeModel
from homellm.engine.sampling import SamplingParams
from homellm.model.formats.checkpoint import GGMLTensor

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, TINY_QWEN2, write_tiny_gguf  # noqa: E402
from test_kernels import _paths, quantized_tensors, reference_model  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")
ARCHS = {"llama": TINY_LLAMA, "tied": dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True),
         "qwen2-bias": TINY_QWEN2}


def ids_for(args, n: int, seed: int) -> list[int]:
    return torch.randint(0, args.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(args, tensors, ids) -> np.ndarray:
    with torch.inference_mode():
        return reference_model(args, tensors)(torch.tensor([ids]))[0].numpy()


def decode_each(model: NativeModel, ids: list[int]) -> np.ndarray:
    return np.stack([model.forward([t], p)[0] for p, t in enumerate(ids)])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_reference_and_decode(qtype, arch):
    args = ARCHS[arch]
    tensors = quantized_tensors(args, qtype)
    ids = ids_for(args, 40, seed=1)
    ref = reference_logits(args, tensors, ids)
    model = NativeModel(args, tensors, 64)
    got = model.forward(ids, 0, last_only=False)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 2e-3 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert model.tokens == ids
    stepwise = decode_each(NativeModel(args, tensors, 64), ids)
    assert np.abs(got - stepwise).max() < 1e-4 * scale


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_each_kernel_path(path):
    """What a CPU without AVX512 (CI, laptops) runs: raw-block kernels, portable attention."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = TINY_QWEN2
    tensors = quantized_tensors(args, Q.Q4_1)
    ids = ids_for(args, 33, seed=2)
    ref = reference_logits(args, tensors, ids)
    model = NativeModel(args, tensors, 48, path=path, threads=2)
    got = np.concatenate([model.forward(ids[:20], 0, last_only=False), model.forward(ids[20:], 20, last_only=False)])
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_float_weights_are_exact():
    args = dataclasses.replace(TINY_LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0})
    tensors = quantized_tensors(args, Q.F32)
    tensors = {k: (v.dequantize() if isinstance(v, GGMLTensor) else v) for k, v in tensors.items()}
    ids = ids_for(args, 30, seed=3)
    ref = reference_logits(args, tensors, ids)
    model = NativeModel(args, {k: v.numpy() for k, v in tensors.items()}, 32, kv_dtype="f32")
    got = model.forward(ids, 0, last_only=False)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_f16_cache_holds_the_rounded_f32_cache(path):
    """Keys and values written by prefill and by decode are numpy's float16 of the float32
    ones (round to nearest even: the portable f2h and F16C agree), and the logits stay close."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = TINY_QWEN2
    tensors = quantized_tensors(args, Q.Q8_0)
    ids = ids_for(args, 30, seed=7)
    f32 = NativeModel(args, tensors, 32, kv_dtype="f32", path=path, threads=2)
    f16 = NativeModel(args, tensors, 32, path=path, threads=2)
    assert f16.kv_dtype == "f16" and f16.k[0].dtype == np.float16
    # same inputs to both caches: prefill 20 positions, then decode from the f32 model's tokens
    a = np.concatenate([f32.forward(ids[:20], 0, last_only=False), decode_each_from(f32, ids, 20)])
    b = np.concatenate([f16.forward(ids[:20], 0, last_only=False), decode_each_from(f16, ids, 20)])
    assert np.abs(a - b).max() < 2e-3 * np.abs(a).max()
    # layer 0's keys/values depend only on the ids, so they must round identically
    n = len(ids)
    np.testing.assert_array_equal(f16.k[0][:, :n], f32.k[0][:, :n].astype(np.float16))
    np.testing.assert_array_equal(f16.v[0][:, :n], f32.v[0][:, :n].astype(np.float16))


def decode_each_from(model: NativeModel, ids: list[int], start: int) -> np.ndarray:
    return np.stack([model.forward([ids[p]], p)[0] for p in range(start, len(ids))])


def test_chunks_and_last_only(monkeypatch):
    args = TINY_LLAMA
    tensors = quantized_tensors(args, Q.Q4_0)
    ids = ids_for(args, 45, seed=4)
    whole = NativeModel(args, tensors, 64).forward(ids, 0, last_only=False)
    monkeypatch.setattr(native, "MAX_CHUNK", 8)  # several hl_forward calls for one prompt
    model = NativeModel(args, tensors, 64)
    chunked = model.forward(ids, 0, last_only=False)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    last = NativeModel(args, tensors, 64).forward(ids, 0)
    assert last.shape == (1, args.vocab_size)
    np.testing.assert_allclose(last[0], whole[-1], rtol=0, atol=1e-5 * np.abs(whole).max())


def test_bad_positions_and_tokens_are_errors():
    args = TINY_LLAMA
    model = NativeModel(args, quantized_tensors(args, Q.Q8_0), 16)
    with pytest.raises(ValueError, match="KV cache holds 16"):
        model.forward(list(range(17)), 0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward([1, args.vocab_size], 0)
    with pytest.raises(ValueError, match="out of range"):
        model.decode(-1, 0)
    bad = dict(quantized_tensors(args, Q.Q8_0))
    w = bad["model.layers.0.mlp.up_proj.weight"]
    bad["model.layers.0.mlp.up_proj.weight"] = GGMLTensor(int(Q.Q2_K), w.data, w.shape)
    assert native.unsupported(bad) == ["model.layers.0.mlp.up_proj.weight (Q2_K)"]
    with pytest.raises(ValueError, match="Q2_K"):
        NativeModel(args, bad, 16)


def test_engine_greedy_equals_the_pytorch_network():
    """The engine's loop on the C runtime and on the PyTorch network (F32 weights: same numbers)."""
    args = TINY_QWEN2
    tensors = {k: (v.dequantize() if isinstance(v, GGMLTensor) else v)
               for k, v in quantized_tensors(args, Q.F32).items()}
    nat = Engine(NativeModel(args, {k: v.numpy() for k, v in tensors.items()}, 64, kv_dtype="f32"), ctx=64)
    ref = Engine(reference_model(args, tensors), ctx=64)
    prompt = ids_for(args, 12, seed=5)
    greedy = SamplingParams(temperature=0)
    a = [s.token for s in nat.generate(prompt, greedy, max_tokens=20) if s.token is not None]
    b = [s.token for s in ref.generate(prompt, greedy, max_tokens=20) if s.token is not None]
    assert a == b and len(a) == 20
    # a second prompt sharing the first's prefix prefills only the rest
    steps = list(nat.generate(prompt + a[:5], greedy, max_tokens=3))
    assert steps[-1].timings.cached_tokens == len(prompt) + 5 - 1



def test_a_long_prompt_prefills_its_chunks_before_the_last_without_logits(monkeypatch):
    """Engine.prefill cuts a prompt into chunks; those before the last ask for no logits (the C
    runtime then ends them at the last layer's attention, and runs no head): the same last
    logits and keys and values as the prompt at once, and on the PyTorch network the same
    numbers as before."""
    from homellm.engine import generate
    args = TINY_QWEN2
    tensors = quantized_tensors(args, Q.Q8_0)
    prompt = ids_for(args, 45, seed=8)
    whole = NativeModel(args, tensors, 64)
    want = whole.forward(prompt, 0)[-1]
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    model = NativeModel(args, tensors, 64)
    asked = []
    batch = model.batch
    monkeypatch.setattr(model, "batch", lambda *a, **k: asked.append(list(a[4])) or batch(*a, **k))
    logits, cached = Engine(model, ctx=64).prefill(prompt)
    assert cached == 0 and np.array_equal(logits, want)
    assert [sum(w) for w in asked] == [0, 0, 1]  # chunks of 16, 16 and 13 rows
    for l in range(args.num_hidden_layers):
        assert np.array_equal(model.k[l][:, :45], whole.k[l][:, :45])
        assert np.array_equal(model.v[l][:, :45], whole.v[l][:, :45])
    ref = Engine(reference_model(args, {k: (v.dequantize() if isinstance(v, GGMLTensor) else v)
                                        for k, v in tensors.items()}), ctx=64)
    chunked = ref.prefill(prompt)[0]
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 512)
    ref.reset()
    np.testing.assert_allclose(chunked, ref.prefill(prompt)[0], rtol=1e-4, atol=1e-4)

def test_load_picks_the_c_runtime_and_never_imports_torch(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", out_type="q8_0")
    code = ("import sys, homellm\n"
            f"m = homellm.load({str(path)!r})\n"
            "out = [s.token for s in m.generate([1, 2, 3], temperature=0, max_tokens=8)]\n"
            "print(m.runtime, 'torch' in sys.modules, out)\n")
    env = dict(os.environ, HOMELLM_HOME=str(tmp_path / "home"))
    native_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert native_run.returncode == 0, native_run.stderr
    runtime, torch_loaded, tokens = native_run.stdout.strip().split(" ", 2)
    assert (runtime, torch_loaded) == ("native", "False")
    env["HOMELLM_RUNTIME"] = "torch"  # the PyTorch network (GGMLLinear layers + fused decode)
    torch_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert torch_run.returncode == 0, torch_run.stderr
    assert torch_run.stdout.strip().split(" ", 2) == ["torch", "True", tokens]


def test_model_logits_native_vs_torch(tmp_path, monkeypatch):
    import homellm
    path = write_tiny_gguf(tmp_path / "tiny.gguf", args=TINY_QWEN2, out_type="q4_0")
    ids = ids_for(TINY_QWEN2, 30, seed=6)
    fast = homellm.load(str(path))
    assert fast.runtime == "native"
    got = fast.logits(ids)
    monkeypatch.setenv("HOMELLM_RUNTIME", "torch")
    slow = homellm.load(str(path))
    assert slow.runtime == "torch"
    ref = slow.logits(ids)
    assert got.shape == ref.shape == (30, TINY_QWEN2.vocab_size)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()
    # the cache now holds the sequence: generating from it prefills only the last token
    steps = list(fast.generate(ids, temperature=0, max_tokens=2))
    assert steps[-1].timings.cached_tokens == len(ids) - 1


def test_q5_0_runs_as_exact_q8_0():
    """Q5_0 blocks become Q8_0 blocks of the same weights (bit for bit after dequantization)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 96)).astype(np.float32)
    q5 = gguf.quants.quantize(w, Q.Q5_0)
    q8 = native.q5_0_as_q8_0(q5, rows_per_step=8)
    assert q8.shape == (37, 3 * 34)
    np.testing.assert_array_equal(gguf.quants.dequantize(q8, Q.Q8_0), gguf.quants.dequantize(q5, Q.Q5_0))
    args = TINY_LLAMA
    tensors = quantized_tensors(args, Q.Q5_0)
    ids = ids_for(args, 24, seed=8)
    ref = reference_logits(args, tensors, ids)
    got = NativeModel(args, tensors, 32).forward(ids, 0, last_only=False)
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0], ids=lambda t: t.name)
def test_packed_blocks_equal_raw_blocks(qtype):
    """The AVX512 repacked layouts (Q4: nibbles, Q5_0: nibbles and 5th bits, Q8_0: bytes + 128) compute
    what the raw-block kernels compute: the same integer dot products, other float order."""
    if "avx512" not in _paths():
        pytest.skip("no AVX512-VNNI: nothing is repacked")
    args = TINY_QWEN2
    tensors = quantized_tensors(args, qtype)
    ids = ids_for(args, 40, seed=9)
    packed = NativeModel(args, tensors, 48, packed=True)
    raw = NativeModel(args, tensors, 48, packed=False)
    a, b = packed.forward(ids, 0, last_only=False), raw.forward(ids, 0, last_only=False)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
    np.testing.assert_allclose(packed.forward([5], 40), raw.forward([5], 40), rtol=0, atol=1e-4 * np.abs(b).max())
    up = NativeModel._runtime_blocks(quantized_tensors(args, qtype)["model.layers.0.mlp.up_proj.weight"])
    assert native.repack(up) is not None


def test_q8_0_large_scales_pack_and_compute():
    """Q8_0 blocks with |d| >= 512 (-128 d beyond a half) pack too: the packs keep no min (the
    offset 128 comes off the integer dot), and their products are the dequantized weights'."""
    from homellm.engine.kernels.ggml_linear import matmul_packed
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    w[:, 0] = 127 * 600.0  # d = 600 in the first block of every row
    w[:8, 32] = -127 * 1000.0  # d = 1000 in the second block of half the rows
    blocks = gguf.quants.quantize(w, Q.Q8_0)
    t = GGMLTensor(int(Q.Q8_0), blocks, w.shape)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0))
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    want = x @ ref.T
    for path in ("avx512", "avx2"):
        if path not in kernels.cpu_features().get("paths", []):
            continue
        pk = native.repack(t, path=path, memo=False)
        assert pk is not None, path
        got = matmul_packed(x, torch.from_numpy(np.asarray(pk)), 16, hi=True, kind=native.pack_kind(int(Q.Q8_0)),
                            path=path)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_converted_blocks_are_not_mixed_up_when_memory_is_reused():
    """Q5_0 -> Q8_0 copies are packed and freed one by one (keep_raw=False, as load() does): a
    later copy at a reused address must not get an earlier one's packed weights."""
    args = dataclasses.replace(TINY_LLAMA, num_hidden_layers=4)
    tensors = quantized_tensors(args, Q.Q5_0)
    ids = ids_for(args, 20, seed=10)
    ref = reference_logits(args, tensors, ids)
    got = NativeModel(args, tensors, 32, keep_raw=False).forward(ids, 0, last_only=False)
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


def test_a_memoized_pack_keeps_its_blocks_mapped(tmp_path):
    """The memo is keyed by the blocks' address: while a pack lives it holds its blocks' mapping,
    so a file opened later (the same shapes, other weights) can never take that address and be
    handed the first file's pack (a merged model after its base gave the base's numbers)."""
    import gc

    from homellm.model.formats.gguf import read_gguf
    if "avx512" not in _paths():
        pytest.skip("no AVX512-VNNI: nothing is repacked")
    name = "model.layers.0.mlp.up_proj.weight"
    packs = []
    for seed in range(4):
        path = write_tiny_gguf(tmp_path / f"m{seed}.gguf", TINY_LLAMA, "q8_0", seed=seed)
        t = NativeModel._runtime_blocks(read_gguf(path).tensors[name])
        packs.append(native.repack(t))
        del t
        gc.collect()
    assert all(p is not None for p in packs)
    assert len({p.tobytes() for p in packs}) == 4  # four files, four packs
