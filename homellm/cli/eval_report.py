"""`homellm eval report`: the kept eval runs side by side, and a chart.

    homellm eval report                         every run: date, kind, model, hash, task, metric
    homellm eval report --kind ppl --task wiki.txt
    homellm eval report --chart evals.png       + a PNG (pip install 'homellm[eval]')
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from homellm.errors import HomellmError

HELP = "compare kept eval runs: a table (model, hash, task, metrics, date) and a PNG chart"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--kind", default=None, help="only runs of this kind: ppl, kld, tasks or judge")
    p.add_argument("--task", default=None, help="only runs of this task (data file, lm-eval task, question set)")
    p.add_argument("--model", default=None, help="only runs whose model name contains this text")
    p.add_argument("--chart", default=None, metavar="FILE.png",
                   help="also write a chart of each task's headline metric by model (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")


def main(args: argparse.Namespace) -> int:
    from homellm.eval.report import format_table, report_rows, write_chart
    from homellm.eval.results import evals_dir, load_runs

    chart = Path(args.chart) if args.chart else None
    if chart is not None:
        if chart.suffix.lower() != ".png":
            raise HomellmError(f"--chart {chart}: expected a .png file name")
        folder = chart.parent if str(chart.parent) else Path(".")
        if not folder.is_dir():
            raise HomellmError(f"--chart {chart}: folder {folder} does not exist")
        try:
            importlib.import_module("matplotlib")  # checked before any work
        except ImportError:
            raise HomellmError("--chart needs matplotlib: pip install 'homellm[eval]'") from None
    runs = load_runs(args.kind)
    if args.task is not None:
        runs = [r for r in runs if r.task == args.task]
    if args.model is not None:
        runs = [r for r in runs if args.model in r.model]
    if not runs:
        what = " ".join(f"--{k} {v}" for k, v in (("kind", args.kind), ("task", args.task),
                                                 ("model", args.model)) if v is not None)
        msg = f"no kept eval runs{' for ' + what if what else ''} in {evals_dir()}"
        if chart is not None:
            raise HomellmError(f"{msg}: nothing to chart")
        print(f"{msg} (homellm eval ppl / tasks / judge keep their runs there)")
        return 0
    rows = report_rows(runs)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    if chart is not None:
        write_chart(rows, chart)
        print(f"chart: {chart}")
    sys.stdout.flush()
    return 0
