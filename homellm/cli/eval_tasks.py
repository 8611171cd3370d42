"""`homellm eval tasks`: lm-evaluation-harness tasks on homellm models, offline.

    homellm eval tasks -m smollm2 --tasks homellm_capitals
    homellm eval tasks -m smollm2,smollm2+./adapter --tasks arc_easy --limit 100 --num-fewshot 5
    homellm eval tasks -m smollm2 --tasks ./my_task.yaml --apply-chat-template
    homellm eval tasks --install-plugin      # once: the plain `lm_eval --model homellm` works too

Each (model, task) result is kept under $HOMELLM_HOME/evals (see `homellm eval report`).
"""
from __future__ import annotations

import argparse
import json
import sys

from homellm.errors import HomellmError

HELP = "lm-evaluation-harness tasks (local YAML + JSONL, or lm-eval's own) on one or more models"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None, metavar="MODEL[,MODEL+ADAPTER_DIR...]",
                   help="catalog name, .gguf file or Hugging Face folder (default: the default "
                        "model); a comma-separated list evaluates each; NAME+DIR adds a LoRA adapter")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT layout) on -m, applied without merging")
    p.add_argument("--tasks", default=None, metavar="TASK[,TASK...]",
                   help="lm-eval task names or task YAML files, comma-separated (the example tasks: "
                        "homellm_capitals, homellm_capitals_gen)")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (a number below 1: that fraction of them)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples before each question (default: the task's own, else 0)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="write each prompt with the model's chat template (few-shot examples as turns)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of task YAML files whose tasks --tasks may name (repeatable)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length in tokens (default: the model's, up to 4096)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: one per physical core)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per forward on the PyTorch path (HF folder, adapter, GPU; "
                        "default 16); the C runtime scores one context at a time")
    p.add_argument("--json", action="store_true", help="print one JSON object per (model, task)")
    p.add_argument("--install-plugin", action="store_true",
                   help="register `homellm` with the plain `lm_eval` command of this Python "
                        "environment (a small .pth file in site-packages), then exit")
    p.add_argument("--remove-plugin", action="store_true", help="undo --install-plugin, then exit")


def main(args: argparse.Namespace) -> int:
    if args.install_plugin or args.remove_plugin:
        return _plugin(args)
    from homellm.eval import tasks as tasklib
    from homellm.eval.models import ModelRef, model_hash, open_model, parse_model_list
    from homellm.eval.results import record

    if not args.tasks:
        raise HomellmError("--tasks is required: lm-eval task names or task YAML files, "
                           "comma-separated (e.g. --tasks homellm_capitals)")
    _check_numbers(args)
    refs = parse_model_list(args.model)
    if args.adapter is not None:
        if len(refs) != 1 or refs[0].adapter is not None:
            raise HomellmError("--adapter applies to one model; for a list write NAME+ADAPTER_DIR in -m")
        refs = [ModelRef(refs[0].name, args.adapter)]
    identities = [model_hash(ref) for ref in refs]  # (a missing model or adapter fails here)
    lm_eval = tasklib.require_lm_eval()
    suite = tasklib.find_tasks(args.tasks.split(","), args.include_path)
    tasklib.load_tasks(suite)  # the data is read (and checked) before any model loads
    from homellm.eval.harness import HomellmLM

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    settings = {"limit": limit, "num_fewshot": args.num_fewshot,
                "apply_chat_template": args.apply_chat_template, "ctx": args.ctx,
                "lm_eval": lm_eval.__version__}
    rows = []
    for ref, identity in zip(refs, identities):
        model = open_model(ref, ctx=args.ctx, device=args.device)
        lm = HomellmLM.from_loaded(model, ref.label, threads=args.threads, batch_size=args.batch_size)
        clock = tasklib.timed(lm)
        print(f"{ref.label}: {model.runtime} runtime on {model.device}, {model.threads} threads",
              file=sys.stderr, flush=True)
        for spec in suite.specs:
            for result in tasklib.run_task(lm, suite, spec, limit=limit, num_fewshot=args.num_fewshot,
                                           apply_chat_template=args.apply_chat_template, clock=clock):
                metrics = {**result.metrics, "samples": result.samples,
                           "samples_per_s": round(result.samples_per_s, 3)}
                run = record("tasks", model=ref.label, model_hash=identity, task=result.task,
                             settings={**settings, "runtime": model.runtime, "threads": model.threads},
                             metrics=metrics)
                rows.append((ref.label, result, run.id))
                if args.json:
                    print(json.dumps({"model": ref.label, "task": result.task, "metrics": metrics,
                                      "model_seconds": round(result.model_seconds, 3),
                                      "wall_seconds": round(result.wall_seconds, 3), "run": run.id}),
                          flush=True)
        del lm, model
    if not args.json:
        print_table(rows)
    return 0


def _check_numbers(args):
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
        raise HomellmError(f"--limit {args.limit:g}: expected a whole number of documents, or a "
                           f"fraction between 0 and 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise HomellmError(f"--num-fewshot {args.num_fewshot}: expected 0 or more")
    for name in ("ctx", "threads", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HomellmError(f"--{name.replace('_', '-')} {value}: expected at least 1")


def print_table(rows):
    """model | task | metric | value | stderr | samples | samples/s (of model time)."""
    lines = [("model", "task", "metric", "value", "± stderr", "samples", "samples/s")]
    for label, result, _ in rows:
        first = True
        for metric, value in result.metrics.items():
            if "_stderr" in metric:
                continue
            err = result.metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric
                                     else metric + "_stderr")
            lines.append((label if first else "", result.task if first else "", metric,
                          f"{value:.4f}", f"{err:.4f}" if err is not None else "",
                          str(result.samples) if first else "",
                          f"{result.samples_per_s:.1f}" if first else ""))
            first = False
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))).rstrip())


def _plugin(args) -> int:
    from homellm.eval import lm_eval_plugin
    if args.install_plugin and args.remove_plugin:
        raise HomellmError("--install-plugin and --remove-plugin: one at a time")
    if args.install_plugin:
        path = lm_eval_plugin.install_pth()
        print(f"wrote {path}: `lm_eval --model homellm --model_args model=NAME` now works in this "
              f"environment")
    else:
        path = lm_eval_plugin.remove_pth()
        print(f"removed {path}" if path else "the plugin was not installed")
    return 0
