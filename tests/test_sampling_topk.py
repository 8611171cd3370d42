"""The sampler's top-k over large vocabularies (Gemma 3: 262k logits) against the definition:
a stable sort of the whole vocabulary, largest first, ties in index order."""
from __future__ import annotations

import numpy as np
import pytest

from homellm.engine.sampling import TOP_K_CHUNK, Sampler, SamplingParams, top_k_indices


def reference_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, kind="stable")[:k]


@pytest.mark.parametrize("n", [7, TOP_K_CHUNK - 1, TOP_K_CHUNK, 5 * TOP_K_CHUNK + 3, 49152, 262144])
def test_top_k_indices_are_the_stable_sorts_first_k(n):
    rng = np.random.default_rng(n)
    for case in range(6):
        logits = (rng.standard_normal(n) * 4).astype(np.float32)
        if case == 1:  # many ties: logits on a coarse grid
            logits = np.round(logits).astype(np.float32)
        if case == 2:  # a grammar's mask: most tokens excluded
            logits[rng.random(n) < 0.97] = -np.inf
        if case == 3:  # all but a few excluded (fewer chunks with a finite logit than k)
            logits[:] = -np.inf
            logits[rng.choice(n, size=min(n, 50), replace=False)] = rng.standard_normal(min(n, 50))
        if case == 4:  # every logit the same
            logits[:] = 1.5
        if case == 5:  # the largest ones at the end (the partial last chunk)
            logits[-3:] = 100.0
        n_ok = int(np.isfinite(logits).sum())
        for k in sorted({1, 2, 40, n_ok - 1, n_ok}):
            if 1 <= k <= n_ok:
                got = top_k_indices(logits, k)
                np.testing.assert_array_equal(got, reference_top_k(logits, k), err_msg=f"n={n} case={case} k={k}")


def reference_sample(params: SamplingParams, logits: np.ndarray) -> int:
    """The sampler's steps with a full stable sort for the top k (the definition it keeps)."""
    rng = np.random.default_rng(params.seed)
    indices = reference_top_k(logits, params.top_k)
    values = logits[indices].astype(np.float64)
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs < params.top_p) & (probs >= params.min_p * probs[0])
    keep[0] = True
    values = values[keep] / params.temperature
    weights = np.exp(values - values.max())
    return int(indices[keep][rng.choice(len(weights), p=weights / weights.sum())])


def test_sampler_draws_what_the_full_sort_draws_on_a_large_vocabulary():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(262144) * 3).astype(np.float32)
    logits[5] = logits[9] = logits.max() + 0.5  # a tie at the top
    for seed in range(30):
        params = SamplingParams(temperature=1.5, top_k=40, top_p=0.95, min_p=0.0, seed=seed)
        assert Sampler(params)(logits, [1, 2, 3]) == reference_sample(params, logits), seed


def test_sampler_leaves_the_logits_alone():
    logits = np.arange(1000, dtype=np.float32) / 100
    before = logits.copy()
    for params in (SamplingParams(seed=1), SamplingParams(repeat_penalty=1.3, presence_penalty=0.5, seed=2)):
        Sampler(params)(logits, [999, 998, 5])
        np.testing.assert_array_equal(logits, before)
