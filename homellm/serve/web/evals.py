"""The kept eval runs for the page's /evals view: the rows `homellm eval report` prints.

    GET /api/evals[?kind=ppl]    {"runs": [row, ...]}, oldest first

A row is homellm.eval.report.report_rows' (date, kind, model, hash, task, metric, value,
uncertainty, details) plus `metric_text`, the metric as the terminal table writes it. The
runs are the server's ($HOMELLM_HOME/evals), the same for every user.
"""
from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter, Depends, Query

from homellm.serve.web.context import Caller, caller


def _finite(value):
    """JSON has no NaN or infinity: such a number (a failed interval) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _rows(kind: str | None) -> list[dict]:
    from homellm.eval.report import metric_text, report_rows
    from homellm.eval.results import load_runs
    return [_finite({**row, "metric_text": metric_text(row)})
            for row in report_rows(load_runs(kind))]


def evals_router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/evals")
    async def evals(who: Caller = Depends(caller),
                    kind: str | None = Query(None, max_length=40)):
        return {"runs": await asyncio.to_thread(_rows, kind)}

    return router
