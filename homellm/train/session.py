"""What the SFT and DPO loops share: processes, data, the model with adapters, the optimizer
and schedule, resume, validation batches, logging and the files written at the end.

Under `torchrun` (WORLD_SIZE > 1) the processes join a process group (gloo on CPU, NCCL on
CUDA) and the loss module is wrapped in DistributedDataParallel: each process computes its
share of every step's micro-batches (batches.my_share) and DDP sums the adapters' gradients.
Losses are normalized by the whole global step's count (tokens or pairs) and multiplied by
the world size (DDP averages), so N processes compute the update one process computes with
N times the gradient accumulation.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from homellm.errors import HomellmError
from homellm.train import checkpoint
from homellm.train.config import TuneConfig


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = torch.device(device)
        if world <= 1:
            return cls(0, 1, dev)
        import torch.distributed as dist
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


@dataclass
class TuneResult:
    out: Path
    steps: int
    losses: list[float]  # training loss of each step
    val: list[dict]  # {"step", "loss", ...} at each validation
    tokens: int  # tokens (prompt and reply, no padding) processed, all processes
    seconds: float
    skipped: list[str] = field(default_factory=list)  # data problems, "FILE:LINE: ..."
    stopped: bool = False  # stopped early (stop_after) with a checkpoint to resume from
    warnings: list[str] = field(default_factory=list)  # about the settings (Session.warnings)
    config: TuneConfig | None = None  # as run: epochs resolved

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def writable_out(out: str | Path) -> Path:
    """The output folder, checked writable before anything slow happens (created later, by
    `create_out`, so a run that fails before training leaves nothing behind)."""
    if not out:
        raise HomellmError("no output folder: give --out PATH")
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise HomellmError(f"cannot write to the output folder {path}: it exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        raise HomellmError(f"cannot write to the output folder {path}: {existing} {why}")
    return path


def run_out(out: str | Path, resume: bool) -> Path:
    """`writable_out`, and a checkpoint there exactly when resuming: a resumed run needs one, a
    new run must not write over an earlier run's."""
    path = writable_out(out)
    saved = checkpoint.path_in(path)
    if resume and not saved.is_file():
        raise HomellmError(f"{path}: no checkpoint to resume from ({saved} is missing)")
    if not resume and saved.is_file():
        raise HomellmError(f"{path}: holds a checkpoint of an earlier run; resume it (--resume) "
                           f"or choose another output folder")
    return path


def create_out(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HomellmError(f"cannot write to the output folder {path}: {e.strerror or e}") from None
    return path


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one process at one step (LoRA dropout): fixed by the step, so a
    resumed run draws the same masks."""
    return (seed * 1_000_003 + step * 4099 + rank) % (2 ** 63)


@dataclass
class Session:
    config: TuneConfig
    procs: Processes
    out: Path
    tokenizer: object
    model: nn.Module  # the Llama with LoRALinear layers
    module: nn.Module  # LabelledLogprobs over it, DDP-wrapped under torchrun
    items: list
    val_items: list
    steps: list  # step -> micro-batches (batches.plan_steps)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pad_id: int
    start_step: int = 0
    history: dict = field(default_factory=lambda: {"losses": [], "val": [], "tokens": 0, "seconds": 0.0})
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the settings, e.g. a warmup past the end
    progress: object = None
    threads_before: int = 0  # torch's thread count before the run (restored at the end)
    t0: float = field(default_factory=time.perf_counter)

    def sync(self, last: bool):
        """DDP all-reduces gradients on the last backward pass of a step only."""
        if self.procs.world > 1 and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def update(self):
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_tokens(self, step: int) -> int:
        return sum(len(ids) for mb in self.steps[step] for i in mb for ids, _ in self.items[i].rows)

    def after_step(self, step: int, loss: float, validate) -> None:
        """Record the loss; validate and checkpoint when due; report progress."""
        c, h = self.config, self.history
        h["losses"].append(loss)
        h["tokens"] += self.step_tokens(step)
        elapsed = h["seconds"] + time.perf_counter() - self.t0
        done = step + 1
        val = None
        if self.val_items and ((c.val_every and done % c.val_every == 0) or done == len(self.steps)):
            val = {"step": done, **validate()}
            h["val"].append(val)
        if c.save_every and done % c.save_every == 0 and done < len(self.steps):
            self.save_checkpoint(done)
        if self.progress is not None and self.procs.main:
            self.progress({"step": done, "total": len(self.steps), "loss": loss,
                           "lr": self.scheduler.get_last_lr()[0], "tokens": h["tokens"],
                           "tokens_per_s": h["tokens"] / max(elapsed, 1e-9), "val": val})

    def save_checkpoint(self, step: int, barrier: bool = True):
        """Checkpoint after `step` completed steps (barrier=False: on Ctrl-C, when the other
        processes may be gone)."""
        self.history["seconds"] += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        if self.procs.main:
            checkpoint.save(self.out, step=step, params=self.params, optimizer=self.optimizer,
                            scheduler=self.scheduler, history=self.history)
        if barrier:
            self.procs.barrier()

    def finish(self, step: int, stopped: bool) -> TuneResult:
        """Write the adapter and the resolved config (and a checkpoint when stopped early)."""
        from homellm.train.adapter import save_adapter
        if stopped:
            self.save_checkpoint(step)
        else:
            self.history["seconds"] += time.perf_counter() - self.t0
            self.t0 = time.perf_counter()
        if self.procs.main:
            save_adapter(self.model, self.config.lora, self.out, self.config.model)
            self.config.save(self.out)
        self.procs.barrier()
        if self.threads_before:
            torch.set_num_threads(self.threads_before)
        h = self.history
        return TuneResult(self.out, step, list(h["losses"]), list(h["val"]), h["tokens"],
                          h["seconds"], self.skipped, stopped, self.warnings, self.config)


def setup(config: TuneConfig, resume: bool = False, progress=None) -> Session:
    """Everything before the first step; every error a user can cause is raised here."""
    from homellm.data import conversations
    from homellm.train.base import load_base
    from homellm.train.batches import dpo_item, plan_steps, sft_item
    from homellm.train.fused import fuse_lora
    from homellm.train.loss import LabelledLogprobs
    from homellm.train.lora import apply_lora, lora_parameters
    from homellm.train.schedule import lr_factor

    kind = config.method
    out = run_out(config.out, resume)
    if resume:
        before = TuneConfig.load(out)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    procs = Processes.from_env(config.device)
    torch.manual_seed(config.seed)

    data = conversations.read(config.data, kind)
    val = conversations.read(config.val, kind) if config.val else None
    ckpt, tokenizer, model = load_base(config.model, config.quant, procs.device, dtype=config.dtype)
    make = sft_item if kind == "sft" else dpo_item

    def encode(records):
        items = [make(tokenizer, r["messages"] if kind == "sft" else r, config.max_length)
                 for r in records]
        return [it for it in items if it is not None]

    items = encode(data.records)
    val_items = encode(val.records) if val else []
    if not items:
        raise HomellmError(f"{config.data}: no example has reply tokens within "
                           f"--max-length {config.max_length}")
    config = config.resolved(len(items))
    if resume:
        changed = before.same_run(config)
        if changed:
            raise HomellmError(f"{out}: cannot resume: the run was started with different "
                               f"{', '.join(changed)}")
    apply_lora(model, config.lora, seed=config.seed)
    fuse_lora(model)
    model.train()  # LoRA dropout
    params = lora_parameters(model)
    module: nn.Module = LabelledLogprobs(model, config.grad_checkpointing)
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(module, broadcast_buffers=False,
                                         device_ids=[procs.device] if procs.device.type == "cuda" else None)
    steps = plan_steps(items, config.batch_tokens, config.grad_accum * procs.world, config.seed,
                       config.epochs, config.max_steps, config.batch_size)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = len(steps)
    warmup = config.warmup_steps_of(total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.schedule, config.min_lr_ratio))
    warnings = []
    if warmup > total:
        warnings.append(f"the run has {total} optimizer step{'s' * (total != 1)} but a warmup of "
                        f"{warmup}: the learning rate never reaches {config.lr:g} (give --warmup as "
                        f"a fraction of the run, e.g. 0.1, or train longer)")
    pad_id = tokenizer.padding_id if tokenizer.padding_id is not None else (tokenizer.eos_id or 0)
    session = Session(config, procs, out, tokenizer, model, module, items, val_items, steps, params,
                      optimizer, scheduler, pad_id, skipped=data.problems + (val.problems if val else []),
                      progress=progress, threads_before=threads_before, warnings=warnings)
    if progress is not None and procs.main:
        for text in warnings:
            progress({"warning": text})
    if resume:
        session.start_step, session.history = checkpoint.restore(
            out, params=params, optimizer=optimizer, scheduler=scheduler)
    elif procs.main:
        create_out(out)
        config.save(out)
    session.t0 = time.perf_counter()
    return session
