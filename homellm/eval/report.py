"""The kept eval runs side by side: one row per run (for the terminal table, JSON and the web
page) and a PNG chart of each task's headline metric by model.

    rows = report_rows(load_runs("ppl"))   # dicts: date, kind, model, hash, task, metric, ...
    print(format_table(rows))
    write_chart(rows, Path("evals.png"))   # matplotlib (pip install 'homellm[eval]')

Each kind has a headline metric (perplexity for ppl, mean KLD for kld, accuracy for tasks, win
rate for judge) with its uncertainty where the run kept one; a kind or task this module does
not know shows its first numeric metric.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from homellm.errors import HomellmError
from homellm.eval.results import EvalRun

# kind -> ((metric, uncertainty key or None, lower is better), ...) in order of preference;
# an uncertainty key holding [lo, hi] is an interval, a number is a standard error
HEADLINE = {
    "ppl": (("ppl", "ppl_err", True),),
    "kld": (("kld_mean", "kld_err", True),),
    "tasks": (("acc_norm", "acc_norm_stderr", False), ("acc", "acc_stderr", False),
              ("exact_match", "exact_match_stderr", False), ("f1", "f1_stderr", False)),
    "judge": (("win_rate", "win_rate_ci", False), ("score", "score_ci", False)),
}
# other metrics worth a glance in the table, by kind
DETAILS = {
    "ppl": ("bpb", "tokens_per_s"),
    "kld": ("same_top1", "delta_ppl", "kld_p99", "ppl"),
    "tasks": ("samples", "samples_per_s"),
    "judge": ("lc_win_rate", "wins", "ties", "losses"),
}
NOT_HEADLINES = ("_stderr", "_err", "_ci", "samples", "seconds", "_per_s", "tokens", "bytes", "chunks")


def headline(run: EvalRun) -> tuple[str, float, float | list | None, bool] | None:
    """(metric name, value, uncertainty, lower is better) of a run, or None if it has none."""
    for name, err, lower in HEADLINE.get(run.kind, ()):
        value = run.metrics.get(name)
        if _number(value):
            return name, float(value), run.metrics.get(err), lower
        # lm-eval keeps a filtered metric as "exact_match,strict-match"
        for key in sorted(run.metrics):
            if key.startswith(name + ",") and _number(run.metrics[key]):
                err_key = f"{name}_stderr,{key.split(',', 1)[1]}"
                return key, float(run.metrics[key]), run.metrics.get(err_key), lower
    for key in sorted(run.metrics):
        if _number(run.metrics[key]) and not any(s in key for s in NOT_HEADLINES):
            return key, float(run.metrics[key]), None, False
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def report_rows(runs: list[EvalRun]) -> list[dict]:
    """JSON-ready rows, oldest first."""
    rows = []
    for run in runs:
        head = headline(run)
        details = {k: run.metrics[k] for k in DETAILS.get(run.kind, ()) if _number(run.metrics.get(k))}
        for key in ("ctx", "runtime"):
            if key in run.settings:
                details[key] = run.settings[key]
        rows.append({
            "id": run.id, "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created)),
            "kind": run.kind, "model": run.model, "hash": run.model_hash, "task": run.task,
            "metric": head[0] if head else None, "value": head[1] if head else None,
            "uncertainty": head[2] if head else None, "lower_is_better": head[3] if head else None,
            "against": run.settings.get("reference_model") or run.settings.get("opponent"),
            "details": details,
        })
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v)}"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def metric_text(row: dict) -> str:
    if row["metric"] is None:
        return "-"
    text = f"{row['metric']} {_fmt(row['value'])}"
    u = row["uncertainty"]
    if _number(u):
        text += f" ± {_fmt(u)}"
    elif isinstance(u, (list, tuple)) and len(u) == 2 and all(_number(x) for x in u):
        text += f" [{_fmt(u[0])}, {_fmt(u[1])}]"
    return text


def format_table(rows: list[dict]) -> str:
    """A plain-text table: date, kind, model, hash, task, headline metric, details."""
    head = ["date", "kind", "model", "hash", "task", "metric", "details"]
    body = [[r["date"], r["kind"], r["model"], r["hash"][:12], r["task"], metric_text(r),
             ", ".join(f"{k} {_fmt(v)}" for k, v in r["details"].items())] for r in rows]
    widths = [max(len(str(line[i])) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]
    return "\n".join(lines)


def chart_groups(rows: list[dict], max_groups: int = 8) -> list[tuple[tuple, list[dict]]]:
    """(kind, task, metric, against) -> the latest run of each (model, hash), the groups with
    the most recent runs first."""
    groups: dict[tuple, dict[tuple[str, str], dict]] = {}
    for r in rows:  # oldest first: a later run of the same model replaces an earlier one
        if r["metric"] is not None:
            key = (r["kind"], r["task"], r["metric"], r.get("against"))
            groups.setdefault(key, {})[(r["model"], r["hash"])] = r
    ordered = sorted(groups.items(), key=lambda kv: max(r["id"] for r in kv[1].values()), reverse=True)
    return [(key, list(by_model.values())) for key, by_model in ordered[:max_groups]]


def write_chart(rows: list[dict], path: Path) -> Path:
    """One horizontal bar chart per (kind, task) of the headline metric by model, as a PNG
    (written to a temporary name, then renamed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HomellmError("--chart needs matplotlib: pip install 'homellm[eval]'") from None
    groups = chart_groups(rows)
    if not groups:
        raise HomellmError("no kept run has a metric to chart")
    path = Path(path)
    height = sum(1.0 + 0.45 * len(g) for _, g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, max(2.5, height)), squeeze=False)
    for ax, ((kind, task, metric, against), group) in zip(axes[:, 0], groups):
        labels = [f"{r['model']} ({r['hash'][:8]})" for r in group]
        values = [r["value"] for r in group]
        lo, hi = [], []
        for r in group:
            u = r["uncertainty"]
            if _number(u):
                lo.append(u), hi.append(u)
            elif isinstance(u, (list, tuple)) and len(u) == 2 and all(_number(x) for x in u):
                lo.append(max(r["value"] - u[0], 0.0)), hi.append(max(u[1] - r["value"], 0.0))
            else:
                lo.append(0.0), hi.append(0.0)
        y = list(range(len(group)))
        ax.barh(y, values, xerr=[lo, hi], color="#4c72b0", ecolor="#333333", capsize=3)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        better = "lower" if group[0]["lower_is_better"] else "higher"
        ax.set_title(f"{kind}: {task}" + (f" vs {against}" if against else ""), loc="left", fontsize=10)
        ax.set_xlabel(f"{metric} ({better} is better)", fontsize=9)
        for yi, v, h in zip(y, values, hi):
            ax.annotate(_fmt(v), (v + h, yi), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=8)
        ax.margins(x=0.15)
    fig.tight_layout()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                   suffix=".part")
    except OSError as e:
        plt.close(fig)
        raise HomellmError(f"--chart {path}: cannot write there: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise HomellmError(f"--chart {path}: cannot write it: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
