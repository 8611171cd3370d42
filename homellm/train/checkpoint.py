"""Exact resume: everything a run needs to continue as if it had never stopped.

`<out>/checkpoint/state.pt` holds the adapters' weights, AdamW's moments, the scheduler, the
data position (the step number: batches.py plans each step's data from the seed alone), the
RNG states, and the losses so far. It is written to a temporary file and renamed, so a run
killed while saving keeps the previous checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from homellm.errors import HomellmError

FOLDER = "checkpoint"
STATE = "state.pt"


def path_in(out: Path) -> Path:
    return Path(out) / FOLDER / STATE


def save(out: Path, *, step: int, params: list[torch.nn.Parameter], optimizer, scheduler,
         history: dict) -> Path:
    path = path_in(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": [p.detach().clone() for p in params],
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.random.get_rng_state(), "python": random.getstate()},
             "history": history}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state.", suffix=".part")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def restore(out: Path, *, params: list[torch.nn.Parameter], optimizer, scheduler) -> tuple[int, dict]:
    """Load the checkpoint into params, optimizer, scheduler and the RNGs; (step, history)."""
    path = path_in(out)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise HomellmError(f"{path}: cannot read the checkpoint to resume from ({e})") from None
    if len(state["params"]) != len(params) or any(
            a.shape != b.shape for a, b in zip(state["params"], params)):
        raise HomellmError(f"{path}: the checkpoint's adapters do not match this run's LoRA settings")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), state["history"]
