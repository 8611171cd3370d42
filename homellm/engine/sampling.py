"""Sampling: the options as a dataclass, turned once into a sampler over logits.

`SamplingParams` is the one type of sampling settings: the CLI's flags are its fields, the
Python API's keywords too, and the server's GenerationSettings (serve/completion.py) is one
with the request's other fields added (logit_bias is one of those: the generation step,
engine/generate.py, adds it to the logits the sampler sees). Order of the filters follows llama.cpp: repetition penalty, top-k, top-p, min-p, then
temperature. temperature == 0 is greedy. A seed makes a run reproducible; the sampler owns
its random generator (numpy's PCG64). Any integer is a seed: OpenAI's API takes an int64 and
a CLI user may type -1, so a seed is taken modulo 2**64 (-1 and 2**64 - 1 are the same run).
No PyTorch: the C runtime's logits are numpy arrays.

Logits that are NaN or +inf are not a sampling problem but a broken model (NaN weights or
metadata): the sampler raises NonFiniteLogitsError for them, never samples from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from homellm.errors import HomellmError

SEED_MODULUS = 2**64


class NonFiniteLogitsError(HomellmError):
    """The network produced NaN or +inf logits: the model file (weights or metadata) is broken.

    `layer` is filled in where a caller could find the first layer whose output went bad
    (None: not known); `where` describes it ("layer 3", "the embedding", "the final norm").
    """

    def __init__(self, message: str = "the model produced NaN/inf logits", where: str | None = None):
        super().__init__(message)
        self.where = where


def seed_value(seed: int | None) -> int | None:
    """The seed numpy's generator takes (0 <= s < 2**64) for any integer; None stays None."""
    return None if seed is None else int(seed) % SEED_MODULUS


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
                  ("repeat_last_n", self.repeat_last_n >= 0, ">= 0"),
                  ("frequency_penalty", self.frequency_penalty == self.frequency_penalty, "a number"),
                  ("presence_penalty", self.presence_penalty == self.presence_penalty, "a number")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def sampling_params(self) -> "SamplingParams":
        """The sampler's settings alone, checked (a subclass, such as the server's
        GenerationSettings, carries more fields and may defer the checks to here)."""
        return SamplingParams(**{name: getattr(self, name) for name in SAMPLING_FIELDS})


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def split_sampling(options: dict) -> tuple[SamplingParams, dict]:
    """SamplingParams from the sampling keys of `options` (None: the default); the other keys
    are returned."""
    sampling = {k: v for k, v in options.items() if k in SAMPLING_FIELDS and v is not None}
    rest = {k: v for k, v in options.items() if k not in SAMPLING_FIELDS}
    return SamplingParams(**sampling), rest


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
        self.rng = np.random.default_rng(seed_value(params.seed))  # None: fresh OS entropy

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """A penalized copy of logits; logits themselves where no penalty applies (the caller
        never writes to either: a copy of Gemma's 262k logits costs as much as the top-k)."""
        p = self.params
        if not (p.repeat_penalty != 1.0 and p.repeat_last_n or p.frequency_penalty or p.presence_penalty) \
                or not history:
            return logits
        logits = logits.astype(np.float32, copy=True)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            vals = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
            logits[recent] = np.where(np.isnan(vals), -np.inf, vals)  # 0 * inf: excluded
        if (p.frequency_penalty or p.presence_penalty) and history:
            ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
            vals = logits[ids] - (counts.astype(np.float32) * p.frequency_penalty + p.presence_penalty)
            logits[ids] = np.where(np.isnan(vals), -np.inf, vals)  # inf - inf: excluded
        return logits

    def __call__(self, logits, history: list[int]) -> int:
        p = self.params
        logits = as_numpy(logits)
        if p.greedy and p.repeat_penalty == 1.0 and not (p.frequency_penalty or p.presence_penalty):
            return _checked_argmax(logits)  # the common case: no copy of the logits
        top = logits.max()  # NaN if any is NaN; -inf only where a mask excluded every token
        if np.isnan(top) or top == np.inf:
            raise NonFiniteLogitsError()
        logits = self.penalize(logits, history)
        if p.greedy:
            return int(logits.argmax())
        finite = np.isfinite(logits)  # -inf: excluded (e.g. by a grammar's mask)
        n_ok = int(finite.sum())
        if n_ok == 0:
            raise ValueError("every token is excluded: nothing to sample")
        if p.top_k and p.top_k < n_ok:
            indices = top_k_indices(logits, p.top_k, finite)
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


TOP_K_CHUNK = 256  # logits a chunk whose maximum bounds the top k from below


def top_k_indices(logits: np.ndarray, k: int, finite: np.ndarray | None = None) -> np.ndarray:
    """The indices of the k largest logits, largest first, ties in index order (k at most the
    count of finite logits; no NaN or +inf among them).

    Without sorting or partitioning the whole vocabulary (262k logits for Gemma 3: numpy's
    argpartition took ~3 ms a token, a third of a decode step): the maxima of chunks of
    TOP_K_CHUNK logits, and t the k-th largest of them. Those k chunks hold k logits >= t, so
    the k largest are all >= t: only the few logits >= t are sorted."""
    n = logits.shape[0]
    full = n // TOP_K_CHUNK * TOP_K_CHUNK
    maxima = logits[:full].reshape(-1, TOP_K_CHUNK).max(axis=1) if full else logits[:0]
    if full < n:
        maxima = np.append(maxima, logits[full:].max())
    if maxima.shape[0] >= k:
        t = np.partition(maxima, maxima.shape[0] - k)[maxima.shape[0] - k]
        # (t = -inf: fewer than k chunks hold a finite logit; then the finite ones are the candidates)
        cand = np.flatnonzero(logits >= t) if np.isfinite(t) else \
            np.flatnonzero(np.isfinite(logits) if finite is None else finite)
    else:
        cand = np.arange(n)
    return cand[np.argsort(-logits[cand], kind="stable")[:k]]


def biased(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """A copy of logits with `bias` added (ids past the logits' end are ignored)."""
    out = logits.astype(np.float32, copy=True)
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    keep = ids < len(out)
    out[ids[keep]] += values[keep]
    return out


def _checked_argmax(logits: np.ndarray) -> int:
    """argmax, refusing NaN/+inf (numpy's argmax returns the first NaN when there is one,
    and +inf beats every finite logit: checking the winner is enough)."""
    i = int(logits.argmax())
    if not np.isfinite(logits[i]):
        raise NonFiniteLogitsError()
    return i
