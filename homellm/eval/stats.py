"""Statistics of model-vs-model comparisons: bootstrap intervals, win / tie / loss rates and
the length-controlled win rate.

    low, high = bootstrap_interval(n, lambda idx: scores[idx].mean())   # 95% over the items
    summary = pairwise_summary(outcomes, len_a, len_b)                  # win / tie / loss, LC

The bootstrap resamples the items (questions, battles) with replacement and takes the
percentile interval of the statistic (Efron & Tibshirani, "An Introduction to the Bootstrap",
ch. 13). It is seeded, so the same results give the same interval.

The length-controlled win rate follows the idea of AlpacaEval's (Dubois et al. 2024,
"Length-Controlled AlpacaEval", eq. 1-2), in its simplest form: a logistic regression of the
preference for A on the length difference, P(A preferred) = sigmoid(theta + phi * x) with
x = tanh((len_A - len_B) / std(len_A - len_B)), fitted to the outcomes (a tie counts 1/2);
the length-controlled rate is the fit with the length term set to 0, sigmoid(theta). Without
AlpacaEval's per-model and per-instruction terms (there are two models and one set of
questions). phi carries an L2 penalty (a weak prior that length does not matter), so a judge
whose verdicts follow the length exactly still gives a finite fit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

N_BOOT = 1000
CONFIDENCE = 0.95
LENGTH_PENALTY = 1.0  # L2 weight on phi (a N(0, 1) prior on the length term)
INTERCEPT_PENALTY = 1e-3  # keeps theta finite when every outcome is the same
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def bootstrap_interval(n: int, statistic: Callable[[np.ndarray], float], n_boot: int = N_BOOT,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of `statistic(indices)` over `n_boot` resamples of range(n).

    statistic receives an int array of n indices drawn with replacement. (nan, nan) for n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def mean_interval(values: Sequence[float], n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                  seed: int = 0) -> tuple[float, float]:
    """bootstrap_interval of the mean, all resamples at once."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def length_feature(len_a: Sequence[float], len_b: Sequence[float]) -> np.ndarray:
    """x = tanh(delta / std(delta)), delta = len_A - len_B; zeros when the lengths never differ."""
    delta = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    scale = delta.std()
    return np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)


def fit_length_model(y: np.ndarray, x: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """(theta, phi) minimising the cross-entropy of sigmoid(theta + phi x) against the soft
    labels y in [0, 1], plus LENGTH_PENALTY/2 phi^2 + INTERCEPT_PENALTY/2 theta^2. The problem
    is strictly convex: Newton's method from (0, 0) converges in a few steps."""
    w = np.zeros(2)
    features = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    penalty = np.array([INTERCEPT_PENALTY, LENGTH_PENALTY])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(features @ w)))
        grad = features.T @ (p - y) + penalty * w
        hess = (features * (p * (1 - p))[:, None]).T @ features + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_rate(y: Sequence[float], x: Sequence[float]) -> float:
    """sigmoid(theta) of fit_length_model: the win rate with the length term set to 0."""
    theta, _ = fit_length_model(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    return float(1.0 / (1.0 + np.exp(-theta)))


def pairwise_summary(outcomes: Sequence[str], len_a: Sequence[float], len_b: Sequence[float],
                     n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Win / tie / loss of A against B over the questions that have an outcome ("win", "tie",
    "loss" from A's side), each rate with its 95% bootstrap interval over the questions; the
    raw win rate (a tie counts 1/2) and the length-controlled one, both with intervals.

    len_a, len_b: the answers' lengths (characters), one per outcome."""
    if not len(outcomes) == len(len_a) == len(len_b):
        raise ValueError("pairwise_summary: one length pair per outcome")
    n = len(outcomes)
    nan = float("nan")
    out: dict = {"n": n}
    if n == 0:  # every question failed: counts of 0, rates not defined
        for kind, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
            out.update({plural: 0, f"{kind}_rate": nan, f"{kind}_rate_ci": [nan, nan]})
        for rate in ("win_rate_raw", "lc_win_rate"):
            out.update({rate: nan, f"{rate}_ci": [nan, nan]})
        return {**out, "mean_length_a": nan, "mean_length_b": nan}
    kinds = np.array(outcomes)
    for kind, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
        hits = (kinds == kind).astype(np.float64)
        out[plural] = int(hits.sum())
        out[f"{kind}_rate"] = float(hits.mean())
        out[f"{kind}_rate_ci"] = list(mean_interval(hits, n_boot, seed=seed))
    y = np.array([OUTCOME_SCORE[k] for k in outcomes], dtype=np.float64)
    x = length_feature(len_a, len_b)
    out["win_rate_raw"] = float(y.mean())
    out["win_rate_raw_ci"] = list(mean_interval(y, n_boot, seed=seed))
    out["lc_win_rate"] = length_controlled_rate(y, x)
    out["lc_win_rate_ci"] = list(bootstrap_interval(
        n, lambda idx: length_controlled_rate(y[idx], x[idx]), n_boot, seed=seed))
    out["mean_length_a"] = float(np.mean(len_a))
    out["mean_length_b"] = float(np.mean(len_b))
    return out
