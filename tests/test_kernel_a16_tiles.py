"""P_AVX2's int16 tiles (TM_A16, kernels_avx2_tile.h) row count by row count: a tile's 8 rows at
once, a partial one's 4 and 1 at a time (a16_body), each against the weights widened with a row
a lane (a16_widen: Q4_0's and Q5_0's offsets taken off the weights themselves) and activations
quantized straight into a = 256 q + q2 (quantize_a16_256). Every one of those must give AVX512's
bits: the same integer dots, the same float operations per output."""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.kernels.ggml_linear import matmul_packed, repack
from homellm.engine.kernels.native import pack_kind
from homellm.model.formats.checkpoint import GGMLTensor

sys.path.insert(0, os.path.dirname(__file__))
from test_kernel_paths import PACKABLE, need, random_blocks  # noqa: E402
from test_kernels_quants import ggml_tensor  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_avx2_int16_tiles_every_row_count_is_avx512s_bits(qtype):
    need("avx512", "avx2")
    rng = np.random.default_rng(int(qtype) + 11)
    g = torch.Generator().manual_seed(int(qtype) + 11)
    qk = gguf.GGML_QUANT_SIZES[qtype][0]
    K = 768 if qk == 256 else 576  # (the default model's 576: 18 blocks, no power of two)
    N = 20  # groups of 8, 8 and a partial 4
    kind = pack_kind(int(qtype))
    weights = [ggml_tensor(torch.randn(N, K, generator=g) * 0.05, qtype),
               GGMLTensor(int(qtype), random_blocks(qtype, N, K, rng), (N, K))]  # every byte pattern
    for M in range(2, 18):  # one tile of M rows (2..8), 8 + 1..8, then 8 + 8 + 1
        x = torch.randn(M, K, generator=g) * 3
        x[:, ::7] *= 40  # heavy tails: blocks whose amax is far above the rest (|a| up to 32639)
        x[0, :32] = 0  # an all-zero block (d = 0)
        for t in weights:
            want = matmul_packed(x, repack(t, "avx512"), N, hi=True, kind=kind, path="avx512")
            got = matmul_packed(x, repack(t, "avx2"), N, threads=1, hi=True, kind=kind, path="avx2")
            assert torch.equal(got, want), (qtype.name, M)
