"""Token ids and loss labels for SFT examples and DPO pairs, and the micro-batches of a run.

Labels are the ids where the loss applies and IGNORE elsewhere; the loss of position t
predicts labels[t + 1] (loss.py shifts). SFT labels are the chat template's assistant-only
mask (`Tokenizer.encode_chat`); a DPO completion's labels are the last reply only.

The plan of a run is fixed by the seed: epoch e visits the items in a permutation drawn from
seed + e, packed greedily into micro-batches of at most `batch_size` items and `batch_tokens`
padded tokens (rows x longest row); each optimizer step takes `grad_accum x world` micro-batches, and
process r of `world` computes micro-batches r, r + world, ... of each step. So step k's data
is known from k alone: the data position a checkpoint stores is the step number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Item:
    """One training unit: an SFT example (one row) or a DPO pair (chosen row, rejected row)."""

    rows: list[tuple[list[int], list[int]]]  # (ids, labels) per row

    @property
    def length(self) -> int:
        return max(len(ids) for ids, _ in self.rows)

    @property
    def n_targets(self) -> int:
        return sum(sum(1 for x in labels[1:] if x != IGNORE) for _, labels in self.rows)


# Tokens a cut message keeps beyond max_length, so that where its text was cut (a token
# that would have merged across the cut) lies past the tokens that are kept.
CUT_MARGIN_TOKENS = 64
# The most characters we assume one token covers when bounding the text to tokenize (a
# vocabulary with longer entries only makes a cut example end earlier than max_length).
MAX_CHARS_PER_TOKEN = 256


def within_reach(tokenizer, messages: list[dict], max_length: int) -> list[dict]:
    """`messages` with only the text that can reach the first `max_length` tokens.

    One token covers at most `tokenizer.max_token_bytes` bytes, so more than (max_length +
    margin) x that many characters of message text always make more than max_length tokens:
    each message's content is cut there, and once the messages so far hold that much text, the
    later ones are dropped. Tokenizing the result and cutting it to max_length gives the same
    ids as tokenizing everything, at a bounded cost: a 30 MB line is not tokenized in full."""
    per_token = min(max(1, tokenizer.max_token_bytes), MAX_CHARS_PER_TOKEN)
    budget = (max_length + CUT_MARGIN_TOKENS) * per_token
    out, seen = [], 0
    for m in messages:
        if seen >= budget:
            break
        content = m["content"]
        if len(content) > budget:
            m = {**m, "content": content[:budget]}
        out.append(m)
        seen += len(m["content"])
    return out


def sft_item(tokenizer, messages: list[dict], max_length: int) -> Item | None:
    """The example as ids and assistant-only labels, cut to max_length; None if nothing to learn."""
    ids, mask = tokenizer.encode_chat(within_reach(tokenizer, messages, max_length))
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [i if m else IGNORE for i, m in zip(ids, mask)]
    item = Item([(ids, labels)])
    return item if item.n_targets else None


def completion_row(tokenizer, prompt: list[dict], reply: list[dict], max_length: int):
    """(ids, labels) of prompt + reply, labels on the reply's assistant tokens only (text past
    max_length's reach is not tokenized, as in sft_item)."""
    prompt = within_reach(tokenizer, prompt, max_length)
    n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    if n_prompt >= max_length:  # no reply token within max_length
        return [], []
    ids, mask = tokenizer.encode_chat(within_reach(tokenizer, prompt + reply, max_length))
    labels = [i if m and t >= n_prompt else IGNORE for t, (i, m) in enumerate(zip(ids, mask))]
    return ids[:max_length], labels[:max_length]


def dpo_item(tokenizer, pair: dict, max_length: int) -> Item | None:
    item = Item([completion_row(tokenizer, pair["prompt"], pair["chosen"], max_length),
                 completion_row(tokenizer, pair["prompt"], pair["rejected"], max_length)])
    ok = all(ids and any(x != IGNORE for x in labels[1:]) for ids, labels in item.rows)
    return item if ok else None


def micro_batches(items: list[Item], order: list[int], batch_tokens: int,
                  batch_size: int | None = None) -> list[list[int]]:
    """Greedy packing in `order`: a micro-batch grows while rows x longest row <= batch_tokens
    and it holds at most `batch_size` items (examples or pairs; None: no limit)."""
    batches, current, rows, longest = [], [], 0, 0
    for i in order:
        item = items[i]
        new_rows, new_longest = rows + len(item.rows), max(longest, item.length)
        full = batch_size is not None and len(current) >= batch_size
        if current and (full or new_rows * new_longest > batch_tokens):
            batches.append(current)
            current, new_rows, new_longest = [], len(item.rows), item.length
        current.append(i)
        rows, longest = new_rows, new_longest
    if current:
        batches.append(current)
    return batches


def plan_steps(items: list[Item], batch_tokens: int, per_step: int, seed: int, epochs: int,
               max_steps: int | None, batch_size: int | None = None) -> list[list[list[int]]]:
    """Step -> its micro-batches (lists of item indices), `per_step` = grad_accum x world a step.

    Runs `epochs` epochs, or as many epochs as `max_steps` needs (then cut to max_steps)."""
    steps, epoch = [], 0
    while epoch < epochs or (max_steps is not None and len(steps) < max_steps):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        batches = micro_batches(items, order, batch_tokens, batch_size)
        steps += [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
        epoch += 1
        if max_steps is not None and len(steps) >= max_steps:
            break
    return steps[:max_steps] if max_steps is not None else steps


def my_share(step: list[list[int]], rank: int, world: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of a step, each with weight 1; processes with fewer than
    the others repeat the step's first micro-batch with weight 0 (every process must run the
    same number of backward passes for the gradient all-reduce)."""
    mine = step[rank::world]
    passes = -(-len(step) // world)
    return [(b, 1.0) for b in mine] + [(step[0], 0.0)] * (passes - len(mine))


def collate(items: list[Item], indices: list[int], pad_id: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) right-padded with pad_id, labels (B, T) padded with IGNORE; rows in order
    (a DPO pair gives its chosen row, then its rejected row)."""
    rows = [row for i in indices for row in items[i].rows]
    T = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        tokens[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
    return tokens.to(device), labels.to(device)
