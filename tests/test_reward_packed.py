"""Preference pairs packed as one token tree (train/prefix_tree.py): a pair's prompt and the
start every conversation shares computed once, the replies on top, attention in blocks. The
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
from homellm.train.prefix_tree import pack  # noqa: E402

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
    return rm, items, params, tokenizer


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


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("repeat", [False, True], ids=["pairs", "a-prompt-twice"])
def test_a_tree_row_gives_the_rewards_loss_and_gradients_of_separate_rows(setup, repeat):
    rm, items, params, tokenizer = setup
    if repeat:  # a pair again (nothing new), and a pair on an earlier pair's prompt: the later
        # blocks see ancestors an earlier block added
        again = dpo_item(tokenizer, {"prompt": [U(PAIRS[0][0])], "chosen": [A("the sea is blue")],
                                     "rejected": [A("the sky")]}, 64)
        items = items + [items[1], again]
    rm.train()
    plain = plain_rewards(rm, items)
    plain_loss, plain_grads = loss_and_grads(rm, params, plain)
    rows = [ids for it in items for ids, _ in it.rows]
    tree = pack(rows, [[2 * j, 2 * j + 1] for j in range(len(items))])
    if not repeat:  # each pair's prompt once, the template's start once
        shared = min(common_prefix(rows[0], r) for r in rows)
        assert shared > 3 and tree.tokens.shape == (1, sum(len(r) for r in rows) - sum(
            common_prefix(rows[2 * j], rows[2 * j + 1]) for j in range(len(items))) - (len(items) - 1) * shared)
    rewards = rm(tree.tokens, tree.at, tree.positions, tree.attention)
    torch.testing.assert_close(rewards, plain, rtol=1e-5, atol=1e-5)
    loss, grads = loss_and_grads(rm, params, rewards)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    rm.checkpointing = True  # --grad-checkpointing: each layer again in the backward, same blocks
    try:
        _, again = loss_and_grads(rm, params, rm(tree.tokens, tree.at, tree.positions, tree.attention))
    finally:
        rm.checkpointing = False
    for g, ref in zip(again, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_a_tree_row_holds_each_distinct_beginning_once_and_blocks_see_their_ancestors():
    """The sequences of prefix_tree.py's picture (and one ending inside another), in two groups."""
    s, p, q = 7, 8, 9
    tree = pack([[s, p, 1, 2], [s, p, 3], [s, q, 4], [s, p]], [[0, 1], [2, 3]])
    assert tree.tokens.tolist() == [[s, p, 1, 2, 3, q, 4]]
    assert tree.positions.tolist() == [[0, 1, 2, 3, 2, 1, 2]]
    assert tree.at.tolist() == [[0, 3], [0, 4], [0, 6], [0, 1]]  # a sequence may end inside another
    a = tree.attention
    assert a.queries.tolist() == [[0, 1, 2, 3, 4], [5, 6, 0, 0, 0]]  # block 2: q 4, padded
    assert a.keys.tolist() == [[0, 1, 2, 3, 4], [0, 5, 6, 0, 0]]  # its ancestor s first
    sees = [[a.keys[b, j].item() for j in range(5) if a.mask[b, 0, i, j]]
            for b in range(2) for i in range(5) if i < (5 if b == 0 else 2)]
    assert sees == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 5], [0, 5, 6]]
    assert a.mask[1, 0, 2:].sum(-1).tolist() == [1, 1, 1]  # padding queries see one key (no NaN)
    assert a.slot.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_tree_attention_backward_is_the_same_run_after_run_on_two_threads():
    """Blocks share key columns (a prompt, the template's start): their gradients must add up
    in a fixed order, or a resumed run drifts from an uninterrupted one in the last bits."""
    g = torch.Generator().manual_seed(0)
    sequences = [[1] * 24 + [2 + j] * 8 + [100 + j] * torch.randint(10, 40, (1,), generator=g).item()
                 for j in range(16)]
    tree = pack(sequences, [[2 * j, 2 * j + 1] for j in range(8)])
    N = tree.tokens.shape[1]
    q = torch.randn(1, 9, N, 64, generator=g, requires_grad=True)
    k = torch.randn(1, 3, N, 64, generator=g, requires_grad=True)
    v = torch.randn(1, 3, N, 64, generator=g, requires_grad=True)
    grad_y = torch.randn(1, N, 9 * 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(30):
            q.grad = k.grad = v.grad = None
            tree.attention.attend(q, k, v, None, True).backward(grad_y)
            runs.append(torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.flatten()]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
