"""The KV cache: owned by the engine, passed into the model's forward.

One preallocated buffer per layer, (B, n_kv_heads, max_seq_len, head_dim) for keys and for
values. Allocated with torch.empty, so pages that no position has reached cost no memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from homellm.engine.tokens import common_prefix
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
        return common_prefix(self.tokens, ids)


class BatchKVCache:
    """Slots of independent sequences, each with its own length, for continuous batching.

    One preallocated buffer per layer, (slots, n_kv_heads, max_seq_len, head_dim) for keys and
    for values (torch.empty: untouched pages cost nothing). `tokens[s]` are the ids whose keys
    and values slot s holds. `slot(s)` is a batch-1 cache over one slot (prefill at an int
    start_pos); `rows(slots)` is a cache for a batch whose row b is slot slots[b], at its own
    position (decode steps with a (B,) start_pos).
    """

    def __init__(self, args: ModelArgs, max_seq_len: int, slots: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len
        self.n_slots = slots
        shape = (slots, args.num_key_value_heads, max_seq_len, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values that one position of one slot takes."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * k.shape[3] * k.element_size()

    def slot(self, s: int) -> "SlotView":
        return SlotView(self, s)

    def rows(self, slots: list[int]) -> "RowsView":
        return RowsView(self, slots)

    def common_prefix(self, s: int, ids: list[int]) -> int:
        """How many leading ids slot s already holds."""
        return common_prefix(self.tokens[s], ids)


class SlotView:
    """One slot of a BatchKVCache as a batch-1 cache (int start_pos)."""

    def __init__(self, cache: BatchKVCache, s: int):
        self.cache, self.s = cache, s

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (1, n_kv_heads, T, head_dim) at start_pos; return (1, n_kv, start_pos+T, hd)."""
        end = start_pos + k.shape[2]
        if end > self.cache.max_seq_len:
            raise ValueError(f"KV cache holds {self.cache.max_seq_len} positions; asked for {end}")
        s = self.s
        self.cache.k[layer][s:s + 1, :, start_pos:end] = k
        self.cache.v[layer][s:s + 1, :, start_pos:end] = v
        return self.cache.k[layer][s:s + 1, :, :end], self.cache.v[layer][s:s + 1, :, :end]


class RowsView:
    """Several slots as the rows of one batch, each at its own position ((B,) start_pos)."""

    def __init__(self, cache: BatchKVCache, slots: list[int]):
        self.cache, self.slots = cache, slots

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: Tensor
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Store row b of k, v (B, n_kv_heads, T, head_dim) in slot slots[b] at start_pos[b];
        return per row the slot's keys and values so far, (1, n_kv, start_pos[b] + T, hd)."""
        T = k.shape[2]
        ends = (start_pos + T).tolist()
        if max(ends) > self.cache.max_seq_len:
            raise ValueError(f"KV cache holds {self.cache.max_seq_len} positions; asked for {max(ends)}")
        K, V = self.cache.k[layer], self.cache.v[layer]
        # row by row: small copies that never start a thread team (an indexed write for the
        # whole batch does, and costs ~50x more when the CPU is shared)
        for b, (s, end) in enumerate(zip(self.slots, ends)):
            K[s, :, end - T:end] = k[b]
            V[s, :, end - T:end] = v[b]
        return ([K[s:s + 1, :, :end] for s, end in zip(self.slots, ends)],
                [V[s:s + 1, :, :end] for s, end in zip(self.slots, ends)])
