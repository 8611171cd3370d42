"""`homellm data collect-export` / `collect-import`: the volunteer collection in Open
Assistant's formats; and the training filters `homellm data export` takes.

    homellm data collect-export trees.jsonl.gz                 # ready_for_export trees
    homellm data collect-export msgs.jsonl --messages --state all --include-deleted --events
    homellm data collect-import 2023-11-05_oasst2_all.trees.jsonl.gz   # or a messages file
    homellm data export --collect --sft sft.jsonl --dpo dpo.jsonl --rm rm.jsonl \\
        --lang en --min-reviews 3 --no-flagged --no-synthetic

Formats and rules: homellm/data/oasst_collect.py (export, import) and oasst_filters.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from homellm.cli.data import _bar, _rate, _store


def add_parsers(sub):
    q = sub.add_parser("collect-export", help="the volunteer collection as Open Assistant "
                       "JSONL (trees or messages)",
                       description="Open Assistant's export formats (oasst-data): trees "
                                   "(nested replies) or messages (one a line); .gz gzips.")
    q.add_argument("file", type=Path, help="output .jsonl (or .jsonl.gz)")
    q.add_argument("--messages", action="store_true",
                   help="one message a line (oasst2 *.messages.jsonl) instead of trees")
    q.add_argument("--state", default="ready_for_export",
                   help="tree states to export, comma-separated, or 'all' "
                        "(default ready_for_export)")
    q.add_argument("--lang", default=None, help="only trees whose prompt is in this language")
    q.add_argument("--include-deleted", action="store_true", help="keep deleted messages")
    q.add_argument("--include-spam", action="store_true",
                   help="keep replies not accepted in review (rejected or still in review)")
    q.add_argument("--events", action="store_true",
                   help="add each message's ranking and emoji events")
    q.add_argument("--db", default=None,
                   help="database URL or file (default $HOMELLM_HOME/homellm.db)")
    q.set_defaults(_data=collect_export)

    q = sub.add_parser("collect-import", help="an Open Assistant export (oasst1/oasst2 trees "
                       "or messages JSONL) into the volunteer collection")
    q.add_argument("file", type=Path, help="input .jsonl (or .jsonl.gz)")
    q.add_argument("--db", default=None,
                   help="database URL or file (default $HOMELLM_HOME/homellm.db)")
    q.set_defaults(_data=collect_import)


def add_export_filters(q: argparse.ArgumentParser):
    """`homellm data export`'s options for the collection and its filters."""
    q.add_argument("--rm", type=Path, default=None,
                   help='write reward-model pairs {"chosen", "rejected", "margin"} here')
    q.add_argument("--collect", action="store_true",
                   help="read the volunteer collection's ready_for_export trees from --db")
    q.add_argument("--lang", default=None,
                   help="only trees whose prompt is in these languages (comma-separated)")
    q.add_argument("--min-reviews", type=int, default=0, metavar="N",
                   help="only messages with at least N reviews")
    for what, text in (("deleted", "deleted messages"),
                       ("flagged", "flagged messages (rejected, red-flagged, or labeled "
                                   "spam/PII/inappropriate/...)"),
                       ("synthetic", "messages a model wrote")):
        q.add_argument(f"--no-{what}", dest=f"no_{what}", action="store_true",
                       help=f"leave out {text}, with the replies below them")


def filtered(args, trees: list) -> list:
    from homellm.data.oasst_filters import TreeFilter
    from homellm.errors import HomellmError
    if args.min_reviews < 0:
        raise HomellmError(f"--min-reviews {args.min_reviews}: expected 0 or more")
    langs = tuple(x.strip() for x in (args.lang or "").split(",") if x.strip())
    f = TreeFilter(langs=langs, min_reviews=args.min_reviews, drop_deleted=args.no_deleted,
                   drop_flagged=args.no_flagged, drop_synthetic=args.no_synthetic)
    return f.apply(trees)


def collect_source(args) -> list:
    """The collection's ready_for_export trees (data export --collect)."""
    from homellm.data.oasst_collect import collect_trees
    from homellm.errors import HomellmError
    if args.trees is not None or args.user or args.shared:
        raise HomellmError("--collect reads the collection in --db: drop --trees / --user / "
                           "--shared")
    with _store(args, must_exist=True) as store:
        return collect_trees(store.db)


def _states(text: str) -> list[str] | None:
    from homellm.data.oasst_collect import EXPORT_STATES
    from homellm.errors import HomellmError
    if text.strip() == "all":
        return None
    states = [x.strip() for x in text.split(",") if x.strip()]
    for s in states:
        if s not in EXPORT_STATES:
            raise HomellmError(f"--state {s!r}: expected 'all' or some of "
                               f"{', '.join(EXPORT_STATES)}")
    return states


def collect_export(args) -> int:
    from homellm.data.oasst import write_trees
    from homellm.data.oasst_collect import collect_trees, write_messages
    from homellm.errors import HomellmError
    if args.file.is_dir():
        raise HomellmError(f"cannot write {args.file}: it is a folder")
    states = _states(args.state)
    t0 = time.perf_counter()
    with _store(args, must_exist=True) as store:
        trees = collect_trees(store.db, states=states, lang=args.lang,
                              include_deleted=args.include_deleted,
                              include_spam=args.include_spam, events=args.events)
    write = write_messages if args.messages else write_trees
    try:
        write(_bar(trees, "collect-export"), args.file)
    except OSError as e:
        raise HomellmError(f"cannot write {args.file}: {e.strerror or e}") from None
    n_msgs = sum(len(t.messages()) for t in trees)
    print(f"{len(trees)} trees ({n_msgs} messages) -> {args.file} as "
          f"{'messages' if args.messages else 'trees'} in "
          f"{_rate(len(trees), time.perf_counter() - t0)}", file=sys.stderr)
    return 0


def collect_import(args) -> int:
    from homellm.data.oasst_collect import import_collect, read_export
    from homellm.errors import HomellmError
    t0 = time.perf_counter()
    try:
        trees = read_export(args.file)   # all checked before anything is written
    except ValueError as e:
        raise HomellmError(str(e)) from None
    with _store(args, must_exist=False) as store:
        bar = _bar(None, "collect-import", total=len(trees))
        n_trees, n_msgs = import_collect(store.db, trees, progress=bar.update)
        bar.close()
    print(f"{n_trees} trees ({n_msgs} messages) imported from {args.file} into the collection "
          f"of {store.url} in {_rate(n_trees, time.perf_counter() - t0)}", file=sys.stderr)
    return 0
