"""Typed configuration of a pretraining run, and the size dial; no torch or numpy at import
(the CLI's flags derive from it, and `homellm --help` stays instant). The run itself is
train/pretrain.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from homellm.errors import HomellmError

if TYPE_CHECKING:  # model/config.py imports numpy; `homellm --help` imports this module
    from homellm.model.config import ModelArgs

CONFIG_FILE, HISTORY_FILE = "pretrain_config.json", "history.json"
# named points on the depth dial
SIZES = {"nano": 2, "micro": 4, "mini": 6, "small": 8, "base": 12, "medium": 16, "large": 20}
TOKENS_PER_PARAM = 20


@dataclass
class PretrainConfig:
    data: str = ""  # a corpus folder (homellm data prepare + tokenizer train)
    out: str = ""
    size: str | None = None  # a name from SIZES
    depth: int | None = None  # or the depth itself
    seq_len: int = 512
    steps: int | None = None  # None: from `tokens`, else the compute-optimal budget
    tokens: int | None = None
    batch_tokens: int = 32768  # tokens per optimizer step, all processes together
    device_batch: int = 8  # sequences per micro-batch (forward + backward at once)
    optimizer: str = "adamw"  # or "muon" (matrices; AdamW for embeddings and norms)
    lr: float = 2e-3  # AdamW's peak rate (the embeddings' under Muon)
    muon_lr: float = 0.02
    weight_decay: float = 0.1  # on matrices only
    schedule: str = "cosine"  # or "wsd": warmup, stable, then a linear decay
    warmup: float = 0.05  # < 1: a fraction of the steps, else a number of steps
    decay: float = 0.2  # wsd: the fraction of steps that decay
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # or "bfloat16": autocast matmuls, float32 weights and optimizer
    compile: bool | None = None  # None: where it measured faster (pretrain.compile_default)
    attention: str = "auto"  # "sdpa", "blocks" (pretrain.block_causal_attention) or auto
    fuse: bool = False  # q/k/v and gate/up projections each as one matmul (same weights; see the benchmark)
    val_every: int = 0  # steps between validations; 0: at the end only
    val_tokens: int = 65536
    save_every: int = 0  # steps between resumable checkpoints; 0: at the end only
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    fsdp: bool = False
    peak_flops: float | None = None  # the device's peak FLOP/s for MFU (None: an estimate)

    def __post_init__(self):
        checks = [
            (self.size is None or self.size in SIZES,
             f"size {self.size!r}: expected one of {', '.join(f'{k} (depth {v})' for k, v in SIZES.items())}"),
            (self.depth is None or self.depth >= 1, f"depth {self.depth}: expected at least 1"),
            (not (self.size and self.depth), "give --size or --depth, not both"),
            (self.seq_len >= 2, f"seq len {self.seq_len}: expected at least 2"),
            (self.steps is None or self.steps >= 1, f"steps {self.steps}: expected at least 1"),
            (self.tokens is None or self.tokens >= 1, f"tokens {self.tokens}: expected at least 1"),
            (not (self.steps and self.tokens), "give --steps or --tokens, not both"),
            (self.device_batch >= 1, f"device batch {self.device_batch}: expected at least 1"),
            (self.optimizer in ("adamw", "muon"), f"optimizer {self.optimizer!r}: expected adamw or muon"),
            (self.schedule in ("cosine", "wsd", "constant"), f"schedule {self.schedule!r}: expected cosine or wsd"),
            (self.lr > 0 and self.muon_lr > 0, "learning rates must be > 0"),
            (self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
             f"warmup {self.warmup:g}: expected a fraction (0 <= f < 1) or a whole number of steps"),
            (0 <= self.decay <= 1, f"decay {self.decay}: expected a fraction of the steps"),
            (self.dtype in ("float32", "bfloat16"), f"dtype {self.dtype!r}: expected float32 or bfloat16"),
            (self.attention in ("auto", "sdpa", "blocks"),
             f"attention {self.attention!r}: expected auto, sdpa or blocks"),
            (self.val_tokens >= 1, f"val tokens {self.val_tokens}: expected at least 1"),
            (not (self.fsdp and self.optimizer == "muon"),
             "--fsdp shards each matrix, and Muon orthogonalizes whole matrices: use --optimizer adamw"),
            (not (self.fsdp and self.save_every),
             "--fsdp runs keep no resumable checkpoint yet (each process holds a shard): drop --save-every"),
        ]
        for ok, message in checks:
            if not ok:
                raise HomellmError(message)

    @property
    def the_depth(self) -> int:
        return self.depth if self.depth is not None else SIZES[self.size or "micro"]

    def save(self, folder: Path):
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "PretrainConfig":
        path = Path(folder) / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise HomellmError(f"{path}: cannot read the pretraining config ({e})") from None

    def same_run(self, other: "PretrainConfig") -> list[str]:
        ignore = {"out", "threads", "save_every", "val_every", "device", "compile", "attention",
                  "peak_flops"}
        a, b = asdict(self), asdict(other)
        return [k for k in a if k not in ignore and a[k] != b[k]]


def model_args(depth: int, vocab_size: int, seq_len: int) -> ModelArgs:
    """The network for a point on the depth dial (nanochat's aspect ratio of 64)."""
    from homellm.model.config import ModelArgs
    hidden = 64 * depth
    ffn = 64 * math.ceil(hidden * 8 / 3 / 64)
    return ModelArgs(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=depth,
                     num_key_value_heads=depth, intermediate_size=ffn, vocab_size=vocab_size,
                     head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=seq_len, tie_word_embeddings=True)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (the head included, the
    embedding lookup not) plus attention's 12 x layers x width x context (PaLM, appendix B)."""
    h, L = args.hidden_size, args.num_hidden_layers
    d, nq, nkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
    per_layer = h * d * (2 * nq + 2 * nkv) + 3 * h * args.intermediate_size
    return 6 * (L * per_layer + h * args.vocab_size) + 12 * L * nq * d * seq_len
