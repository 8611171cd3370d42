"""Byte progress for pulls: the callback protocol and a tqdm bar on stderr.

A progress callback is called as `progress(n_bytes, total_bytes)` after each chunk, where
n_bytes is the chunk just written and total_bytes the size of the whole pull (None if unknown).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

Progress = Callable[[int, Optional[int]], None]


class ByteBar:
    """A tqdm bar (bytes, on stderr) usable as a progress callback; `.close()` ends it."""

    def __init__(self, desc: str = "pull"):
        self.desc = desc
        self.bar = None
        self.done = 0
        self.t0 = time.perf_counter()

    def __call__(self, n: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def speed(n_bytes: int, seconds: float | None) -> str:
    """'98.4 MB in 0.85 s (115.8 MB/s)' (decimal megabytes)."""
    mb = n_bytes / 1e6
    if not seconds or seconds <= 0:
        return f"{mb:.1f} MB"
    return f"{mb:.1f} MB in {seconds:.2f} s ({mb / seconds:.1f} MB/s)"
