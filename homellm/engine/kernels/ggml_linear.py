"""A linear layer that multiplies by raw GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K, F16, F32) in C.

The activations are quantized to int8 in blocks of 32 (as llama.cpp does), so the result is
the exact product with the stored weights up to that activation rounding (~0.3% relative).
"""
from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from homellm.engine import kernels
from homellm.engine.kernels import native
from homellm.engine.kernels.threads import kernel_threads
from homellm.model.formats.checkpoint import GGMLTensor


def blocks_tensor(t: GGMLTensor) -> Tensor:
    """The raw blocks as a uint8 torch tensor (N, bytes_per_row), without a copy.

    A read-only memory map is fine: the kernels never write to it (torch warns about
    non-writable arrays, which is silenced here).
    """
    data = np.ascontiguousarray(t.data)
    if data.dtype != np.uint8:
        data = data.view(np.uint8).reshape(t.shape[0], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


def _threads(n: int | None) -> int:
    return n if n else kernel_threads()


def _prepare(x: Tensor, out_features: int):
    """The library, x (M, K) as contiguous float32, and an empty y (M, out_features)."""
    lib = kernels.load()
    if lib is None:
        raise RuntimeError(f"homellm kernels are unavailable: {kernels.status()}")
    x = x.contiguous().float()
    return lib, x, torch.empty(x.shape[0], out_features, dtype=torch.float32)


def matmul(x: Tensor, data: Tensor, ggml_type: int, out_features: int, *, threads: int | None = None,
           path: str | None = None, hi: bool = False) -> Tensor:
    """y (M, N) f32 = x (M, K) f32 @ W^T, W given as raw blocks `data` uint8 (N, bytes_per_row).

    hi: quantize the activations to two int8 levels (value + rounded residual): ~256x less
    rounding error for ~2x the integer work (see ggml_cpu.c).
    """
    lib, x, y = _prepare(x, out_features)
    M, K = x.shape
    rc = lib.hl_matmul(x.data_ptr(), M, K, data.data_ptr(), data.stride(0), ggml_type, out_features,
                       y.data_ptr(), _threads(threads), kernels.path_id(path or os.environ.get("HOMELLM_KERNEL_PATH")),
                       int(hi))
    if rc == -2:
        raise RuntimeError(f"kernel path {path!r} is not supported by this CPU")
    if rc:
        raise RuntimeError(f"hl_matmul failed ({rc}) for ggml type {ggml_type}, K={K}")
    return y


def repack_q4(t: GGMLTensor, path: str | None = None) -> Tensor | None:
    """native.repack_q4 (Q4 blocks reordered for `path`'s packed kernels, None: this CPU's best;
    memoized per tensor, the file's pages released) as a uint8 torch tensor sharing its memory;
    None where there is no packed kernel for that path or type."""
    packed = native.repack_q4(t, path)
    return None if packed is None else torch.from_numpy(packed)


def repack(t: GGMLTensor, path: str | None = None) -> Tensor | None:
    """native.repack (Q4_0/Q4_1, Q8_0, Q5_1 and the K-quants reordered for `path`'s packed
    kernels) as a uint8 torch tensor."""
    packed = native.repack(t, path=path)
    return None if packed is None else torch.from_numpy(packed)


def matmul_packed(x: Tensor, packed: Tensor, out_features: int, *, threads: int | None = None,
                  hi: bool = False, kind: int = 0, path: str | None = None) -> Tensor:
    """y (M, N) f32 = x (M, K) f32 @ W^T for W repacked by `repack_q4` (or, kind
    native.pack_kind(type), any W by `repack`) for `path` (None: this CPU's best)."""
    lib, x, y = _prepare(x, out_features)
    M, K = x.shape
    rc = lib.hl_matmul_packed(x.data_ptr(), M, K, packed.data_ptr(), out_features, y.data_ptr(),
                              _threads(threads), int(hi), int(kind), kernels.path_id(path))
    if rc:
        raise RuntimeError(f"hl_matmul_packed failed ({rc}) for K={K}, path {path or 'auto'}")
    return y


def matmul_packed_multi(x: Tensor, packed: list[Tensor], out_features: list[int], *,
                        threads: int | None = None, hi: bool = False, glu: bool = False,
                        kinds: list[int] | None = None, path: str | None = None) -> list[Tensor]:
    """[x (M, K) @ W_i^T (M, N_i) f32 for each packed W_i], with x quantized once; kinds[i]:
    native.pack_kind of W_i's type (default: all Q4 packs); path: the one the packs were made for
    (None: this CPU's best).

    glu: two weights (gate, up) of one shape; returns [silu(x @ gate^T) * (x @ up^T)], the
    SiLU-gated product computed in the kernel's epilogue (silu(g) = g / (1 + e^-g)).
    """
    lib = kernels.load()
    if lib is None:
        raise RuntimeError(f"homellm kernels are unavailable: {kernels.status()}")
    x = x.contiguous().float()
    M, K = x.shape
    n = len(packed)
    ys = [torch.empty(M, N, dtype=torch.float32) for N in out_features[: 1 if glu else n]]
    ptrs = (ctypes.c_void_p * n)(*(p.data_ptr() for p in packed))
    outs = (ctypes.c_void_p * n)(*(ys[min(i, len(ys) - 1)].data_ptr() for i in range(n)))
    Ns = (ctypes.c_int * n)(*out_features)
    c_kinds = (ctypes.c_int * n)(*(kinds or [0] * n))
    rc = lib.hl_matmul_packed_multi(x.data_ptr(), M, K, n, ptrs, Ns, outs, _threads(threads), int(hi),
                                    int(glu), c_kinds, kernels.path_id(path))
    if rc:
        raise RuntimeError(f"hl_matmul_packed_multi failed ({rc}) for K={K}, N={list(out_features)}")
    return ys


class GGMLLinear(nn.Module):
    """y = x @ W^T (+ bias) on the GGUF blocks of W; no float copy of W is ever made.

    On the vector paths (AVX512, AVX2, NEON), Q4_0/Q4_1, Q8_0, Q5_1 and K-quant blocks are
    reordered once into that path's packed layout (exact; 3-5x faster at M=512 than the
    raw-block kernel); `pack=False` keeps the raw blocks.
    """

    def __init__(self, t: GGMLTensor, bias: Tensor | None = None, threads: int | None = None,
                 path: str | None = None, hi: bool = False, pack: bool = True):
        super().__init__()
        if t.ggml_type not in kernels.SUPPORTED_TYPES:
            raise ValueError(f"GGMLLinear: ggml type {t.type_name} is not supported "
                             f"(expected F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K)")
        self.out_features, self.in_features = t.shape
        self.ggml_type = t.ggml_type
        env_path = path or os.environ.get("HOMELLM_KERNEL_PATH") or None
        packed = repack(t, env_path) if pack else None
        self.kind = native.pack_kind(t.ggml_type) if packed is not None else -1
        self.packed = packed is not None
        # raw: (N, bytes_per_row) uint8 sharing memory with the (memory-mapped) file; packed: 1-D
        self.register_buffer("data", packed if self.packed else blocks_tensor(t), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.threads, self.path, self.hi = threads, path, hi
        self.pack_path = env_path  # the path whose kernels the pack is for

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed:
            y = matmul_packed(x2, self.data, self.out_features, threads=self.threads, hi=self.hi,
                              kind=self.kind, path=self.pack_path)
        else:
            y = matmul(x2, self.data, self.ggml_type, self.out_features, threads=self.threads,
                       path=self.path, hi=self.hi)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={self.ggml_type}, packed={self.packed}, hi={self.hi}")


class FusedProjection(nn.Module):
    """Several packed GGMLLinear layers of one input, in one kernel call: the activation is
    quantized once and the threads share out the weights' rows of all of them.

    It points to the layers' own packed weights (no copy), and the layers stay in the model:
    their names, the state dict and the FastDecoder are unchanged. glu=True takes (gate, up)
    and returns silu(gate(x)) * up(x); otherwise a tuple (layer(x) for each layer).
    """

    def __init__(self, layers: list[GGMLLinear], glu: bool = False):
        super().__init__()
        if not all(isinstance(m, GGMLLinear) and m.packed for m in layers) or \
                len({(m.in_features, m.hi, m.threads, m.pack_path) for m in layers}) != 1:
            raise ValueError("FusedProjection: expected packed GGMLLinear layers of one input "
                             "size, hi mode and thread count")
        if glu and (len(layers) != 2 or layers[0].out_features != layers[1].out_features
                    or any(m.bias is not None for m in layers)):
            raise ValueError("FusedProjection(glu=True): expected (gate, up) of one shape, no bias")
        self.layers = tuple(layers)  # a tuple: not registered again as submodules
        self.glu = glu

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        first = self.layers[0]
        lead = x.shape[:-1]
        ys = matmul_packed_multi(x.reshape(-1, x.shape[-1]), [m.data for m in self.layers],
                                 [m.out_features for m in self.layers], threads=first.threads,
                                 hi=first.hi, glu=self.glu, kinds=[m.kind for m in self.layers],
                                 path=first.pack_path)
        out = []
        for m, y in zip(self.layers, ys):
            if m.bias is not None:
                y += m.bias
            out.append(y.view(*lead, y.shape[-1]).to(x.dtype))
        return out[0] if self.glu else tuple(out)

    def extra_repr(self) -> str:
        return f"out_features={[m.out_features for m in self.layers]}, glu={self.glu}"
