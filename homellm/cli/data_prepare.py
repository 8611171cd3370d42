"""`homellm data prepare SOURCES... --out DIR`: public text -> a clean pretraining corpus.

Registered as an action of `homellm data` (cli/data.py calls `add_parser`). The steps and what
each uses are in homellm/data/prepare.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    q = sub.add_parser(
        "prepare", help="public text -> a deduplicated, mixed pretraining corpus",
        description="Read .txt/.md/.jsonl/.json/.parquet files and folders (also .gz/.zst), "
                    "normalize, filter, remove exact and near duplicates (MinHash LSH), mix the "
                    "sources by weight and split train/validation by document. Writes "
                    "train.jsonl, val.jsonl and report.json into --out.")
    q.add_argument("sources", nargs="*", type=Path,
                   help="files or folders, one source each (or give a --recipe)")
    q.add_argument("--out", required=True, type=Path, help="output folder")
    q.add_argument("--recipe", type=Path, default=None,
                   help="TOML or JSON recipe: [[sources]] name, paths, weight (and options)")
    q.add_argument("--dedup-threshold", type=float, default=None,
                   help="near-duplicate Jaccard similarity (default 0.8; 0 turns near dedup off)")
    q.add_argument("--val-fraction", type=float, default=None,
                   help="documents of each source held out for validation (default 0.01)")
    q.add_argument("--min-chars", type=int, default=None, help="shorter documents are removed (default 100)")
    q.add_argument("--seed", type=int, default=None, help="seed of the split and the mix (default 0)")
    q.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    q.set_defaults(_data=prepare_cmd)


def prepare_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from homellm.data.prepare import Filters, PrepareConfig, Source, prepare, read_recipe
    from homellm.errors import HomellmError
    if args.recipe is not None and args.sources:
        raise HomellmError("give the sources on the command line or in --recipe, not both")
    if args.recipe is not None:
        kw = read_recipe(args.recipe)
    elif args.sources:
        names = [p.name or str(p) for p in args.sources]
        kw = {"sources": [Source(n if names.count(n) == 1 else f"{n}-{i}", [str(p)])
                          for i, (n, p) in enumerate(zip(names, args.sources))]}
    else:
        raise HomellmError("no sources: give files or folders, or --recipe FILE")
    for key in ("dedup_threshold", "val_fraction", "seed"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.min_chars is not None:
        kw["filters"] = Filters(**{**vars(kw.get("filters", Filters())), "min_chars": args.min_chars})
    config = PrepareConfig(out=str(args.out), **kw)
    bars: dict = {}

    def progress(event: dict):
        stage = event["stage"]
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars.clear()
            bars[stage] = tqdm(desc="read" if stage == "read" else f"write {stage}", unit="B",
                               unit_scale=True, file=sys.stderr, leave=False, disable=None)
        bar = bars[stage]
        bar.update(event["bytes"])
        if stage == "read":
            bar.set_postfix_str(event["source"], refresh=False)

    try:
        report = prepare(config, progress)
    finally:
        for b in bars.values():
            b.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    print(format_report(report), file=sys.stderr)
    return 0


def format_report(report) -> str:
    rows = [("source", "docs", "MB", "kept", "removed", "skipped", "train MB", "share", "x", "val")]
    for r in report.sources:
        removed = ", ".join(f"{k} {v}" for k, v in r.removed.items()) or "-"
        skipped = ", ".join(f"{k} {v}" for k, v in r.skipped.items()) or "-"
        rows.append((r.name, str(r.documents), f"{r.bytes / 1e6:.2f}", str(r.kept), removed, skipped,
                     f"{r.train_bytes / 1e6:.2f}", f"{r.share:.1%}", f"{r.repeat:.2f}",
                     str(r.val_documents)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"train: {report.train_documents} documents, {report.train_bytes / 1e6:.2f} MB; "
                 f"validation: {report.val_documents} documents, {report.val_bytes / 1e6:.2f} MB")
    lines.append(f"read {report.read_bytes / 1e6:.2f} MB in {report.seconds:.1f} s "
                 f"({report.mb_per_s:.2f} MB/s); near dedup: {report.near_dedup}")
    lines.append(f"wrote {Path(report.out) / 'train.jsonl'}, val.jsonl, report.json "
                 f"(next: homellm tokenizer train {report.out} --vocab-size 8192)")
    return "\n".join(lines)
