"""The AVX2 paths (AVX2 with vpmaddubsw, AVX2 with AVX-VNNI's vpdpbusd) against the AVX512 one.

`HOMELLM_KERNEL_PATH=avx2` (or path="avx2") forces them on a CPU that has more, so they run
here. Bounds, as ggml_cpu.c and kernels_avx2.h state them:
- every packed product (hl_matmul_packed / _multi, the gated gate/up epilogue too), on every
  packable type, one- and two-level activations: AVX512's bits exactly (the same integer dots
  and, per output, the same float operations in the same order: 8 rows a group instead of 16);
- the whole network (prefill and decode): |logits - AVX512's| < 5e-4 max|logits| and the same
  argmax; only the attention differs (8-lane softmax sums and P @ V in another order).
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
from homellm.engine.kernels import GGMLLinear
from homellm.engine.kernels.ggml_linear import matmul_packed, matmul_packed_multi, repack
from homellm.engine.kernels.native import NativeModel, pack_kind, pack_rows

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA  # noqa: E402
from test_kernels_quants import _f16, ggml_tensor, kquant_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
PACKABLE = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
F16_AT = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
          Q.Q6_K: (208,)}  # where the blocks keep their f16 scales

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


def paths() -> list[str]:
    return kernels.cpu_features().get("paths", [])


def need(*names):
    missing = [p for p in names if p not in paths()]
    if missing:
        pytest.skip(f"this CPU runs no {', '.join(missing)} path")


def random_blocks(qtype: Q, N: int, K: int, rng) -> np.ndarray:
    """Random bytes as blocks of qtype (every value, scale and min pattern), finite f16 scales."""
    qk, bs = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N, K // qk, bs), dtype=np.uint8)
    for off in F16_AT[qtype]:
        raw[:, :, off:off + 2] = _f16(rng.standard_normal(N * K // qk) * 0.01).reshape(N, K // qk, 2)
    return raw.reshape(N, -1)


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_avx2_packed_products_are_avx512s_bits(qtype):
    """8-row packs on the AVX2 and AVX-VNNI kernels == 16-row packs on AVX512, bit for bit: one
    and many activation rows (partial tiles), a partial last group, both activation levels,
    quantized weights and random bytes, several weights at once and the SiLU-gated pair."""
    from homellm.model.formats.checkpoint import GGMLTensor
    need("avx512", "avx2", "avxvnni")
    assert pack_rows("avx512") == 16 and pack_rows("avx2") == pack_rows("avxvnni") == 8
    g = torch.Generator().manual_seed(int(qtype) + 100)
    rng = np.random.default_rng(int(qtype))
    K = 512
    kind = pack_kind(int(qtype))
    for M, N in ((1, 40), (7, 24), (37, 100), (130, 9)):
        ts = [ggml_tensor(torch.randn(N, K, generator=g) * 0.05, qtype),
              GGMLTensor(int(qtype), random_blocks(qtype, N, K, rng), (N, K))]
        x = torch.randn(M, K, generator=g) * 3
        for hi in (False, True):
            want = [matmul_packed(x, repack(t, "avx512"), N, hi=hi, kind=kind, path="avx512") for t in ts]
            want_glu = matmul_packed_multi(x, [repack(t, "avx512") for t in ts], [N, N], hi=hi, glu=True,
                                           kinds=[kind] * 2, path="avx512")[0]
            for p in ("avx2", "avxvnni"):
                packs = [repack(t, p) for t in ts]
                for pk, w in zip(packs, want):
                    assert torch.equal(matmul_packed(x, pk, N, hi=hi, kind=kind, path=p), w), (p, M, N, hi)
                both = matmul_packed_multi(x, packs, [N, N], hi=hi, kinds=[kind] * 2, path=p)
                assert all(torch.equal(a, b) for a, b in zip(both, want)), (p, M, N, hi)
                glu = matmul_packed_multi(x, packs, [N, N], hi=hi, glu=True, kinds=[kind] * 2, path=p)[0]
                assert torch.equal(glu, want_glu), (p, M, N, hi)


def test_avx2_packs_are_refused_by_other_paths():
    """A pack for 8 rows is not the 16-row one: the runtime keys each pack by its path's rows."""
    need("avx512", "avx2")
    t = ggml_tensor(torch.randn(16, 256) * 0.05, Q.Q4_1)
    assert repack(t, "scalar") is None
    a, b = repack(t, "avx2"), repack(t, "avx512")
    assert a.numel() == b.numel() and not torch.equal(a, b)  # (16 rows: the same bytes, reordered)


def test_forced_avx2_path_packs_ggml_linear(monkeypatch):
    """HOMELLM_KERNEL_PATH=avx2: GGMLLinear packs for (and computes on) the AVX2 kernels."""
    need("avx2")
    monkeypatch.setenv("HOMELLM_KERNEL_PATH", "avx2")
    g = torch.Generator().manual_seed(4)
    t = ggml_tensor(torch.randn(40, 256, generator=g) * 0.05, Q.Q4_K)
    lin = GGMLLinear(t, hi=True)
    assert lin.packed and lin.pack_path == "avx2"
    x = torch.randn(5, 256, generator=g)
    assert torch.equal(lin(x), matmul_packed(x, repack(t, "avx2"), 40, hi=True, kind=pack_kind(int(Q.Q4_K)),
                                             path="avx2"))


TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
TINY_K = dataclasses.replace(TINY_LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_native_model_avx2_equals_avx512_within_bounds(qtype):
    """The whole network on the AVX2 paths' 8-row packs, prefill and decode, within the module's
    bound of AVX512's logits (the same argmax)."""
    need("avx512", "avx2", "avxvnni")
    tensors = kquant_tensors(TINY_K, qtype)
    ids = torch.randint(0, TINY_K.vocab_size, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = NativeModel(TINY_K, tensors, 40, path="avx512", threads=2)
    want = ref.forward(ids, 0, last_only=False)
    want_step = ref.forward([5], 30)
    scale = np.abs(want).max()
    for p in ("avx2", "avxvnni"):
        m = NativeModel(TINY_K, tensors, 40, path=p, threads=2)
        assert m.pack_rows == 8
        got = m.forward(ids, 0, last_only=False)
        assert np.abs(got - want).max() < 5e-4 * scale, p
        assert (got.argmax(-1) == want.argmax(-1)).all(), p
        np.testing.assert_allclose(m.forward([5], 30), want_step, rtol=0, atol=5e-4 * scale)


def test_kernel_path_setting_takes_every_path_this_cpu_runs(monkeypatch):
    """HOMELLM_KERNEL_PATH: any path of cpu_features()["paths"] (avxvnni on an AVX512-VNNI CPU
    too); another one, or a name that is none, is a clear error naming what this CPU runs."""
    from homellm.api import kernel_path_setting
    from homellm.errors import HomellmError
    runs = paths()
    for p in runs:
        monkeypatch.setenv("HOMELLM_KERNEL_PATH", p)
        assert kernel_path_setting() == (None if p == "auto" else p)
    other = [p for p in kernels.PATHS if p not in runs]
    for p in other[:1]:
        monkeypatch.setenv("HOMELLM_KERNEL_PATH", p)
        with pytest.raises(HomellmError, match=f"this CPU runs the {', '.join(runs)} kernels"):
            kernel_path_setting()
    monkeypatch.setenv("HOMELLM_KERNEL_PATH", "sse9")
    with pytest.raises(HomellmError, match="expected one of scalar, avx2, avx512, avxvnni, neon, i8mm or auto"):
        kernel_path_setting()
