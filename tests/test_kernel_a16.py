"""P_AVX2's int16 tiles (TM_A16, kernels_avx2_tile.h): two activation levels as one int16
a = 256 q + q2, the weights of a group widened to int16 once and kept per thread for the
group's other tiles. The bits against AVX512 are tests/test_kernel_paths.py's; here the kept
groups themselves: one made in an earlier call is never used for weights that changed since,
at the same address (a model freed and another loaded where it was)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.kernels.ggml_linear import matmul_packed, matmul_packed_multi, repack
from homellm.engine.kernels.native import pack_kind
from homellm.model.formats.checkpoint import GGMLTensor

from test_kernel_paths import need, random_blocks

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


@pytest.mark.parametrize("qtype", (Q.Q5_0, Q.Q8_0, Q.Q6_K), ids=lambda t: t.name)
def test_avx2_int16_tiles_never_reuse_weights_that_changed(qtype):
    need("avx512", "avx2")
    rng = np.random.default_rng(7)
    N, K, M = 16, 512, 20  # (two groups of 8 rows: both kept)
    kind = pack_kind(int(qtype))
    a, b = (GGMLTensor(int(qtype), random_blocks(qtype, N, K, rng), (N, K)) for _ in range(2))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)) * 2
    want_a = matmul_packed(x, repack(a, "avx512"), N, hi=True, kind=kind, path="avx512")
    want_b = matmul_packed(x, repack(b, "avx512"), N, hi=True, kind=kind, path="avx512")
    pk, pk_b = repack(a, "avx2").clone(), repack(b, "avx2")  # (a copy: repack keeps its packs)
    got_a = matmul_packed(x, pk, N, threads=1, hi=True, kind=kind, path="avx2")
    pk.copy_(pk_b)  # other weights at the same address
    got_b = matmul_packed(x, pk, N, threads=1, hi=True, kind=kind, path="avx2")
    assert torch.equal(got_a, want_a) and not torch.equal(want_a, want_b)
    assert torch.equal(got_b, want_b)
    # gate and up of one call take turns in the kept groups; the gated product is AVX512's
    glu = matmul_packed_multi(x, [pk_b, repack(a, "avx2")], [N, N], threads=1, hi=True, glu=True,
                              kinds=[kind] * 2, path="avx2")[0]
    want_glu = matmul_packed_multi(x, [repack(b, "avx512"), repack(a, "avx512")], [N, N], hi=True, glu=True,
                                   kinds=[kind] * 2, path="avx512")[0]
    assert torch.equal(glu, want_glu)
