"""The reward model's packed pairs (train/reward.py pack_pairs): the prompt computed once per
pair, the two replies on top of it, several pairs side by side in a row. Rewards, loss and
every trained parameter's gradient must be those of the plain path (one right-padded row a
reply), on a random tiny Llama with random adapters, in float32."""
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
def test_packed_pairs_give_the_rewards_loss_and_gradients_of_separate_rows(setup, attention_tokens):
    rm, items, params = setup
    rm.train()
    plain = plain_rewards(rm, items)
    plain_loss, plain_grads = loss_and_grads(rm, params, plain)
    pairs = [(it.rows[0][0], it.rows[1][0]) for it in items]
    packed = reward.pack_pairs(pairs, 0, attention_tokens)
    R, L = packed.tokens.shape
    if attention_tokens == 10 ** 9:
        assert R == 1  # every pair side by side in one row
    if attention_tokens == 1:
        assert 1 < R < len(items)  # rows as long as the longest pair, short pairs sharing one
    # each prompt once: fewer tokens than the two rows of each pair
    assert R * L < sum(len(ids) for it in items for ids, _ in it.rows)
    rewards = rm(packed.tokens, packed.at, packed.positions, packed.mask)
    torch.testing.assert_close(rewards, plain, rtol=1e-5, atol=1e-5)
    loss, grads = loss_and_grads(rm, params, rewards)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_the_shared_start_is_the_rows_common_prefix_and_leaves_each_reply_a_token():
    assert reward.shared_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert reward.shared_prefix([1, 2, 3], [1, 2, 3, 4]) == 2  # the shorter keeps its last token
    assert reward.shared_prefix([7], [7, 8]) == 0

