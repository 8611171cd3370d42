"""Typed configuration of a PPO or GRPO run; saved resolved as `rl_config.json` next to the adapter.

A step is one rollout (prompts_per_step prompts x group_size completions each), its rewards,
and the updates made from it: PPO makes `epochs` passes over it in `minibatches` optimizer steps
each; GRPO makes `epochs` (default 1) passes of one optimizer step each.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from homellm.errors import HomellmError
from homellm.train.config import LoraConfig

CONFIG_FILE = "rl_config.json"
# per method: (completions per prompt, passes over a rollout, KL coefficient)
METHOD_DEFAULTS = {"ppo": (1, 4, 0.05), "grpo": (4, 1, 0.04)}


@dataclass
class RLConfig:
    method: str = "grpo"  # "ppo" or "grpo"
    model: str | None = None  # the policy: catalog name, .gguf or HF folder (None: default model)
    prompts: str = ""
    val_prompts: str | None = None  # held-out prompts: mean reward and KL at val_every
    out: str = ""
    reward: str | None = None  # a reward model folder (homellm tune rm) or a name under rewards/
    reward_fn: str | None = None  # "file.py:function(prompt, completion) -> float"
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: str = "none"
    dtype: str = "float32"
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: int = 0  # optimizer steps of linear warmup, then a constant rate
    steps: int = 100  # rollouts
    prompts_per_step: int = 8
    group_size: int | None = None  # completions per prompt (None: ppo 1, grpo 4)
    max_new_tokens: int = 64
    max_prompt_length: int = 256  # longer prompts are skipped (reported)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    micro_batch: int = 8  # sequences per forward/backward
    epochs: int | None = None  # passes over a rollout (None: ppo 4, grpo 1)
    minibatches: int = 1  # optimizer steps per pass (PPO)
    cliprange: float = 0.2  # the ratio's clip (PPO's epsilon; GRPO's too)
    # PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022)
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    reward_norm: str = "running"  # "running" (whiten by running moments), "batch" or "none"
    # the KL penalty against the reference (the policy with its adapters off)
    kl_coef: float | None = None  # None: ppo 0.05 (in the reward), grpo 0.04 (in the loss)
    target_kl: float | None = None  # nats a completion: adaptive coefficient (Ziegler et al.)
    kl_horizon: int = 10000
    # GRPO (Shao et al. 2024)
    scale_rewards: bool = True  # divide a group's advantages by its reward std
    loss_type: str = "dapo"  # "dapo": mean over every token of the batch; "grpo": per completion
    seed: int = 0
    val_every: int = 0  # steps between held-out evaluations; 0: before and after only
    save_every: int = 1  # steps between checkpoints (exact resume)
    threads: int | None = None
    device: str = "cpu"
    rollout: str = "auto"  # "auto", "native" (the C runtime), "engine" or "policy" (train/rollout.py)
    # the reference's log-probs: "auto" computes them on the C runtime when the rollouts run
    # there (the base's own blocks, int8 activations: ~1e-3 nats a token from the training
    # network's), "policy" on the training network with its adapters off
    reference: str = "auto"

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        checks = [
            (self.method in METHOD_DEFAULTS, f"method {self.method!r}: expected ppo or grpo"),
            ((self.reward is None) != (self.reward_fn is None),
             "give the reward as --reward RM (a reward model) or --reward-fn FILE.py:FUNCTION, one of them"),
            (self.quant in ("none", "int8", "int4"), f"quant {self.quant!r}: expected none, int8 or int4"),
            (self.dtype in ("float32", "bfloat16"), f"dtype {self.dtype!r}: expected float32 or bfloat16"),
            (self.lr > 0, f"learning rate {self.lr}: expected > 0"),
            (self.steps >= 1, f"steps {self.steps}: expected at least 1"),
            (self.prompts_per_step >= 1, f"prompts per step {self.prompts_per_step}: expected at least 1"),
            (self.group_size is None or self.group_size >= 1, f"group size {self.group_size}: expected at least 1"),
            (self.max_new_tokens >= 1, f"max new tokens {self.max_new_tokens}: expected at least 1"),
            (self.max_prompt_length >= 2, f"max prompt length {self.max_prompt_length}: expected at least 2"),
            (self.temperature >= 0, f"temperature {self.temperature}: expected >= 0"),
            (0 < self.top_p <= 1, f"top_p {self.top_p}: expected 0 < top_p <= 1"),
            (self.top_k >= 0, f"top_k {self.top_k}: expected >= 0"),
            (self.micro_batch >= 1, f"micro batch {self.micro_batch}: expected at least 1"),
            (self.epochs is None or self.epochs >= 1, f"epochs {self.epochs}: expected at least 1"),
            (self.minibatches >= 1, f"minibatches {self.minibatches}: expected at least 1"),
            (self.cliprange > 0, f"cliprange {self.cliprange}: expected > 0"),
            (self.cliprange_value > 0, f"cliprange_value {self.cliprange_value}: expected > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam: expected between 0 and 1"),
            (self.reward_norm in ("running", "batch", "none"),
             f"reward norm {self.reward_norm!r}: expected running, batch or none"),
            (self.kl_coef is None or self.kl_coef >= 0, f"kl coef {self.kl_coef}: expected >= 0"),
            (self.target_kl is None or self.target_kl > 0, f"target kl {self.target_kl}: expected > 0"),
            (self.loss_type in ("dapo", "grpo"), f"loss type {self.loss_type!r}: expected dapo or grpo"),
            (self.rollout in ("auto", "native", "engine", "policy"),
             f"rollout {self.rollout!r}: expected auto, native, engine or policy"),
            (self.save_every >= 0 and self.val_every >= 0, "save_every and val_every: expected >= 0"),
            (self.reference in ("auto", "policy"), f"reference {self.reference!r}: expected auto or policy"),
        ]
        for ok, message in checks:
            if not ok:
                raise HomellmError(message)

    def resolved(self) -> "RLConfig":
        """This config with the per-method defaults filled in."""
        group, epochs, kl = METHOD_DEFAULTS[self.method]
        return replace(self, group_size=self.group_size or group, epochs=self.epochs or epochs,
                       kl_coef=self.kl_coef if self.kl_coef is not None else kl)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RLConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "RLConfig":
        path = Path(folder) / CONFIG_FILE
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise HomellmError(f"{path}: cannot read the RL config ({e})") from None

    def same_run(self, other: "RLConfig") -> list[str]:
        """Fields that differ in a way that changes the run (for resuming); [] when none do."""
        ignore = {"out", "threads", "save_every", "val_every", "steps", "device"}
        a, b = self.to_json(), other.to_json()
        return [k for k in a if k not in ignore and a[k] != b[k]]
