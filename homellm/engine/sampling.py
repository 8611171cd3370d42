"""Sampling: the options as a dataclass, turned once into a sampler over logits.

Order of the filters follows llama.cpp: repetition penalty, top-k, top-p, min-p, then
temperature. temperature == 0 is greedy. A seed makes a run reproducible; the sampler owns
its torch.Generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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


class Sampler:
    """Picks the next token from float32 logits (vocab,), given the ids seen so far."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None
                                   else int(torch.randint(0, 2**62, ()).item()))

    def penalize(self, logits: Tensor, history: list[int]) -> Tensor:
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            vals = logits[recent]
            logits[recent] = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if (p.frequency_penalty or p.presence_penalty) and history:
            ids, counts = torch.tensor(history, dtype=torch.long).unique(return_counts=True)
            logits[ids] -= counts.float() * p.frequency_penalty + p.presence_penalty
        return logits

    def __call__(self, logits: Tensor, history: list[int]) -> int:
        p = self.params
        if p.greedy and p.repeat_penalty == 1.0 and not (p.frequency_penalty or p.presence_penalty):
            return int(logits.argmax())  # the common case: no copy of the logits
        # on the CPU: the generator is a CPU one, and one vocab-sized copy per token is cheap
        logits = self.penalize(logits.detach().float().cpu().clone(), history)
        if p.greedy:
            return int(logits.argmax())
        if p.top_k and p.top_k < logits.numel():
            values, indices = logits.topk(p.top_k)
        else:
            values, indices = logits.sort(descending=True)
        probs = values.softmax(-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True
        values = values[keep] / p.temperature
        choice = torch.multinomial(values.softmax(-1), 1, generator=self.generator)
        return int(indices[keep][choice])
