"""Causal attention for prefill in C (hl_attention_causal): flash-style tiles with an online
softmax over the causal part only, GQA without expanding the kv heads.

The loader gives each Attention `attention_fn = CausalAttention()` on the CPU kernels;
llama.py calls it instead of F.scaled_dot_product_attention when no explicit mask is given.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from homellm.engine import kernels
from homellm.engine.kernels.threads import kernel_threads


def attention_causal(q: Tensor, k: Tensor, v: Tensor, start_pos: int, *, scale: float | None = None,
                     threads: int | None = None, path: str | None = None) -> Tensor:
    """y (B, T, n_heads * head_dim) f32 for q (B, n_heads, T, head_dim) at positions
    start_pos.. start_pos+T-1 and k, v (B, n_kv_heads, S >= start_pos + T, head_dim): query t sees
    keys 0 .. start_pos + t. Any strides with a contiguous head_dim (no copies for the layouts
    of llama.py: q a transposed (B, T, n_heads, head_dim), k and v a KV cache slice)."""
    lib = kernels.load()
    if lib is None:
        raise RuntimeError(f"homellm kernels are unavailable: {kernels.status()}")
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    if k.shape[2] < start_pos + T or v.shape[:3] != k.shape[:3] or k.shape[3] != hd or nh % nkv:
        raise ValueError(f"attention_causal: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"start_pos {start_pos}: expected k, v (B, n_kv, >= start_pos + T, head_dim)")
    q, k, v = (t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()
               for t in (q, k, v))
    y = torch.empty(B, T, nh * hd, dtype=torch.float32)
    scale = hd ** -0.5 if scale is None else scale
    pid = kernels.path_id(path or os.environ.get("HOMELLM_KERNEL_PATH"))
    for b in range(B):
        rc = lib.hl_attention_causal(q[b].data_ptr(), q.stride(2), q.stride(1),
                                     k[b].data_ptr(), k.stride(2), k.stride(1),
                                     v[b].data_ptr(), v.stride(2), v.stride(1),
                                     T, nh, nkv, hd, start_pos, scale, y[b].data_ptr(),
                                     threads or kernel_threads(), pid)
        if rc == -2:
            raise RuntimeError(f"kernel path {path!r} is not supported by this CPU")
        if rc:
            raise RuntimeError(f"hl_attention_causal failed ({rc})")
    return y


class CausalAttention:
    """llama.Attention's `attention_fn`: (q, k, v) -> (B, T, n_heads * head_dim), the T queries
    being the last T of the S key positions (a cache slice: S = start_pos + T; no cache: S = T)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention_causal(q, k, v, k.shape[2] - q.shape[2])

    def __repr__(self) -> str:
        return "CausalAttention(hl_attention_causal)"
