"""GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1): group-relative advantages, no value model.

For each prompt of a step, `group_size` completions are sampled from the policy; completion i
of a group gets the advantage

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      (without scale_rewards: r_i - mean)

for every one of its tokens, and the loss is the clipped surrogate with a KL penalty to the
reference (the policy with its adapters off), per completion token t:

    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * k3_t
    rho_t = pi(y_t) / pi_old(y_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

(k3: the unbiased, always-positive estimator of DeepSeekMath eq. 4). loss_type "dapo" averages
l over every completion token of the step (Yu et al. 2025, TRL's default); "grpo" averages each
completion's tokens, then the completions. With epochs = 1, pi_old is the policy itself (rho = 1,
its gradient the policy gradient), so no separate pass computes old log-probabilities.
"""
from __future__ import annotations

import time

import torch

from homellm.train import rl
from homellm.train.rl_config import RLConfig
from homellm.train.session import step_seed


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, consecutive groups of `group` -> (N,) advantages (module docstring)."""
    r = rewards.view(-1, group)
    a = r - r.mean(-1, keepdim=True)
    if scale:
        a = a / (r.std(-1, keepdim=True, unbiased=True if group > 1 else False) + 1e-4)
    return a.reshape(-1)


def grpo_token_loss(logp, old, ref, advantages, eps: float, beta: float):
    """Per-token loss (n,) and whether the ratio was clipped (n,), for flat per-token tensors
    (advantages already repeated over each completion's tokens)."""
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * advantages
    loss = -torch.min(unclipped, clipped)
    if beta:
        d = ref - logp
        loss = loss + beta * (torch.exp(d) - d - 1)
    return loss, (unclipped != clipped) & (clipped < unclipped)  # the clip took effect


def train(config: RLConfig, progress=None, resume: bool = False, stop_after: int | None = None) -> rl.RLResult:
    """Run (or resume) GRPO; `progress(dict)` after each step with its log. `stop_after=k`
    stops after step k with a checkpoint, as an interrupted run would."""
    from homellm.train.rollout import RolloutStats
    s = rl.setup(config, resume, progress)
    c = s.config
    G, mb = c.group_size, c.micro_batch
    step = s.start_step
    try:
        while step < c.steps and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(c.seed, step, 0))  # LoRA dropout
            items = [s.prompts[i] for i in s.step_prompts(step)]
            stats = RolloutStats()
            done = s.rollout(items, G, step_seed(c.seed, step, 1), stats)
            group_items = [items[d.prompt] for d in done]
            rewards = s.rewards(step, group_items, [d.text for d in done])
            adv = group_advantages(rewards, G, c.scale_rewards)
            rows = [(it["ids"], d.ids) for it, d in zip(group_items, done)]
            lengths = [len(d.ids) for d in done]
            n_tokens = sum(lengths)
            chunks = [list(range(i, min(i + mb, len(rows)))) for i in range(0, len(rows), mb)]
            batches = [rl.completion_batch([rows[i] for i in ch], s.pad_id, s.device) for ch in chunks]
            # the reference (adapters off), and the policy before the update when it is needed
            refs, olds = s.reference(rows, batches), []
            if c.epochs > 1:
                with torch.no_grad():
                    olds = [rl.completion_logprobs(s.model, tokens, labels)[0] for tokens, labels in batches]
            kl_sum = clipped = loss_sum = 0.0
            for epoch in range(c.epochs):
                for k, (ch, (tokens, labels)) in enumerate(zip(chunks, batches)):
                    logp, _, _ = rl.completion_logprobs(s.model, tokens, labels)
                    a = torch.cat([adv[i].expand(lengths[i]) for i in ch]).to(logp.device)
                    old = olds[k] if olds else logp.detach()
                    loss_t, was_clipped = grpo_token_loss(logp, old, refs[k], a, c.cliprange, s.kl.value)
                    if c.loss_type == "dapo":
                        loss = loss_t.sum() / n_tokens
                    else:
                        per, _ = rl.split_rows(loss_t, [lengths[i] for i in ch])
                        loss = (per.sum(-1) / torch.tensor([lengths[i] for i in ch], device=per.device)).sum() / len(rows)
                    loss.backward()
                    if epoch == 0:
                        kl_sum += (logp.detach() - refs[k]).sum().item()
                        clipped += was_clipped.sum().item()
                        loss_sum += loss.item()
                s.update()
            kl = kl_sum / len(rows)  # nats a completion (k1, sum over its tokens)
            s.kl.update(kl, len(rows))
            seconds = time.perf_counter() - t0
            log = {"step": step + 1, "reward": rewards.mean().item(), "reward_std": rewards.std().item()
                   if len(rewards) > 1 else 0.0, "kl": kl, "kl_coef": s.kl.value, "loss": loss_sum,
                   "clip_fraction": clipped / max(n_tokens, 1), "length": n_tokens / len(rows),
                   "tokens": n_tokens, "rollout_tokens_per_s": stats.tokens_per_s,
                   "seconds": seconds, "tokens_per_s": n_tokens / seconds}
            step += 1
            s.after_step(step - 1, log)
    except KeyboardInterrupt:
        s.save_checkpoint(step)
        raise
    return s.finish(step, stopped=step < c.steps)
