"""`homellm eval ppl|tasks|judge|report`: measure models, keep the results, compare them.

    homellm eval ppl -m smollm2 --data wiki.txt [--save-logits ref.npz | --kl-divergence ref.npz]
    homellm eval tasks -m smollm2,smollm2+./adapter --tasks arc_easy --limit 100
    homellm eval judge --models a,b --questions mt.jsonl --judge judge-model
    homellm eval report [--chart evals.png]

Each action lives in its own module (cli/eval_<action>.py, with add_arguments and main);
every run is kept under $HOMELLM_HOME/evals (homellm.eval.results).
"""
from __future__ import annotations

import argparse
import importlib

HELP = "measure models: perplexity and KL divergence, lm-eval tasks, a local judge; compare runs"

ACTIONS = ["ppl", "tasks", "judge", "report"]


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    for name in ACTIONS:
        module = importlib.import_module(f"homellm.cli.eval_{name}")
        q = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(q)
        q.set_defaults(_eval=module.main)


def main(args: argparse.Namespace) -> int:
    return args._eval(args)
