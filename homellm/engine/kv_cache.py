"""The KV cache: owned by the engine, passed into the model's forward.

One preallocated buffer per layer, (B, n_kv_heads, max_seq_len, head_dim) for keys and for
values. Allocated with torch.empty, so pages that no position has reached cost no memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from homellm.model.config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, max_seq_len: int, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len
        shape = (batch_size, args.num_key_value_heads, max_seq_len, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.tokens: list[int] = []  # the ids whose keys and values are stored (batch 1)

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos; return (B, n_kv, start_pos+T, hd)."""
        end = start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked for {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading ids already have their keys and values here."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n
