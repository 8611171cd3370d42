"""Typed configuration of a fine-tuning run; the resolved config is saved next to the weights.

`TuneConfig` holds everything a run depends on (model, data, LoRA shape, optimizer, schedule,
batching, DPO's beta), so `training_config.json` in the output folder reproduces the run and
a resume can check that it continues the same one. The CLI flags are derived from its fields.
"""
from __future__ import annotations

import json
import math
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
from pathlib import Path

from homellm.errors import HomellmError

# short names of the projections LoRA may wrap -> the HF module names (model/llama.py)
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
CONFIG_FILE = "training_config.json"


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x, B = 0 at the start."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # short names, see TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise HomellmError(f"LoRA rank {self.rank}: expected at least 1")
        if not 0 <= self.dropout < 1:
            raise HomellmError(f"LoRA dropout {self.dropout}: expected 0 <= dropout < 1")
        unknown = [t for t in self.targets if t not in TARGETS and t not in TARGETS.values()]
        if unknown or not self.targets:
            raise HomellmError(f"LoRA targets {', '.join(unknown) or '(none)'}: expected some of "
                               f"{', '.join(TARGETS)}")
        wanted = {TARGETS.get(t, t).removesuffix("_proj") for t in self.targets}
        self.targets = [t for t in TARGETS if t in wanted]  # canonical order

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def module_names(self) -> list[str]:
        """HF names of the wrapped projections: q_proj, v_proj, ..."""
        return [TARGETS[t] for t in self.targets]


@dataclass
class TuneConfig:
    """One SFT or DPO run. Steps count optimizer updates (each over the whole global batch)."""

    method: str = "sft"  # "sft", "dpo" or "rm" (a reward model: train/reward.py)
    model: str | None = None  # catalog name, .gguf or HF folder (None: the default model)
    data: str = ""
    val: str | None = None
    out: str = ""  # output folder: adapter, resolved config, checkpoint
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: str = "none"  # frozen base weights: "none" (float), "int8" or "int4" (QLoRA-style)
    dtype: str = "float32"  # a float base: "float32" or "bfloat16" (matmuls in bf16; LoRA, norms, loss float32)
    lr: float = 1e-3  # AdamW peak rate of the LoRA weights (see DEFAULTS below)
    weight_decay: float = 0.0
    warmup: float = 0.1  # linear warmup: < 1 a fraction of the run's steps, >= 1 a number of steps
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    epochs: int | None = None  # None: auto_epochs(number of examples), resolved before the run
    max_steps: int | None = None  # None: as many as `epochs` take
    batch_size: int = 8  # examples (SFT) or pairs (DPO) per micro-batch at most
    batch_tokens: int = 4096  # padded tokens per micro-batch at most (B x longest sequence)
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_length: int = 1024  # tokens per example; longer ones are cut at the end
    grad_checkpointing: bool = False
    seed: int = 0
    beta: float = 0.1  # DPO temperature (Rafailov et al. 2023, eq. 7)
    val_every: int = 0  # steps between validation losses; 0: at the end only
    save_every: int = 0  # steps between resumable checkpoints; 0: at the end only
    max_grad_norm: float = 1.0  # 0: no clipping
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "cpu"
    warmup_steps: InitVar[int | None] = None  # the former name of `warmup` (a number of steps)

    def __post_init__(self, warmup_steps: int | None = None):
        if warmup_steps is not None:
            self.warmup = warmup_steps
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        checks = [(self.method in ("sft", "dpo", "rm"), f"method {self.method!r}: expected sft, dpo or rm"),
                  (self.quant in ("none", "int8", "int4"), f"quant {self.quant!r}: expected none, int8 or int4"),
                  (self.dtype in ("float32", "bfloat16"), f"dtype {self.dtype!r}: expected float32 or bfloat16"),
                  (self.schedule in ("cosine", "constant"), f"schedule {self.schedule!r}: expected cosine or constant"),
                  (self.lr > 0, f"learning rate {self.lr}: expected > 0"),
                  (self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
                   f"warmup {self.warmup:g}: expected a fraction of the steps (0 <= f < 1) or a "
                   f"whole number of steps"),
                  (self.epochs is None or self.epochs >= 1, f"epochs {self.epochs}: expected at least 1"),
                  (self.batch_size >= 1, f"batch size {self.batch_size}: expected at least 1"),
                  (self.max_steps is None or self.max_steps >= 1, f"steps {self.max_steps}: expected at least 1"),
                  (self.grad_accum >= 1, f"gradient accumulation {self.grad_accum}: expected at least 1"),
                  (self.max_length >= 8, f"max length {self.max_length}: expected at least 8 tokens"),
                  (self.batch_tokens >= self.max_length,
                   f"batch tokens {self.batch_tokens} must hold one example of max length {self.max_length}"),
                  (self.beta > 0, f"beta {self.beta}: expected > 0")]
        for ok, message in checks:
            if not ok:
                raise HomellmError(message)

    def warmup_steps_of(self, total: int) -> int:
        """Warmup steps in a run of `total` optimizer steps (a fraction rounds up, as
        transformers' warmup_ratio does)."""
        if self.warmup < 1:
            return math.ceil(self.warmup * total)
        return int(self.warmup)

    def resolved(self, n_items: int) -> "TuneConfig":
        """This config with what was left to the data fixed (`epochs`), for `n_items` examples."""
        return replace(self, epochs=self.epochs if self.epochs is not None else auto_epochs(n_items))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TuneConfig":
        known = {f.name for f in fields(cls)} | {"warmup_steps"}  # a config saved before `warmup`
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "TuneConfig":
        path = Path(folder) / CONFIG_FILE
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise HomellmError(f"{path}: cannot read the training config ({e})") from None

    def same_run(self, other: "TuneConfig") -> list[str]:  # both resolved
        """Fields that differ in a way that changes the run (for resuming); [] when none do."""
        ignore = {"out", "threads", "save_every", "val_every", "max_steps", "device"}
        a, b = self.to_json(), other.to_json()
        return [k for k in a if k not in ignore and a[k] != b[k]]


# Epochs when none are given: 3 passes (TRL's and transformers' default), more for a small
# file so that the run sees at least 100 examples (at most 25 passes), fewer for a big one so
# that it sees at most 25,000 (at least 1 pass): the rule OpenAI documents for its fine-tuning
# API's n_epochs "auto" (openai-cookbook, "Data preparation and analysis for chat model
# fine-tuning"). 40 examples: 3 epochs; 10 examples: 10; 20,000: 1.
TARGET_EPOCHS, MIN_SEEN, MAX_SEEN, MAX_EPOCHS = 3, 100, 25_000, 25


def auto_epochs(n_items: int) -> int:
    n = max(1, n_items)
    if n * TARGET_EPOCHS < MIN_SEEN:
        return min(MAX_EPOCHS, -(-MIN_SEEN // n))
    if n * TARGET_EPOCHS > MAX_SEEN:
        return max(1, MAX_SEEN // n)
    return TARGET_EPOCHS
