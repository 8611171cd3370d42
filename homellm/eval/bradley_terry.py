"""Bradley-Terry ratings of models from pairwise votes, on the Elo scale, with bootstrap
intervals: the arena's leaderboard.

    board = leaderboard([("smollm2:135m", "mine:sft", "b"), ("mine:sft", "tiny", "tie"), ...])
    board["models"][0]  # {"model", "rating", "ci": [low, high], "votes", "wins", "ties", ...}

The model (Bradley & Terry 1952), as Chatbot Arena fits it (Chiang et al. 2024, "Chatbot
Arena", section 5): each model i has a strength beta_i and

    P(i beats j) = sigmoid(beta_i - beta_j) = 1 / (1 + 10 ** ((R_j - R_i) / 400))

with the rating R_i = 1000 + 400 / ln(10) * (beta_i - mean(beta)): the Elo scale (scale 400,
base 10), anchored so that the models' mean rating is 1000. beta maximises the likelihood of
the votes, a logistic regression without intercept on +1/-1 model indicators; a vote for A
is a win of A, a tie half a win each way (LMSYS duplicates each tie as one win each way at
weight 1/2, which is the same likelihood), and "both bad" is a tie too (LMSYS's "tie
(bothbad)"). Which side a model sat on does not enter (no position term).

The fit is Newton's method on the counts per pair of models, with a tiny L2 term (1e-6, as
LMSYS's logistic regression with C = 1e6) that makes the answer unique and finite: a model
that never lost has no finite maximum-likelihood rating, and gets a large one with an
interval to match. The 95% interval is the percentile bootstrap over battles (Efron &
Tibshirani ch. 13, as eval/stats.py does for other comparisons): resampling n battles with
replacement only changes how many of each kind (pair, outcome) there are, so a resample is
one multinomial draw over those kinds, whatever the number of battles.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from homellm.eval.stats import CONFIDENCE, N_BOOT

SCALE = 400.0            # Elo points per factor BASE in the odds
BASE = 10.0
ANCHOR = 1000.0          # the models' mean rating
L2 = 1e-6                # on beta (natural log-odds units)
VOTE_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}   # A's score for each vote
MAX_NEWTON = 100


def elo(beta: np.ndarray) -> np.ndarray:
    """Strengths (log-odds units) -> ratings on the Elo scale, mean ANCHOR (last axis)."""
    centred = beta - beta.mean(axis=-1, keepdims=True)
    return ANCHOR + SCALE / math.log(BASE) * centred


def _nll(beta, x, n, s, l2):
    d = x @ beta
    # -[s log sigmoid(d) + (n - s) log sigmoid(-d)], stably: log sigmoid(x) = -logaddexp(0, -x)
    return float(np.sum(s * np.logaddexp(0, -d) + (n - s) * np.logaddexp(0, d))
                 + 0.5 * l2 * beta @ beta)


def fit(i: np.ndarray, j: np.ndarray, n: np.ndarray, s: np.ndarray, k: int, *,
        l2: float = L2, start: np.ndarray | None = None) -> np.ndarray:
    """beta (k,) maximising the Bradley-Terry likelihood of pair counts: for each pair p,
    models i[p] and j[p] met n[p] times (weights) and i[p] scored s[p] of them (ties 1/2).

    Newton's method with step halving; the penalised problem is strictly convex."""
    beta = np.zeros(k) if start is None else np.array(start, dtype=np.float64)
    x = np.zeros((len(i), k))                                   # (P, k): +1 at i, -1 at j
    x[np.arange(len(i)), i] = 1.0
    x[np.arange(len(j)), j] = -1.0
    ridge = l2 * np.eye(k)
    loss = _nll(beta, x, n, s, l2)
    for _ in range(MAX_NEWTON):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))                   # (P,) P(i beats j)
        grad = x.T @ (n * p - s) + l2 * beta
        hess = x.T @ (x * (n * p * (1.0 - p))[:, None]) + ridge
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            new = beta - t * step
            new_loss = _nll(new, x, n, s, l2)
            if new_loss <= loss + 1e-12 * abs(loss) or t < 1e-6:
                break
            t /= 2
        beta, loss = new, new_loss
        change = t * step
        # converged once the differences stop moving (shifting every beta alike changes no
        # probability, and the tiny L2 term makes that direction too ill-conditioned to
        # settle below ~1e-7)
        if np.abs(change - change.mean()).max() < 1e-9:
            break
    return beta


def _kinds(outcomes: list[tuple[str, str, str]]):
    """Models (sorted), and per kind of battle (unordered pair, A's score): the pair's model
    indices (i < j), i's score and how many battles were of that kind."""
    models = sorted({m for a, b, _ in outcomes for m in (a, b)})
    index = {m: x for x, m in enumerate(models)}
    kinds: dict[tuple[int, int, float], int] = {}
    for a, b, vote in outcomes:
        if vote not in VOTE_SCORE:
            raise ValueError(f"vote {vote!r}: expected one of {', '.join(VOTE_SCORE)}")
        if a == b:
            raise ValueError(f"a battle of {a!r} against itself")
        ia, ib, score = index[a], index[b], VOTE_SCORE[vote]
        key = (ia, ib, score) if ia < ib else (ib, ia, 1.0 - score)
        kinds[key] = kinds.get(key, 0) + 1
    keys = list(kinds)
    i = np.array([x[0] for x in keys], dtype=np.int64)
    j = np.array([x[1] for x in keys], dtype=np.int64)
    score = np.array([x[2] for x in keys], dtype=np.float64)
    count = np.array([kinds[x] for x in keys], dtype=np.float64)
    return models, i, j, score, count


def _unbounded(st: dict) -> str | None:
    """"no losses" / "no wins" for a model whose maximum-likelihood rating is infinite (its
    shown rating comes from the tiny L2 term alone), else None. (Necessary, not sufficient
    with three or more models: a group that never lost to the others is unbounded too.)"""
    if st["losses"] + st["ties"] == 0:
        return "no losses"
    if st["wins"] + st["ties"] == 0:
        return "no wins"
    return None


def ratings(outcomes: Iterable[tuple[str, str, str]], *, l2: float = L2) -> dict[str, float]:
    """{model: Elo-scale rating} from (model_a, model_b, vote) battles."""
    outcomes = list(outcomes)
    if not outcomes:
        return {}
    models, i, j, score, count = _kinds(outcomes)
    beta = fit(i, j, count, count * score, len(models), l2=l2)
    return dict(zip(models, elo(beta).tolist()))


def leaderboard(outcomes: Iterable[tuple[str, str, str]], *, n_boot: int = N_BOOT,
                confidence: float = CONFIDENCE, seed: int = 0, l2: float = L2) -> dict:
    """The ratings of every model in `outcomes` ((model_a, model_b, vote) with vote "a", "b",
    "tie" or "both_bad"), best first, each with its bootstrap interval, its vote counts and
    `unbounded` ("no losses" / "no wins" when its rating has no finite estimate yet)."""
    outcomes = list(outcomes)
    out = {"battles": len(outcomes), "n_boot": n_boot, "confidence": confidence,
           "scale": SCALE, "base": BASE, "anchor": ANCHOR, "models": []}
    if not outcomes:
        return out
    models, i, j, score, count = _kinds(outcomes)
    k, n = len(models), len(outcomes)
    beta = fit(i, j, count, count * score, k, l2=l2)
    rating = elo(beta)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, count / n, size=n_boot).astype(np.float64)  # (n_boot, kinds)
    boot = np.stack([elo(fit(i, j, c, c * score, k, l2=l2, start=beta)) for c in draws])
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)            # (k,) each

    stats = {m: {"votes": 0, "wins": 0, "losses": 0, "ties": 0, "both_bad": 0} for m in models}
    for a, b, vote in outcomes:
        for me, other_won, i_won in ((a, vote == "b", vote == "a"), (b, vote == "a", vote == "b")):
            st = stats[me]
            st["votes"] += 1
            st["wins"] += i_won
            st["losses"] += other_won
            st["ties"] += vote in ("tie", "both_bad")
            st["both_bad"] += vote == "both_bad"
    rows = [{"model": m, "rating": float(rating[x]), "ci": [float(low[x]), float(high[x])],
             **stats[m], "unbounded": _unbounded(stats[m])} for x, m in enumerate(models)]
    rows.sort(key=lambda r: (-r["rating"], r["model"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    out["models"] = rows
    return out
