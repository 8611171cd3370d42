"""The learning-rate schedule: linear warmup, then cosine decay (or constant).

lr(step) = lr * factor(step): factor rises linearly over the warmup steps to 1 (step k of the
warmup uses (k + 1) / warmup), then follows half a cosine from 1 to min_ratio at the last
step (Loshchilov & Hutter 2017, without restarts).
"""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine",
              min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
