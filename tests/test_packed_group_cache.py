"""AVX512's packed prefill kernels unpack a group of 16 weight rows (nibble kinds: Q4_0, Q4_1,
Q5_0, Q4_K) once for all the activation tiles of a call (u512_group in ggml_cpu.c), kept per
thread by the group's address. Bounds:
- the unpacked group gives the bits of the block-by-block unpacking: every row of a many-row
  product (tiles of 8, 4, 2 and 1 rows) == that row alone (one row never keeps a group);
- a later call on other weights at the same address computes with the new weights (each call
  starts afresh): nothing of an earlier call's weights survives into the next.
"""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
import pytest
import torch

from homellm.engine import kernels
from homellm.engine.kernels.ggml_linear import matmul_packed, matmul_packed_multi, repack
from homellm.engine.kernels.native import pack_kind

sys.path.insert(0, os.path.dirname(__file__))
from test_kernel_paths import need, random_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType
NIBBLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K)

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


def _tensor(qtype, N, K, rng):
    from homellm.model.formats.checkpoint import GGMLTensor
    return GGMLTensor(int(qtype), random_blocks(qtype, N, K, rng), (N, K))


@pytest.mark.parametrize("qtype", NIBBLE, ids=lambda t: t.name)
def test_many_rows_equal_each_row_alone(qtype):
    need("avx512")
    rng = np.random.default_rng(int(qtype) + 7)
    K, N, M = 512, 40, 15  # tiles of 8 then 4, 2 and 1 rows; a partial last group
    pk = repack(_tensor(qtype, N, K, rng), "avx512")
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32) * 3)
    kind = pack_kind(int(qtype))
    for hi in (False, True):
        y = matmul_packed(x, pk, N, hi=hi, kind=kind, path="avx512", threads=1)
        for m in range(M):
            alone = matmul_packed(x[m:m + 1], pk, N, hi=hi, kind=kind, path="avx512", threads=1)
            assert torch.equal(y[m:m + 1], alone), (qtype.name, hi, m)


@pytest.mark.parametrize("qtype", NIBBLE, ids=lambda t: t.name)
def test_new_weights_at_the_same_address_are_used(qtype):
    need("avx512")
    rng = np.random.default_rng(int(qtype))
    K, N, M = 512, 24, 37  # two groups: both stay kept through the call
    a, b = (repack(_tensor(qtype, N, K, rng), "avx512") for _ in range(2))
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    kind = pack_kind(int(qtype))
    for hi in (False, True):
        want_a = matmul_packed(x, a, N, hi=hi, kind=kind, path="avx512", threads=1)
        want_b = matmul_packed(x, b, N, hi=hi, kind=kind, path="avx512", threads=1)
        assert not torch.equal(want_a, want_b)
        buf = a.clone()
        assert torch.equal(matmul_packed(x, buf, N, hi=hi, kind=kind, path="avx512", threads=1), want_a)
        buf.copy_(b)  # the same address, other weights
        assert torch.equal(matmul_packed(x, buf, N, hi=hi, kind=kind, path="avx512", threads=1), want_b), hi
        # and through the gated pair (gate and up kept side by side)
        gate, up = a.clone(), b.clone()
        first = matmul_packed_multi(x, [gate, up], [N, N], hi=hi, glu=True, kinds=[kind] * 2, path="avx512",
                                    threads=1)[0]
        gate.copy_(b); up.copy_(a)
        swapped = matmul_packed_multi(x, [gate, up], [N, N], hi=hi, glu=True, kinds=[kind] * 2, path="avx512",
                                      threads=1)[0]
        want = matmul_packed_multi(x, [b, a], [N, N], hi=hi, glu=True, kinds=[kind] * 2, path="avx512",
                                   threads=1)[0]
        assert torch.equal(swapped, want) and not torch.equal(first, want), hi
