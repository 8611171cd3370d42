"""Sequences that share beginnings, packed as token trees: each shared beginning computed once.

The two replies of a preference pair follow the same prompt, and every conversation of a
chat template with a default system prompt starts with the same tokens. Put in a row as a
tree (a trie: one node per distinct prefix), each shared token is computed once:

    sequences   [s p 1 2]  [s p 3]  [s q 4]        row   s p 1 2 3 q 4
                                                    pos   0 1 2 3 2 1 2

A token attends to its ancestors in the tree and to itself (the `mask`, built from each
node's parent), at the position it has in its own sequence (its depth), so its hidden state
under causal attention is exactly the one it has in each sequence that holds it, and the
gradient reaching a shared token is the sum of what every sequence through it sends back, as
a batch of separate rows would sum it. (This is the tree attention that tree-based
speculative decoding uses to verify candidates, here used for training.) A padding token
attends to itself only.

Groups of sequences that belong together (a pair's two replies) go to one row; the groups are
spread over R rows, longest first, each to the least-filled row, and R is chosen to minimize

    R L (1 + L / attention_tokens)

for rows of L tokens: the tokens every projection computes (padding included), plus the
attention, whose cost per token grows with the row's length (the mask is dense) and equals
the rest of a layer's at L = attention_tokens.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TreeRows:
    tokens: Tensor  # (R, L) ids, right-padded
    positions: Tensor  # (R, L) each token's position in its sequences (its depth in the tree)
    mask: Tensor  # (R, 1, L, L) bool, True = the key (last axis) is the query's ancestor or itself
    at: Tensor  # (n, 2) (row, column) of each sequence's last token, in the sequences' order

    def to(self, device) -> "TreeRows":
        return TreeRows(*(t.to(device) for t in (self.tokens, self.positions, self.mask, self.at)))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _tree(sequences: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The trie of `sequences`, nodes in the order they are first met (a parent before its
    children): (token, depth, parent (-1 for a root)) per node, and each sequence's last node."""
    child: dict[tuple[int, int], int] = {}
    tokens, depths, parents, last = [], [], [], []
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
    return tokens, depths, parents, last


def _group_sizes(sequences: list[list[int]], groups: list[list[int]]) -> list[int]:
    """Tokens a group's own tree holds, where its sequences share beginnings pairwise with the first."""
    sizes = []
    for g in groups:
        first = sequences[g[0]]
        sizes.append(len(first) + sum(len(sequences[k]) - common_prefix(first, sequences[k]) for k in g[1:]))
    return sizes


def _spread(sizes: list[int], n_rows: int) -> list[list[int]]:
    """Group indices into n_rows rows, longest first, each to the least-filled row."""
    heap = [(0, r) for r in range(n_rows)]
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (load + sizes[i], r))
    return [r for r in rows if r]


def pack(sequences: list[list[int]], groups: list[list[int]], pad_id: int,
         attention_tokens: float) -> TreeRows:
    """`sequences` (each non-empty) as tree rows; `groups` (lists of sequence indices, covering
    each once) keep together in a row."""
    sizes = _group_sizes(sequences, groups)
    # every sequence starts with the beginning they all share: a row of k groups holds it once
    shared = min(common_prefix(sequences[0], s) for s in sequences)
    best = None
    for n_rows in range(1, len(groups) + 1):
        rows = _spread(sizes, n_rows)
        L = max(sum(sizes[i] for i in r) - (len(r) - 1) * shared for r in rows)  # (an upper bound)
        cost = len(rows) * L * (1 + L / attention_tokens)
        if best is None or cost < best[0]:
            best = (cost, rows)
    trees = [_tree([sequences[k] for i in r for k in groups[i]]) for r in best[1]]
    order = [k for r in best[1] for i in r for k in groups[i]]  # the sequences, row by row
    R, L = len(trees), max(len(t[0]) for t in trees)
    tokens = torch.full((R, L), pad_id, dtype=torch.long)
    positions = torch.zeros(R, L, dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(R, 1, 1)  # (R, L, L): padding sees itself
    at = torch.zeros(len(sequences), 2, dtype=torch.long)
    k = 0
    for r, (toks, depths, parents, last) in enumerate(trees):
        n = len(toks)
        tokens[r, :n] = torch.tensor(toks, dtype=torch.long)
        positions[r, :n] = torch.tensor(depths, dtype=torch.long)
        m = mask[r].numpy()  # (a view: rows of ancestors, filled parent first)
        for node, parent in enumerate(parents):
            if parent >= 0:
                m[node, :parent + 1] |= m[parent, :parent + 1]
        for node in last:
            at[order[k]] = torch.tensor([r, node])
            k += 1
    return TreeRows(tokens, positions, mask[:, None], at)


def attention_tokens(args, dtype: torch.dtype) -> float:
    """The row length at which a token's attention costs what its projections and MLP cost:
    2 x the layer's weights in flops per token against 4 x n_heads x head_dim per key
    (scores and values), the attention (float32, masked) taken as SLOWER[dtype] times slower
    per flop than the projections' GEMMs: on SmolLM2-135M ~1000 tokens in bfloat16, ~2000 in
    float32 (a step's time is flat within 10% from half to twice these; one row of 1400
    tokens instead of 8 rows of 230 took 1.5x as long)."""
    h, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, \
        args.num_key_value_heads * args.head_dim
    weights = 2 * h * q + 2 * h * kv + (3 if args.mlp_gated else 2) * h * args.intermediate_size
    return weights / (2 * q) / SLOWER.get(dtype, 1.5)


SLOWER = {torch.bfloat16: 3.0, torch.float32: 1.5}


def takes_tree_mask(model) -> bool:
    """Whether every layer's attention takes a mask as is: no sliding windows (whose masks
    are laid out by column, not by position in the tree)."""
    return all(layer.self_attn.window is None for layer in model.model.layers)
