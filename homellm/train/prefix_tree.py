"""Sequences that share beginnings, packed as one token tree: each shared beginning computed once.

The two replies of a preference pair follow the same prompt, and every conversation of a
chat template with a default system prompt starts with the same tokens. Laid out as a tree
(a trie: one node per distinct prefix, a parent before its children), each shared token is
computed once, and nothing is padded:

    sequences   [s p 1 2]  [s p 3]  [s q 4]        row   s p 1 2 3 q 4
                                                    pos   0 1 2 3 2 1 2

A token attends to its ancestors in the tree and to itself, at the position it has in its
own sequence (its depth), so its hidden state under causal attention is exactly the one it
has in each sequence that holds it, and the gradient reaching a shared token is the sum of
what every sequence through it sends back, as a batch of separate rows would sum it. (This is
the tree attention that tree-based speculative decoding uses to verify candidates, here
used for training.)

The row's attention (`TreeAttention`, an AttentionLayout for model/llama.py) is computed in
blocks, one per group of sequences that belong together (a pair's two replies): the block's
own tokens as queries, their ancestors as keys, all blocks in one batched attention call.
A dense (N, N) mask would make every token's attention cost grow with the whole row's length;
a block's costs (its tokens) x (its tokens and their ancestors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TreeAttention:
    """Attention over one tree row of N tokens in nb blocks of up to mq queries and mk keys."""

    queries: Tensor  # (nb, mq) the row's column of each block's query (padding: any column)
    keys: Tensor  # (nb, mk) the row's column of each block's key (padding: any column)
    mask: Tensor  # (nb, 1, mq, mk) bool, True = the key is the query's ancestor or itself
    slot: Tensor  # (N,) where each column's output is in the blocks' (nb * mq) outputs

    def to(self, device) -> "TreeAttention":
        return TreeAttention(*(t.to(device) for t in (self.queries, self.keys, self.mask, self.slot)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None, enable_gqa: bool) -> Tensor:
        """(1, N, n_heads * hd) for q (1, n_heads, N, hd), k, v (1, n_kv_heads, N, hd)."""
        # (index_select, not x[:, index]: its backward adds a column's gradients in order, where
        # indexing's backward on CPU adds them in the order threads come, a run differing from
        # the next in the last bits)
        def blocks(x: Tensor, index: Tensor) -> Tensor:  # (1, h, N, hd) -> (nb, h, m, hd)
            return x[0].index_select(1, index.flatten()).unflatten(1, index.shape).transpose(0, 1)

        nb, mq = self.queries.shape
        y = F.scaled_dot_product_attention(blocks(q, self.queries), blocks(k, self.keys),
                                           blocks(v, self.keys), attn_mask=self.mask, scale=scale,
                                           enable_gqa=enable_gqa)  # (nb, n_heads, mq, hd)
        return y.transpose(1, 2).reshape(nb * mq, -1).index_select(0, self.slot)[None]


@dataclass
class TreeRow:
    tokens: Tensor  # (1, N) ids
    positions: Tensor  # (1, N) each token's position in its sequences (its depth in the tree)
    attention: TreeAttention
    at: Tensor  # (n, 2) (row 0, column) of each sequence's last token, in the sequences' order

    def to(self, device) -> "TreeRow":
        return TreeRow(self.tokens.to(device), self.positions.to(device), self.attention.to(device),
                       self.at.to(device))


def _tree(sequences: list[list[int]]):
    """The trie of `sequences`, nodes in the order they are first met (a parent before its
    children): (token, depth, parent (-1 for a root)) per node, each sequence's last node and
    the number of nodes once it is in."""
    child: dict[tuple[int, int], int] = {}
    tokens, depths, parents, last, sizes = [], [], [], [], []
    for seq in sequences:
        node = -1
        for depth, token in enumerate(seq):
            nxt = child.get((node, token))
            if nxt is None:
                nxt = child[(node, token)] = len(tokens)
                tokens.append(token)
                depths.append(depth)
                parents.append(node)
            node = nxt
        last.append(node)
        sizes.append(len(tokens))
    return tokens, depths, parents, last, sizes


def _block(parents: list[int], a: int, b: int) -> tuple[list[int], np.ndarray]:
    """The keys of the block of nodes a..b-1 (their ancestors before a, then the block itself)
    and its (b - a, keys) ancestor-or-self mask."""
    outside = set()
    for node in range(a, b):
        p = parents[node]
        while p >= 0 and p < a and p not in outside:
            outside.add(p)
            p = parents[p]
    keys = sorted(outside) + list(range(a, b))
    where = {node: j for j, node in enumerate(keys)}
    mask = np.zeros((b - a, len(keys)), dtype=bool)
    for i, node in enumerate(range(a, b)):
        p = parents[node]
        if p >= a:
            mask[i] = mask[p - a]
        else:  # the path to the root, outside the block
            while p >= 0:
                mask[i, where[p]] = True
                p = parents[p]
        mask[i, where[node]] = True
    return keys, mask


def pack(sequences: list[list[int]], groups: list[list[int]]) -> TreeRow:
    """`sequences` (each non-empty) as one tree row; `groups` (lists of sequence indices,
    covering each once, in order) are the attention's blocks: each group's new tokens."""
    order = [k for g in groups for k in g]
    tokens, depths, parents, last, sizes = _tree([sequences[k] for k in order])
    at = torch.zeros(len(sequences), 2, dtype=torch.long)
    at[torch.tensor(order), 1] = torch.tensor(last)
    ends = np.cumsum([len(g) for g in groups]) - 1
    ends = [sizes[e] for e in ends]  # group g's new nodes end here (and the next group's begin)
    blocks = [_block(parents, a, b) for a, b in zip([0] + ends[:-1], ends) if b > a]
    nb = len(blocks)
    mq = max(m.shape[0] for _, m in blocks)
    mk = max(len(keys) for keys, _ in blocks)
    queries = torch.zeros(nb, mq, dtype=torch.long)
    key_cols = torch.zeros(nb, mk, dtype=torch.long)
    mask = np.zeros((nb, 1, mq, mk), dtype=bool)
    mask[:, 0, :, 0] = True  # padding queries see one key (an all-False row makes NaN)
    slot = torch.zeros(len(tokens), dtype=torch.long)
    a = 0
    for i, (keys, m) in enumerate(blocks):
        n = m.shape[0]
        queries[i, :n] = torch.arange(a, a + n)
        key_cols[i, :len(keys)] = torch.tensor(keys)
        mask[i, 0, :n, :len(keys)] = m
        slot[a:a + n] = i * mq + torch.arange(n)
        a += n
    return TreeRow(torch.tensor([tokens]), torch.tensor([depths]),
                   TreeAttention(queries, key_cols, torch.from_numpy(mask), slot), at)


def takes_tree_attention(model) -> bool:
    """Whether every layer's attention can take a TreeAttention: no sliding windows (whose
    masks are laid out by column, not by position in the tree)."""
    return all(layer.self_attn.window is None for layer in model.model.layers)
