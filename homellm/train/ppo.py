"""PPO as InstructGPT and StableVicuna ran it: a value head, GAE, the clipped objective, and a
KL penalty against the reference model in the reward.

The recipe (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022, sec. 3.5; trlx and
TRL's PPOTrainer, which StableVicuna used): for each completion y of a prompt x,

    score    s = RM(x, y), whitened (running moments by default: reward_norm)
    reward   r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)),  plus s at the last token
    GAE      delta_t = r_t + gamma V(t+1) - V(t),  A_t = delta_t + gamma lam A_{t+1}
             (Schulman et al. 2016), returns R_t = A_t + V(t); A whitened over the batch
    loss     pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi/pi_old
             vf = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old +- eps_v) - R_t)^2)
             loss = pg + vf_coef vf       (Schulman et al. 2017, eq. 7 and 9)

The value head is a linear layer on the policy's final hidden states (shared trunk, as TRL's
AutoModelForCausalLMWithValueHead), V(t) read at the state that predicts token t. The
reference is the policy with its adapters off; kl_coef is fixed, or adaptive toward target_kl
(rl.KLController). Each rollout is used for `epochs` passes of `minibatches` optimizer steps.
"""
from __future__ import annotations

import time

import torch

from homellm.train import rl
from homellm.train.rl_config import RLConfig
from homellm.train.session import step_seed


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (TRL's masked_whiten)."""
    values = x[mask]
    mean, var = values.mean(), values.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, L) of right-padded per-token rewards and values (B, L); the
    value after a completion's last token is 0 (the episode ends there)."""
    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    maskf = mask.to(rewards.dtype)
    for t in reversed(range(L)):
        next_value = values[:, t + 1] * maskf[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (maskf[:, t + 1] if t + 1 < L else 0)) * maskf[:, t]
        adv[:, t] = last
    return adv, (adv + values) * maskf


def ppo_loss(logp, old_logp, values, old_values, advantages, returns, cliprange: float,
             cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, dict]:
    """The loss and its parts over flat per-token tensors (n,) (module docstring)."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg = torch.max(pg1, pg2).mean()
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    with torch.no_grad():
        parts = {"pg_loss": pg.item(), "value_loss": vf.item(),
                 "clip_fraction": (pg2 > pg1).float().mean().item(),
                 "value_clip_fraction": ((v_clipped - returns) ** 2 > (values - returns) ** 2).float().mean().item(),
                 "approx_kl": (0.5 * (logp - old_logp) ** 2).mean().item()}
    return pg + vf_coef * vf, parts


def train(config: RLConfig, progress=None, resume: bool = False, stop_after: int | None = None) -> rl.RLResult:
    """Run (or resume) PPO; arguments as grpo.train's."""
    from homellm.train.rollout import RolloutStats
    s = rl.setup(config, resume, progress, value_head=True)
    c = s.config
    mb = c.micro_batch
    step = s.start_step
    try:
        while step < c.steps and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(c.seed, step, 0))
            items = [s.prompts[i] for i in s.step_prompts(step)]
            stats = RolloutStats()
            done = s.rollout(items, c.group_size, step_seed(c.seed, step, 1), stats)
            row_items = [items[d.prompt] for d in done]
            scores = s.rewards(step, row_items, [d.text for d in done])
            normalized = rl.normalize_rewards(scores, c.reward_norm, s.moments)
            rows = [(it["ids"], d.ids) for it, d in zip(row_items, done)]
            lengths = [len(d.ids) for d in done]
            N = len(rows)
            chunks = [list(range(i, min(i + mb, N))) for i in range(0, N, mb)]
            batches = [rl.completion_batch([rows[i] for i in ch], s.pad_id, s.device) for ch in chunks]
            # the policy before the update (log-probs, values, entropy) and the reference
            old, vals, ents = [], [], []
            with torch.no_grad():
                for tokens, labels in batches:
                    lp, v, e = rl.completion_logprobs(s.model, tokens, labels, s.value_head, entropy=True)
                    old.append(lp)
                    vals.append(v)
                    ents.append(e)
            refs = s.reference(rows, batches)
            old_flat, val_flat, ref_flat = torch.cat(old), torch.cat(vals), torch.cat(refs)
            old_p, mask = rl.split_rows(old_flat, lengths)
            values, _ = rl.split_rows(val_flat, lengths)
            ref_p, _ = rl.split_rows(ref_flat, lengths)
            kl_t = (old_p - ref_p) * mask  # (N, L)
            token_rewards = -s.kl.value * kl_t
            last = torch.tensor(lengths, device=mask.device) - 1
            token_rewards[torch.arange(N), last] += normalized.to(token_rewards.device)
            adv, returns = gae(token_rewards, values, mask, c.gamma, c.lam)
            adv = whiten(adv, mask)
            adv_flat, ret_flat = adv[mask], returns[mask]
            starts = [0]
            for n in lengths:
                starts.append(starts[-1] + n)

            def per_token(flat, idx):
                return torch.cat([flat[starts[i]:starts[i + 1]] for i in idx])

            g = torch.Generator().manual_seed(step_seed(c.seed, step, 2))
            sums = {"pg_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0,
                    "value_clip_fraction": 0.0, "approx_kl": 0.0}
            n_updates = 0
            for _ in range(c.epochs):
                order = torch.randperm(N, generator=g).tolist()
                size = -(-N // c.minibatches)
                for m0 in range(0, N, size):
                    minibatch = order[m0:m0 + size]
                    n_tok = sum(lengths[i] for i in minibatch)
                    for k0 in range(0, len(minibatch), mb):
                        idx = minibatch[k0:k0 + mb]
                        tokens, labels = rl.completion_batch([rows[i] for i in idx], s.pad_id, s.device)
                        logp, v, _ = rl.completion_logprobs(s.model, tokens, labels, s.value_head)
                        loss, parts = ppo_loss(logp, per_token(old_flat, idx), v, per_token(val_flat, idx),
                                               per_token(adv_flat, idx), per_token(ret_flat, idx),
                                               c.cliprange, c.cliprange_value, c.vf_coef)
                        share = sum(lengths[i] for i in idx) / n_tok  # token mean over the minibatch
                        (loss * share).backward()
                        for k in sums:
                            sums[k] += parts[k] * share
                    s.update()
                    n_updates += 1
            kl = kl_t.sum(-1).mean().item()  # nats a completion (k1)
            s.kl.update(kl, N)
            n_tokens = sum(lengths)
            seconds = time.perf_counter() - t0
            log = {"step": step + 1, "reward": scores.mean().item(),
                   "reward_std": scores.std().item() if N > 1 else 0.0, "kl": kl,
                   "kl_coef": s.kl.value, "entropy": torch.cat(ents).mean().item(),
                   **{k: v / n_updates for k, v in sums.items()}, "length": n_tokens / N,
                   "tokens": n_tokens, "rollout_tokens_per_s": stats.tokens_per_s,
                   "seconds": seconds, "tokens_per_s": n_tokens / seconds}
            step += 1
            s.after_step(step - 1, log)
    except KeyboardInterrupt:
        s.save_checkpoint(step)
        raise
    return s.finish(step, stopped=step < c.steps)
