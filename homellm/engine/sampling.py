"""Sampling: the options as a dataclass, turned once into a sampler over logits.

Order of the filters follows llama.cpp: repetition penalty, top-k, top-p, min-p, then
temperature. temperature == 0 is greedy. A seed makes a run reproducible; the sampler owns
its random generator (numpy's PCG64). No PyTorch: the C runtime's logits are numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1.0 disables
    min_p: float = 0.05        # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables (CTRL-style: divide positive logits, multiply negative)
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0  # OpenAI-style, subtracted per occurrence
    presence_penalty: float = 0.0   # OpenAI-style, subtracted once per seen token
    seed: int | None = None

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("repeat_penalty", self.repeat_penalty > 0, "> 0"),
                  ("repeat_last_n", self.repeat_last_n >= 0, ">= 0")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def as_numpy(logits) -> np.ndarray:
    """float32 logits as a numpy array: the C runtime's as they are, a torch tensor's (any
    device) copied to the CPU. Sampling runs on the CPU in numpy for every backend."""
    if isinstance(logits, np.ndarray):
        return logits
    return logits.detach().float().cpu().numpy()


class Sampler:
    """Picks the next token from float32 logits (vocab,), given the ids seen so far.

    Logits may be a numpy array or a torch tensor; they are never changed in place."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)  # seed None: fresh OS entropy

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """A penalized copy of logits."""
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if (p.frequency_penalty or p.presence_penalty) and history:
            ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
            logits[ids] -= counts.astype(np.float32) * p.frequency_penalty + p.presence_penalty
        return logits

    def __call__(self, logits, history: list[int]) -> int:
        p = self.params
        logits = as_numpy(logits)
        if p.greedy and p.repeat_penalty == 1.0 and not (p.frequency_penalty or p.presence_penalty):
            return int(logits.argmax())  # the common case: no copy of the logits
        logits = self.penalize(logits, history)
        if p.greedy:
            return int(logits.argmax())
        finite = np.isfinite(logits)  # -inf: excluded (e.g. by a grammar's mask)
        n_ok = int(finite.sum())
        if n_ok == 0:
            raise ValueError("every token is excluded: nothing to sample")
        if p.top_k and p.top_k < n_ok:
            part = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
            indices = part[np.argsort(-logits[part], kind="stable")]
        else:
            indices = np.argsort(-logits, kind="stable")[:n_ok]
        values = logits[indices].astype(np.float64)
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        keep = np.ones(len(probs), dtype=bool)
        if p.top_p < 1.0:
            before = np.cumsum(probs) - probs  # mass of strictly more likely tokens
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True
        values = values[keep] / p.temperature
        weights = np.exp(values - values.max())
        choice = self.rng.choice(len(weights), p=weights / weights.sum())
        return int(indices[keep][choice])
