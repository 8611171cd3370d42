"""Supervised fine-tuning with LoRA: next-token cross-entropy on the assistant tokens only.

The loss of a step is the mean negative log-likelihood over every labelled token of the
step's global batch (all micro-batches, all processes), so a step's update does not depend
on how its batch was split into micro-batches or processes.
"""
from __future__ import annotations

import torch

from homellm.train import session as sessions
from homellm.train.batches import collate, micro_batches, my_share
from homellm.train.config import TuneConfig
from homellm.train.loss import labelled_logprobs


@torch.no_grad()
def validation_loss(s: sessions.Session) -> dict:
    """Mean token NLL over the validation examples (each process takes a share)."""
    s.model.eval()
    batches = micro_batches(s.val_items, list(range(len(s.val_items))), s.config.batch_tokens,
                            s.config.batch_size)
    nll, n = 0.0, 0
    for mb in batches[s.procs.rank::s.procs.world]:
        tokens, labels = collate(s.val_items, mb, s.pad_id, s.procs.device)
        logp, _ = labelled_logprobs(s.model, tokens, labels)
        nll, n = nll - logp.sum().item(), n + logp.numel()
    s.model.train()
    nll, n = s.procs.all_sum([nll, n])
    return {"loss": nll / max(n, 1)}


def train(config: TuneConfig, progress=None, resume: bool = False,
          stop_after: int | None = None) -> sessions.TuneResult:
    """Run (or resume) SFT; `progress(dict)` after each step. `stop_after=k` stops after step
    k with a checkpoint, as an interrupted run would."""
    s = sessions.setup(config, resume, progress)
    step = s.start_step
    try:
        while step < len(s.steps) and (stop_after is None or step < stop_after):
            torch.manual_seed(sessions.step_seed(config.seed, step, s.procs.rank))
            batch = s.steps[step]
            n_targets = sum(s.items[i].n_targets for mb in batch for i in mb)
            share = my_share(batch, s.procs.rank, s.procs.world)
            loss_sum = 0.0
            for j, (mb, weight) in enumerate(share):
                tokens, labels = collate(s.items, mb, s.pad_id, s.procs.device)
                with s.sync(last=j == len(share) - 1):
                    logp, _ = s.module(tokens, labels)
                    loss = -logp.sum() * weight
                    (loss * s.procs.world / n_targets).backward()
                loss_sum += loss.item()
            loss_mean = s.procs.all_sum([loss_sum])[0] / n_targets
            s.update()
            step += 1
            s.after_step(step - 1, loss_mean, lambda: validation_loss(s))
    except KeyboardInterrupt:  # Ctrl-C: keep what was done, to resume from
        s.save_checkpoint(step, barrier=False)
        raise
    return s.finish(step, stopped=step < len(s.steps))
