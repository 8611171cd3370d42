"""What PPO and GRPO share: the policy with adapters, prompts, rewards, rollouts, the KL
penalty's coefficient, log-probabilities of completions, evaluation, checkpoints and logs.

The reference model is the policy with its adapters off (lora.adapters_disabled): no second
copy of the weights. A step's randomness (which completions are sampled, PPO's minibatch
order, LoRA dropout) comes from generators seeded by (seed, step), and the checkpoint holds the
adapters, the optimizer, the KL coefficient, the reward statistics and the logs, so a resumed
run makes exactly the steps an uninterrupted one makes.

Rewards come from a reward model (train/reward.py; it must share the policy's tokenizer) or a
Python function `f(prompt, completion) -> float` in a file (`--reward-fn file.py:f`; it may
also take `extra`, the prompt line's other fields, e.g. a reference answer). A function that
raises or returns something other than a finite number stops the run with an error that
names it and the prompt, after a checkpoint of the steps done.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from homellm.errors import HomellmError
from homellm.train import checkpoint
from homellm.train.batches import IGNORE
from homellm.train.rl_config import RLConfig

METRICS = "metrics.jsonl"
VAL_SEED = 1_000_003  # evaluation samples are drawn from seed + this, the same at every evaluation


class RewardError(HomellmError):
    """The reward could not be computed (a function that raised or returned a non-number)."""


# -- rewards ----------------------------------------------------------------------------------

class ModelReward:
    """r(prompt, completion) from a reward model folder (train/reward.py)."""

    def __init__(self, name: str, policy_tokenizer, device: torch.device, dtype: str):
        from homellm.train.reward import check_tokenizer, find_reward_model, read_reward_info
        folder = find_reward_model(name)
        check_tokenizer(read_reward_info(folder), policy_tokenizer, "the policy")
        from homellm.train.reward import load_reward_model
        self.model = load_reward_model(folder, device=str(device), dtype=dtype)
        self.describe = f"reward model {folder}"

    def __call__(self, items: list[dict], completions: list[str]) -> list[float]:
        return self.model.rewards([(it["prompt"], c) for it, c in zip(items, completions)])


class FunctionReward:
    """r(prompt, completion) from `file.py:function`."""

    def __init__(self, spec: str):
        path, _, name = spec.rpartition(":")
        if not path or not name:
            raise HomellmError(f"--reward-fn {spec}: expected FILE.py:FUNCTION")
        file = Path(path).expanduser()
        if not file.is_file():
            raise HomellmError(f"--reward-fn {spec}: {file}: no such file")
        module_spec = importlib.util.spec_from_file_location(f"homellm_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's code: say where it failed
            raise HomellmError(f"--reward-fn {spec}: importing {file} raised "
                               f"{type(e).__name__}: {e}") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise HomellmError(f"--reward-fn {spec}: {file} has no function {name!r}")
        try:
            params = inspect.signature(fn).parameters
            self.extra = "extra" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self.extra = False
        self.fn, self.describe = fn, f"reward function {name} in {file}"

    def __call__(self, items: list[dict], completions: list[str]) -> list[float]:
        out = []
        for k, (it, c) in enumerate(zip(items, completions)):
            shown = it["text"][:60] + ("..." if len(it["text"]) > 60 else "")
            try:
                value = self.fn(it["text"], c, extra=it.get("extra", {})) if self.extra else self.fn(it["text"], c)
            except Exception as e:  # the user's code
                raise RewardError(f"the {self.describe} raised {type(e).__name__}: {e} "
                                  f"(on completion {k} of prompt {shown!r})") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(f"the {self.describe} returned {value!r} for completion {k} of prompt "
                                  f"{shown!r}: expected a finite number")
            out.append(float(value))
        return out


def open_reward(config: RLConfig, tokenizer, device: torch.device):
    if config.reward_fn is not None:
        return FunctionReward(config.reward_fn)
    return ModelReward(config.reward, tokenizer, device, config.dtype)


# -- the KL coefficient and reward statistics ---------------------------------------------

class KLController:
    """The KL penalty's coefficient: fixed, or adaptive toward target_kl (Ziegler et al. 2019,
    "Fine-Tuning Language Models from Human Preferences", eq. 2):
        coef <- coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int):
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: Tensor):
        n = xs.numel()
        mean, var = xs.mean().item(), xs.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, d: dict):
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]


def normalize_rewards(scores: Tensor, how: str, moments: RunningMoments) -> Tensor:
    """Reward whitening: by running moments (trlx's "running" scaling, as StableVicuna trained),
    by this batch's, or not at all."""
    if how == "none":
        return scores
    if how == "batch":
        return (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8) if scores.numel() > 1 \
            else scores - scores.mean()
    moments.update(scores)
    return (scores - moments.mean) / (math.sqrt(moments.var) + 1e-8)


# -- log-probabilities of completions ----------------------------------------------------------

def completion_batch(rows: list[tuple[list[int], list[int]]], pad_id: int,
                     device) -> tuple[Tensor, Tensor]:
    """tokens (B, T) and labels (B, T) for (prompt ids, completion ids) rows: right-padded, the
    labels the completion's ids (the positions PPO and GRPO score) and IGNORE elsewhere."""
    T = max(len(p) + len(c) for p, c in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        ids = torch.tensor(p + c)
        tokens[b, :len(ids)] = ids
        labels[b, len(p):len(ids)] = ids[len(p):]
    return tokens.to(device), labels.to(device)


def completion_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor,
                        value_head: nn.Module | None = None, entropy: bool = False
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per completion token, flattened row by row (n,): log pi(token | before), the value head's
    estimate of the state before it (None without a head), and the policy's entropy there
    (no gradient; None unless asked)."""
    from homellm.train.loss import CHUNK, _HeadLogprobs, _head_weight, final_hidden
    hidden = final_hidden(model, tokens)[:, :-1]  # (B, T-1, hidden)
    targets = labels[:, 1:]
    where = targets != IGNORE
    h, t = hidden[where], targets[where]  # (n, hidden), (n,)
    head = model.lm_head
    logp = torch.cat([_HeadLogprobs.apply(h[s:s + CHUNK], t[s:s + CHUNK], head)
                      for s in range(0, h.shape[0], CHUNK)])
    values = value_head(h.float())[:, 0] if value_head is not None else None
    ent = None
    if entropy:
        with torch.no_grad():
            cd = getattr(head, "compute_dtype", None) or h.dtype
            w = _head_weight(head, cd)
            parts = []
            for s in range(0, h.shape[0], CHUNK):
                lp = torch.log_softmax((h[s:s + CHUNK].to(cd) @ w.T).float(), dim=-1)
                parts.append(-(lp.exp() * lp).sum(-1))
            ent = torch.cat(parts)
    return logp, values, ent


def split_rows(flat: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
    """A flat (n,) vector of per-token values -> (B, L) right-padded with 0, and its mask."""
    B, L = len(lengths), max(lengths)
    out = flat.new_zeros(B, L)
    mask = torch.zeros(B, L, dtype=torch.bool, device=flat.device)
    at = 0
    for b, n in enumerate(lengths):
        out[b, :n] = flat[at:at + n]
        mask[b, :n] = True
        at += n
    return out, mask


# -- the run ------------------------------------------------------------------------------------

@dataclass
class RLSession:
    config: RLConfig
    out: Path
    device: torch.device
    tokenizer: object
    model: nn.Module
    roller: object  # what rollouts run on (rollout.make_rollout)
    value_head: nn.Module | None
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list[dict]
    val_prompts: list[dict]
    reward: object
    kl: KLController
    moments: RunningMoments
    pad_id: int
    start_step: int = 0
    history: dict = field(default_factory=lambda: {"logs": [], "val": [], "seconds": 0.0, "tokens": 0})
    skipped: list[str] = field(default_factory=list)
    progress: object = None
    threads_before: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def step_prompts(self, step: int) -> list[int]:
        """The prompts of a step: consecutive slices of permutations drawn from seed + epoch."""
        n, k = len(self.prompts), self.config.prompts_per_step
        out, start = [], step * k
        for pos in range(start, start + k):
            epoch, i = divmod(pos, n)
            out.append(self._order(epoch)[i])
        return out

    def _order(self, epoch: int) -> list[int]:
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.config.seed + epoch)
            cache[epoch] = torch.randperm(len(self.prompts), generator=g).tolist()
        return cache[epoch]

    def rollout(self, items: list[dict], n: int, seed: int, stats, adapters: bool = True) -> list:
        c = self.config
        done = self.roller.generate([it["ids"] for it in items], n, c.max_new_tokens,
                                    stop_ids=self.tokenizer.eos_ids, pad_id=self.pad_id,
                                    temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                    seed=seed, stats=stats, adapters=adapters)
        for comp in done:
            ids = comp.ids[:-1] if comp.finished else comp.ids
            comp.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return done

    def rewards(self, step: int, items: list[dict], texts: list[str]) -> Tensor:
        """The rewards of a step's completions; on an error, a checkpoint of the steps done."""
        try:
            return torch.tensor(self.reward(items, texts), dtype=torch.float32)
        except HomellmError as e:
            self.save_checkpoint(step)
            raise RewardError(f"{e}. The {step} steps done are checkpointed in {self.out}: fix "
                              f"the reward and continue with --resume") from None

    def reference(self, rows: list[tuple[list[int], list[int]]], batches: list) -> list[Tensor]:
        """The reference's per-token log-probs of each micro-batch's completions (flat, as
        completion_logprobs): on the C runtime with no adapter (config.reference "auto" and
        native rollouts), else the training network with its adapters off."""
        from homellm.train.lora import adapters_disabled
        mb = self.config.micro_batch
        if self.config.reference == "auto" and self.roller.kind == "native":
            flat = self.roller.logprobs(rows).to(self.device)
            sizes = [sum(len(c) for _, c in rows[i:i + mb]) for i in range(0, len(rows), mb)]
            return list(flat.split(sizes))
        out = []
        with torch.no_grad(), adapters_disabled(self.model):
            for tokens, labels in batches:
                out.append(completion_logprobs(self.model, tokens, labels)[0])
        return out

    def update(self):
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, items: list[dict], adapters: bool = True) -> dict:
        """Mean reward, KL to the reference (nats a completion, sum over its tokens of
        log pi - log pi_ref) and length of one completion per held-out prompt, sampled with a
        fixed seed; adapters=False evaluates the reference (the base) itself."""
        from homellm.train.lora import adapters_disabled
        from homellm.train.rollout import RolloutStats
        if not items:
            return {}
        was = self.model.training
        self.model.eval()
        ctx = adapters_disabled if not adapters else contextlib.nullcontext
        with ctx(self.model):
            done = self.rollout(items, 1, self.config.seed + VAL_SEED, RolloutStats(), adapters)
        rewards = self.reward(items, [d.text for d in done])
        rows = [(it["ids"], d.ids) for it, d in zip(items, done)]
        kls = [] if adapters else [0.0] * len(rows)  # (the base is the reference)
        for s in range(0, len(rows), self.config.micro_batch) if adapters else ():
            part = rows[s:s + self.config.micro_batch]
            tokens, labels = completion_batch(part, self.pad_id, self.device)
            with ctx(self.model):
                logp, _, _ = completion_logprobs(self.model, tokens, labels)
            ref = self.reference(part, [(tokens, labels)])[0]
            per, _ = split_rows(logp - ref, [len(d) for _, d in part])
            kls += per.sum(-1).tolist()
        self.model.train(was)
        n = len(items)
        return {"reward": sum(rewards) / n, "kl": sum(kls) / n,
                "length": sum(len(d.ids) for d in done) / n,
                "texts": [d.text for d in done]}

    def validate(self, step: int) -> dict | None:
        if not self.val_prompts:
            return None
        try:
            got = self.evaluate(self.val_prompts)
        except HomellmError as e:
            self.save_checkpoint(step)
            raise RewardError(f"held-out evaluation after step {step}: {e}. The {step} steps done "
                              f"are checkpointed in {self.out}: fix the reward and continue with "
                              f"--resume") from None
        record = {"step": step, **{k: v for k, v in got.items() if k != "texts"}}
        self.history["val"].append(record)
        return record

    def save_checkpoint(self, step: int):
        self.history["seconds"] += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        self.history["state"] = {"kl_coef": self.kl.value, "moments": self.moments.state()}
        checkpoint.save(self.out, step=step, params=self.params, optimizer=self.optimizer,
                        scheduler=self.scheduler, history=self.history)

    def after_step(self, step: int, log: dict):
        """Record a step's log (metrics.jsonl too); validate and checkpoint when due."""
        c, h = self.config, self.history
        done = step + 1
        h["logs"].append(log)
        h["tokens"] += log.get("tokens", 0)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(log) + "\n")
        val = None
        if c.val_every and done % c.val_every == 0 and done < c.steps:
            val = self.validate(done)  # (a failing reward saves a checkpoint first)
        if c.save_every and done % c.save_every == 0 and done < c.steps:
            self.save_checkpoint(done)
        if self.progress is not None:
            self.progress({**log, "step": done, "total": c.steps, "val": val})

    def finish(self, step: int, stopped: bool) -> "RLResult":
        from homellm.train.adapter import save_adapter
        if not stopped and self.val_prompts and (not self.history["val"] or
                                                  self.history["val"][-1]["step"] != step):
            val = self.validate(step)
            if self.progress is not None and val is not None:
                self.progress({"val_only": True, "val": val, "step": step, "total": self.config.steps})
        if stopped:
            self.save_checkpoint(step)
        else:
            self.history["seconds"] += time.perf_counter() - self.t0
            self.t0 = time.perf_counter()
        save_adapter(self.model, self.config.lora, self.out, self.config.model)
        if self.value_head is not None:
            from safetensors.torch import save_file
            save_file({"v_head.summary.weight": self.value_head.weight.detach().float().cpu(),
                       "v_head.summary.bias": self.value_head.bias.detach().float().cpu()},
                      self.out / "value_head.safetensors")
        self.config.save(self.out)
        if self.threads_before:
            torch.set_num_threads(self.threads_before)
        h = self.history
        return RLResult(self.out, step, list(h["logs"]), list(h["val"]), h["tokens"], h["seconds"],
                        self.skipped, stopped, self.config, h.get("base_val"), self.roller.kind)


@dataclass
class RLResult:
    out: Path
    steps: int
    logs: list[dict]  # one per step: reward, kl, entropy, clip_fraction, value_loss, tokens/s, ...
    val: list[dict]  # {"step", "reward", "kl", "length"} on the held-out prompts
    tokens: int  # completion tokens generated
    seconds: float
    skipped: list[str]
    stopped: bool
    config: RLConfig
    base_val: dict | None = None  # the held-out evaluation of the base (adapters off)
    rollout: str = ""  # what generated: "native", "engine" or "policy" (train/rollout.py)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def setup(config: RLConfig, resume: bool = False, progress=None, value_head: bool = False) -> RLSession:
    """Everything before the first step; every error a user can cause is raised here."""
    from homellm.data.prompts import read_prompts
    from homellm.train.base import load_base
    from homellm.train.fused import fuse_lora
    from homellm.train.lora import apply_lora, lora_parameters
    from homellm.train.rollout import make_rollout
    from homellm.train.session import create_out, run_out

    config = config.resolved()
    out = run_out(config.out, resume)
    changed = RLConfig.load(out).resolved().same_run(config) if resume else None
    if changed:
        raise HomellmError(f"{out}: cannot resume: the run was started with different {', '.join(changed)}")
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    data = read_prompts(config.prompts)
    val = read_prompts(config.val_prompts) if config.val_prompts else None
    from homellm.catalog import resolve
    source = resolve(config.model)
    _, tokenizer, model = load_base(config.model, config.quant, device, dtype=config.dtype)
    reward = open_reward(config, tokenizer, device)  # (a reward model of another tokenizer fails here)

    skipped = list(data.problems) + (list(val.problems) if val else [])

    positions = model.args.max_position_embeddings
    limit = min(config.max_prompt_length, positions - config.max_new_tokens)
    if limit < 1:
        raise HomellmError(f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt "
                           f"in the model's {positions} positions")

    def encode(records, path):
        kept = []
        for k, r in enumerate(records):
            ids = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)
            if len(ids) > limit:
                why = f"--max-prompt-length {config.max_prompt_length}" if limit == config.max_prompt_length \
                    else f"the model's {positions} positions less --max-new-tokens {config.max_new_tokens}"
                skipped.append(f"{path}: prompt {k + 1}: {len(ids)} tokens, more than {why}")
            else:
                kept.append({**r, "ids": ids})
        return kept

    prompts = encode(data.records, config.prompts)
    val_prompts = encode(val.records, config.val_prompts) if val else []
    if not prompts:
        raise HomellmError(f"{config.prompts}: no prompt fits in {limit} tokens ({skipped[-1]})")
    apply_lora(model, config.lora, seed=config.seed)
    fuse_lora(model)
    model.train()
    params = lora_parameters(model)
    head = None
    if value_head:
        head = nn.Linear(model.args.hidden_size, 1, device=device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        params += [head.weight, head.bias]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    roller = make_rollout(model, source, device, config.rollout, config.threads)
    pad_id = tokenizer.padding_id if tokenizer.padding_id is not None else (tokenizer.eos_id or 0)
    s = RLSession(config, out, device, tokenizer, model, roller, head, params, optimizer, scheduler,
                  prompts, val_prompts, reward, KLController(config.kl_coef, config.target_kl,
                                                             config.kl_horizon),
                  RunningMoments(), pad_id, skipped=skipped, progress=progress,
                  threads_before=threads_before)
    if resume:
        s.start_step, s.history = checkpoint.restore(out, params=params, optimizer=optimizer,
                                                     scheduler=scheduler)
        state = s.history.get("state", {})
        s.kl.value = state.get("kl_coef", s.kl.value)
        if "moments" in state:
            s.moments.load(state["moments"])
        with open(out / METRICS, "w") as f:  # the log as far as the checkpoint
            f.writelines(json.dumps(log) + "\n" for log in s.history["logs"])
    else:
        create_out(out)
        config.save(out)
        (out / METRICS).write_text("")
        if val_prompts:  # the base's held-out reward and KL (0), to compare the tuned one with
            base = s.evaluate(val_prompts, adapters=False)
            s.history["base_val"] = {k: v for k, v in base.items() if k != "texts"}
            if progress is not None:
                progress({"val_only": True, "val": {"step": 0, **s.history["base_val"]},
                          "step": 0, "total": config.steps})
    s.t0 = time.perf_counter()
    return s
