"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) with LoRA.

The reference policy is the base model itself: the same network with its adapters switched
off (lora.adapters_disabled), so no second copy of the weights is held. Each micro-batch runs
the chosen and rejected rows of its pairs once without adapters (no gradient) and once with
them. A step's loss is the mean over the pairs of the whole global batch.
"""
from __future__ import annotations

import torch

from homellm.train import session as sessions
from homellm.train.batches import collate, micro_batches, my_share
from homellm.train.config import TuneConfig
from homellm.train.loss import dpo_loss, labelled_logprobs, sequence_logprobs
from homellm.train.lora import adapters_disabled


def pair_logprobs(model, tokens, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs of the chosen rows (even) and rejected rows (odd), (P,) each."""
    logp, rows = labelled_logprobs(model, tokens, labels)
    seq = sequence_logprobs(logp, rows, tokens.shape[0])
    return seq[0::2], seq[1::2]


@torch.no_grad()
def margins(model, tokenizer, pairs: list[dict], max_length: int = 1024) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) of each pair under `model` as it is (P,)."""
    from homellm.train.batches import dpo_item
    items = [dpo_item(tokenizer, p, max_length) for p in pairs]
    items = [it for it in items if it is not None]
    pad = tokenizer.padding_id if tokenizer.padding_id is not None else (tokenizer.eos_id or 0)
    out = []
    for i in range(len(items)):
        tokens, labels = collate(items, [i], pad)
        chosen, rejected = pair_logprobs(model, tokens, labels)
        out.append(chosen - rejected)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def validation(s: sessions.Session) -> dict:
    """Mean DPO loss, reward accuracy and reward margin over the validation pairs."""
    s.model.eval()
    batches = micro_batches(s.val_items, list(range(len(s.val_items))), s.config.batch_tokens,
                            s.config.batch_size)
    total, correct, margin, n = 0.0, 0.0, 0.0, 0
    for mb in batches[s.procs.rank::s.procs.world]:
        tokens, labels = collate(s.val_items, mb, s.pad_id, s.procs.device)
        with adapters_disabled(s.model):
            ref_c, ref_r = pair_logprobs(s.model, tokens, labels)
        pol_c, pol_r = pair_logprobs(s.model, tokens, labels)
        losses = dpo_loss(pol_c, pol_r, ref_c, ref_r, s.config.beta)
        rewards = s.config.beta * ((pol_c - ref_c) - (pol_r - ref_r))
        total += losses.sum().item()
        correct += (rewards > 0).sum().item()
        margin += rewards.sum().item()
        n += len(mb)
    s.model.train()
    total, correct, margin, n = s.procs.all_sum([total, correct, margin, n])
    n = max(n, 1)
    return {"loss": total / n, "reward_accuracy": correct / n, "reward_margin": margin / n}


def train(config: TuneConfig, progress=None, resume: bool = False,
          stop_after: int | None = None) -> sessions.TuneResult:
    """Run (or resume) DPO on preference pairs; the arguments are sft.train's."""
    s = sessions.setup(config, resume, progress)
    step = s.start_step
    try:
        while step < len(s.steps) and (stop_after is None or step < stop_after):
            torch.manual_seed(sessions.step_seed(config.seed, step, s.procs.rank))
            batch = s.steps[step]
            n_pairs = sum(len(mb) for mb in batch)
            share = my_share(batch, s.procs.rank, s.procs.world)
            loss_sum = 0.0
            for j, (mb, weight) in enumerate(share):
                tokens, labels = collate(s.items, mb, s.pad_id, s.procs.device)
                with torch.no_grad(), adapters_disabled(s.model):
                    ref_c, ref_r = pair_logprobs(s.model, tokens, labels)
                with s.sync(last=j == len(share) - 1):
                    logp, rows = s.module(tokens, labels)
                    seq = sequence_logprobs(logp, rows, tokens.shape[0])
                    loss = dpo_loss(seq[0::2], seq[1::2], ref_c, ref_r, config.beta).sum() * weight
                    (loss * s.procs.world / n_pairs).backward()
                loss_sum += loss.item()
            loss_mean = s.procs.all_sum([loss_sum])[0] / n_pairs
            s.update()
            step += 1
            s.after_step(step - 1, loss_mean, lambda: validation(s))
    except KeyboardInterrupt:  # Ctrl-C: keep what was done, to resume from
        s.save_checkpoint(step, barrier=False)
        raise
    return s.finish(step, stopped=step < len(s.steps))
