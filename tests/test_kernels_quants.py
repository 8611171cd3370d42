"""The C kernels on Q5_0, Q5_1 and the K-quants (Q4_K, Q5_K, Q6_K) against gguf.quants.

The blocks: Q5_0/Q5_1 from gguf.quants.quantize; K-quants from `quantize_k` below (a plain
min/max quantizer of our own: gguf has no K-quant quantizer), checked by round trip through
gguf's dequantizer, which is the reference for every product here.

Tolerances (relative error ||y - ref|| / ||ref||), as tests/test_kernels.py states them:
- vs the float product x @ W^T (W = gguf.quants.dequantize of the blocks): < 1e-2 with one-level
  int8 activations, < 1e-4 with two levels ("hi");
- vs PyTorch applying the same int8 activation quantization: < 1e-5 (integer dots exact);
- the dequantized rows (hl_dequant_rows) equal gguf's bit for bit.
A tiny network (hidden 256: whole super-blocks) through NativeModel: |logits - ref| < 2e-3 max|ref|
against the float network on the dequantized weights, prefill vs decode < 1e-4 max|ref|.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import gguf
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.kernels import GGMLLinear, build, matmul
from homellm.engine.kernels.ggml_linear import blocks_tensor
from homellm.engine.kernels.native import NativeModel, pack_rows
from homellm.model.formats.checkpoint import GGMLTensor

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, tiny_llama_state  # noqa: E402
from test_kernels import _paths, fake_quant, reference_model, rel  # noqa: E402

Q = gguf.GGMLQuantizationType
KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
TYPES = (Q.Q5_0, Q.Q5_1) + KQUANTS
PACKED = (Q.Q5_0, Q.Q5_1) + KQUANTS  # the vector paths compute these on packed rows (native.repack)

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


# --- a reference K-quant quantizer (layouts: ggml-common.h block_q4_K / q5_K / q6_K) -------------

def _f16(x: np.ndarray) -> np.ndarray:
    """(n,) float -> (n, 2) uint8, little-endian IEEE half."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes, the inverse of ggml's get_scale_min_k4."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    out[:, 4:8] = mn[:, :4] | (mn[:, 4:] >> 4) << 6
    out[:, 8:12] = (sc[:, 4:] & 15) | (mn[:, 4:] & 15) << 4
    return out


def quantize_k(w: np.ndarray, qtype: Q) -> np.ndarray:
    """(N, K) float32, K % 256 == 0 -> (N, K / 256 * block bytes) uint8 blocks."""
    N, K = w.shape
    assert K % 256 == 0, f"K-quant rows hold whole super-blocks of 256, got {K}"
    x = w.astype(np.float32).reshape(-1, 256)  # (n super-blocks, 256)
    n = x.shape[0]
    if qtype == Q.Q6_K:
        xs = x.reshape(n, 16, 16)
        amax = np.abs(xs).max(-1)  # (n, 16)
        scale = amax / 31
        d = np.maximum(np.abs(scale).max(-1), 1e-30) / 127  # (n,)
        d = d.astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
        step = (d[:, None] * sc)[..., None]  # (n, 16, 1)
        u = (np.clip(np.round(xs / step), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
        ql = np.concatenate([(u[:, :, 0] & 15) | (u[:, :, 2] & 15) << 4,
                             (u[:, :, 1] & 15) | (u[:, :, 3] & 15) << 4], axis=-1)  # (n, 2, 64)
        qh = (u[:, :, 0] >> 4) | (u[:, :, 1] >> 4) << 2 | (u[:, :, 2] >> 4) << 4 | (u[:, :, 3] >> 4) << 6
        blocks = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16(d)], axis=1)
    else:
        bits = 4 if qtype == Q.Q4_K else 5
        top = (1 << bits) - 1
        xs = x.reshape(n, 8, 32)
        lo = np.minimum(xs.min(-1), 0)  # (n, 8): w = scale q + lo
        scale = (xs.max(-1) - lo) / top
        d = (np.maximum(scale.max(-1), 1e-30) / 63).astype(np.float16).astype(np.float32)
        dmin = (np.maximum(-lo.min(-1), 1e-30) / 63).astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
        mn = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
        step, off = (d[:, None] * sc)[..., None], (dmin[:, None] * mn)[..., None]
        u = np.clip(np.round((xs + off) / step), 0, top).astype(np.uint8).reshape(n, 4, 2, 32)
        qs = ((u[:, :, 0] & 15) | (u[:, :, 1] & 15) << 4).reshape(n, 128)
        parts = [_f16(d), _f16(dmin), _pack_scales(sc, mn)]
        if qtype == Q.Q5_K:  # bit j of qh[l]: the 5th bit of sub-block j's value l
            hb = (u.reshape(n, 8, 32) >> 4).astype(np.uint8)
            parts.append(np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
        blocks = np.concatenate(parts + [qs], axis=1)
    return np.ascontiguousarray(blocks.reshape(N, -1))


def ggml_tensor(w: torch.Tensor, qtype: Q) -> GGMLTensor:
    a = w.numpy().astype(np.float32)
    data = quantize_k(a, qtype) if qtype in KQUANTS else gguf.quants.quantize(a, qtype)
    return GGMLTensor(int(qtype), data, tuple(w.shape))


def dequantized(t: GGMLTensor) -> torch.Tensor:
    """The reference weights: gguf's own dequantizer of the blocks, (N, K) float32."""
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), Q(t.ggml_type)).reshape(t.shape))


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_reference_quantizer_round_trips_through_gguf(qtype):
    """Our K-quant blocks decode (by gguf) to the weights within the format's step size."""
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    t = ggml_tensor(w, qtype)
    assert t.data.shape == (24, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    err = rel(dequantized(t), w)
    assert err < {Q.Q4_K: 0.08, Q.Q5_K: 0.04, Q.Q6_K: 0.02}[qtype], err


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_rows_equal_gguf(qtype):
    """hl_dequant_rows (what embeddings and the F32 fallback use) == gguf.quants.dequantize, also on
    random bytes (every bit pattern of values, scales and mins)."""
    lib = build.load()
    rng = np.random.default_rng(int(qtype))
    qk, bs = gguf.GGML_QUANT_SIZES[qtype]
    N, K = 6, 768
    raw = rng.integers(0, 256, size=(N, K // qk, bs), dtype=np.uint8)
    f16_at = {Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in f16_at:  # finite scales
        raw[:, :, off:off + 2] = _f16(rng.standard_normal(N * K // qk) * 0.01).reshape(N, K // qk, 2)
    for data in (raw.reshape(N, -1), ggml_tensor(torch.randn(N, K) * 0.05, qtype).data):
        ref = gguf.quants.dequantize(data, qtype).reshape(N, K)
        out = np.empty((N, K), np.float32)
        lib.hl_dequant_rows(int(qtype), data.ctypes.data, data.strides[0], N, K, out.ctypes.data)
        np.testing.assert_array_equal(out, ref)


SHAPES = [(1, 512, 40), (3, 768, 33), (17, 256, 20)]  # (M, K, N); K-quants: whole super-blocks


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_matmul_matches_reference(qtype, path):
    """hl_matmul (M rows; M = 1 is the decode matvec's kernel call) in both activation modes."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    g = torch.Generator().manual_seed(int(qtype) * 7 + len(path))
    shapes = SHAPES + ([(5, 160, 24)] if qtype in (Q.Q5_0, Q.Q5_1) else [])  # 5 blocks: an odd tail
    for M, K, N in shapes:
        t = ggml_tensor(torch.randn(N, K, generator=g) * 0.05, qtype)
        W = dequantized(t).double()
        x = torch.randn(M, K, generator=g)
        ref = x.double() @ W.T
        y = matmul(x, blocks_tensor(t), t.ggml_type, N, path=path)
        assert rel(y, ref) < 1e-2, (M, K, N)
        assert rel(y, fake_quant(x) @ W.T) < 1e-5, (M, K, N)
        y_hi = matmul(x, blocks_tensor(t), t.ggml_type, N, path=path, hi=True)
        assert rel(y_hi, ref) < 1e-4, (M, K, N)


def test_paths_agree_and_ggml_linear():
    """Every path and thread count gives the same product; GGMLLinear takes the new types."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 512, generator=g)
    for qtype in TYPES:
        t = ggml_tensor(torch.randn(50, 512, generator=g) * 0.05, qtype)
        ys = [matmul(x, blocks_tensor(t), t.ggml_type, 50, path=p, threads=n, hi=True)
              for p in _paths() for n in (1, 2)]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)
        lin = GGMLLinear(t, hi=True)
        assert lin.packed == (qtype in PACKED and pack_rows() > 0)
        assert rel(lin(x), x @ dequantized(t).T) < 1e-4
        assert rel(lin(x), GGMLLinear(t, hi=True, pack=False)(x)) < 1e-5


# --- the whole network through the C runtime ---------------------------------------------------

TINY_K = dataclasses.replace(TINY_LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64)  # rows of 256 and 512 values


def kquant_tensors(args, qtype: Q) -> dict:
    """Every matrix (embeddings and lm_head too) in qtype; norms float."""
    return {name: ggml_tensor(w, qtype) if w.ndim == 2 else w
            for name, w in tiny_llama_state(args, seed=5).items()}


def reference_logits(args, tensors, ids) -> np.ndarray:
    state = {k: (GGMLTensor(v.ggml_type, v.data, v.shape) if isinstance(v, GGMLTensor) else v)
             for k, v in tensors.items()}
    with torch.inference_mode():
        return reference_model(args, state)(torch.tensor([ids]))[0].numpy()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_native_model_prefill_and_decode(qtype):
    args = TINY_K
    tensors = kquant_tensors(args, qtype)
    ids = torch.randint(0, args.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = reference_logits(args, tensors, ids)
    scale = np.abs(ref).max()
    for path in _paths():
        model = NativeModel(args, tensors, 32, path=path, threads=2)
        got = model.forward(ids, 0, last_only=False)
        assert np.abs(got - ref).max() < 2e-3 * scale, path
        assert (got.argmax(-1) == ref.argmax(-1)).all(), path
        step = NativeModel(args, tensors, 32, path=path, threads=2)
        stepwise = np.stack([step.forward([t], p)[0] for p, t in enumerate(ids)])
        assert np.abs(got - stepwise).max() < 1e-4 * scale, path


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_kquants_equal_the_raw_kernels(qtype):
    """Q4_K, Q5_K, Q6_K and Q5_1 packed 16 rows a register with float32 scales (Q6_K: per-16
    scales, min terms from the activation's half sums) give the raw-block kernels' products
    (the same integer dots; other float order), one- and two-level, on several shapes (a
    partial last group of rows, one activation row, many), and the float product within the
    stated bounds; the equality on random bytes too (every value, scale and min pattern)."""
    from homellm.engine.kernels import matmul_packed
    from homellm.engine.kernels.native import pack_kind, repack
    if "avx512" not in _paths():
        pytest.skip("no AVX512-VNNI: nothing is repacked")
    g = torch.Generator().manual_seed(int(qtype))
    rng = np.random.default_rng(int(qtype))
    qk, bs = gguf.GGML_QUANT_SIZES[qtype]
    for M, K, N in ((1, 256, 16), (7, 512, 40), (37, 768, 100), (130, 256, 33)):
        t = ggml_tensor(torch.randn(N, K, generator=g) * 0.05, qtype)
        raw = rng.integers(0, 256, size=(N, K // qk, bs), dtype=np.uint8)
        f16_at = {Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
        for off in f16_at:  # finite scales
            raw[:, :, off:off + 2] = _f16(rng.standard_normal(N * K // qk) * 0.01).reshape(N, K // qk, 2)
        x = torch.randn(M, K, generator=g)
        for tensor in (t, GGMLTensor(int(qtype), raw.reshape(N, -1), (N, K))):
            packed = repack(tensor, memo=False)
            assert packed is not None
            packed = torch.from_numpy(packed)
            ref = x @ dequantized(tensor).T
            for hi in (False, True):
                want = matmul(x, blocks_tensor(tensor), int(qtype), N, hi=hi, path="avx512")
                got = matmul_packed(x, packed, N, hi=hi, kind=pack_kind(int(qtype)))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
                if tensor is t:  # (random bytes: extreme mins, outside the float bounds' premise)
                    assert rel(got, ref) < (1e-4 if hi else 1e-2), (M, K, N, hi)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_native_model_packed_kquants_equal_raw(qtype):
    """The whole network on packed K-quant rows (prefill and decode) == on the raw blocks."""
    if "avx512" not in _paths():
        pytest.skip("no AVX512-VNNI: nothing is repacked")
    args = TINY_K
    tensors = kquant_tensors(args, qtype)
    ids = torch.randint(0, args.vocab_size, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    packed = NativeModel(args, tensors, 40, packed=True)
    raw = NativeModel(args, tensors, 40, packed=False)
    a, b = packed.forward(ids, 0, last_only=False), raw.forward(ids, 0, last_only=False)
    scale = np.abs(b).max()  # (float order differs per product; two layers compound it)
    assert np.abs(a - b).max() < 5e-4 * scale
    assert (a.argmax(-1) == b.argmax(-1)).all()
    np.testing.assert_allclose(packed.forward([5], 30), raw.forward([5], 30), rtol=0, atol=5e-4 * scale)


# --- the default model as Q4_K_M (llama.cpp's quantizer, from the peer venv) ---------------------

PEER = os.environ.get("HOMELLM_PEER_PYTHON", "/root/peers/llamacpp/bin/python")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(PEER), reason=f"llama.cpp's quantizer: no peer venv {PEER}")
def test_default_model_q4_k_m_runs_native_and_agrees(tmp_path, default_gguf):
    """benchmarks/make_variants.py writes Q4_K_M (Q5_0 / Q4_K / Q6_K / Q8_0 tensors); load() runs it
    on the C runtime, and its teacher-forced top-1 over 256 tokens agrees >= 99% with the float
    network on the same (dequantized) weights."""
    import json
    import subprocess
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "make_variants.py")
    res = subprocess.run([sys.executable, script, str(tmp_path), "--check", "--tokens", "256"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    q4km = json.loads(res.stdout)["variants"]["q4_k_m"]
    assert {"Q4_K", "Q6_K", "Q5_0"} <= set(q4km["tensor_types"])
    assert q4km["runtime"] == "native"
    assert q4km["top1_vs_own_float"] >= 0.99
