"""Preference pairs packed as token trees (train/prefix_tree.py): a pair's prompt and the start
every conversation shares computed once, the replies on top, several pairs in a row. The
reward model's rewards, loss and every trained parameter's gradient must be those of the plain
path (one right-padded row a reply), on a random tiny Llama with random adapters, in float32."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from rl_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

from homellm.train import reward  # noqa: E402
from homellm.train.batches import collate, dpo_item  # noqa: E402
from homellm.train.config import LoraConfig  # noqa: E402
from homellm.train.prefix_tree import common_prefix, pack  # noqa: E402

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

PAIRS = [  # prompts and replies of different lengths; some replies share their first words
    ("Tell me about the sea.", "the sea is blue thanks", "the sea is very green and cold"),
    ("Is snow white?", "yes", "no"),
    ("Describe a tree.", "a tree is green and the sky is blue and a bird is red thanks",
     "a tree"),
    ("Say hello.", "hello hello", "hello hello hello"),  # one reply is the other's start
    ("What color is the sky? Tell me about the sun and the moon and a star.",
     "blue", "the sky is black or maybe white but the sun is yellow"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from homellm.train.base import load_base
    from homellm.train.fused import fuse_lora
    from homellm.train.lora import apply_lora, lora_parameters
    root = tmp_path_factory.mktemp("packed")
    tok = tiny_tokenizer(root / "tok")
    _, tokenizer, model = load_base(str(tiny_model(root / "m", tok, layers=3)), "none", "cpu")
    apply_lora(model, LoraConfig(rank=4, alpha=8), seed=0)
    fuse_lora(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: the adapters change the model, their A get gradients
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    rm = reward.RewardModel(model, seed=3)
    items = [dpo_item(tokenizer, {"prompt": [U(p)], "chosen": [A(c)], "rejected": [A(r)]}, 64)
             for p, c, r in PAIRS]
    assert all(items)
    params = lora_parameters(model) + [rm.score.weight]
    return rm, items, params


def loss_and_grads(rm, params, rewards):
    for p in params:
        p.grad = None
    loss = -F.logsigmoid(rewards[0::2] - rewards[1::2]).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def plain_rewards(rm, items):
    tokens, _ = collate(items, list(range(len(items))), 0)
    lengths = [len(ids) for item in items for ids, _ in item.rows]
    at = torch.tensor([(b, n - 1) for b, n in enumerate(lengths)])
    return rm(tokens, at)


@pytest.mark.parametrize("attention_tokens", [10 ** 9, 1, 60], ids=["one-row", "short-rows", "cost"])
def test_tree_rows_give_the_rewards_loss_and_gradients_of_separate_rows(setup, attention_tokens):
    rm, items, params = setup
    rm.train()
    plain = plain_rewards(rm, items)
    plain_loss, plain_grads = loss_and_grads(rm, params, plain)
    rows = [ids for it in items for ids, _ in it.rows]
    tree = pack(rows, [[2 * j, 2 * j + 1] for j in range(len(items))], 0, attention_tokens)
    R, L = tree.tokens.shape
    if attention_tokens == 10 ** 9:
        assert R == 1  # every pair in one row: the template's start once
        shared = min(common_prefix(rows[0], r) for r in rows)
        assert shared > 3 and L == sum(len(r) for r in rows) - sum(
            common_prefix(rows[2 * j], rows[2 * j + 1]) for j in range(len(items))) - (len(items) - 1) * shared
    if attention_tokens == 1:
        assert 1 < R < len(items)  # rows as long as the longest pair, short pairs sharing one
    assert R * L < sum(len(r) for r in rows)
    rewards = rm(tree.tokens, tree.at, tree.positions, tree.mask)
    torch.testing.assert_close(rewards, plain, rtol=1e-5, atol=1e-5)
    loss, grads = loss_and_grads(rm, params, rewards)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    rm.checkpointing = True  # --grad-checkpointing: each layer again in the backward, same mask
    try:
        _, again = loss_and_grads(rm, params, rm(tree.tokens, tree.at, tree.positions, tree.mask))
    finally:
        rm.checkpointing = False
    for g, ref in zip(again, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_a_tree_row_holds_each_distinct_beginning_once():
    """Three sequences as in prefix_tree.py's picture: tokens, positions, ancestors, last tokens."""
    s, p, q = 7, 8, 9
    tree = pack([[s, p, 1, 2], [s, p, 3], [s, q, 4], [s, p]], [[0, 1, 2, 3]], -1, 10 ** 9)
    assert tree.tokens.tolist() == [[s, p, 1, 2, 3, q, 4]]
    assert tree.positions.tolist() == [[0, 1, 2, 3, 2, 1, 2]]
    sees = [[j for j in range(7) if tree.mask[0, 0, i, j]] for i in range(7)]
    assert sees == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 5], [0, 5, 6]]
    assert tree.at.tolist() == [[0, 3], [0, 4], [0, 6], [0, 1]]  # a sequence may end inside another
    padded = pack([[1, 2, 3], [4], [5]], [[0], [1], [2]], -1, 1)  # short rows: padding sees itself
    assert padded.tokens.shape == (2, 3) and padded.tokens[1].tolist() == [4, 5, -1]
    assert padded.mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert padded.at.tolist() == [[0, 2], [1, 0], [1, 1]]
