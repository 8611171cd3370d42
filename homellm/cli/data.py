"""`homellm data`: conversations out as training data or oasst trees, and trees back in.

    homellm data export --sft sft.jsonl --dpo dpo.jsonl     # from the database
    homellm data export --trees trees.jsonl --sft sft.jsonl  # from an oasst file instead
    homellm data export-trees trees.jsonl [--conversation ID ...]
    homellm data import-trees trees.jsonl

The database is --db (sqlite:///FILE, a path, or postgresql://...), default
$HOMELLM_HOME/homellm.db. Conversations are the local user's unless --user names another;
--shared (export) takes every user who opted in to share feedback, as an admin's export.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "export training data (SFT, DPO) and Open Assistant trees; import trees"


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    def common(q, shared: bool):
        q.add_argument("--db", default=None,
                       help="database URL or file (default $HOMELLM_HOME/homellm.db)")
        q.add_argument("--user", default=None, help="whose conversations (default: the local user)")
        if shared:
            q.add_argument("--shared", action="store_true",
                           help="every user who opted in to share feedback (admin export)")

    q = sub.add_parser("export", help="SFT examples and DPO pairs as JSONL",
                       description="SFT examples from the best-rated paths and DPO pairs from "
                                   "sibling replies whose ratings differ (rules: "
                                   "homellm.data.oasst).")
    q.add_argument("--sft", type=Path, default=None, help='write {"messages": [...]} lines here')
    q.add_argument("--dpo", type=Path, default=None,
                   help='write {"prompt", "chosen", "rejected"} lines here')
    q.add_argument("--trees", type=Path, default=None,
                   help="read an oasst trees .jsonl file instead of the database")
    q.add_argument("--arena", action=argparse.BooleanOptionalAction, default=True,
                   help="with --dpo from the database: add the web app's arena votes (A or B) "
                        "as pairs too (default on)")
    from homellm.cli.data_collect import add_export_filters, add_parsers
    add_export_filters(q)  # --rm, --collect and the filters (--lang, --min-reviews, --no-*)
    common(q, shared=True)
    q.set_defaults(_data=export_training)

    q = sub.add_parser("export-trees", help="conversations as Open Assistant JSONL trees")
    q.add_argument("file", type=Path, help="output .jsonl (or .jsonl.gz)")
    q.add_argument("--conversation", action="append", default=None, metavar="ID",
                   help="only this conversation (repeatable; default all)")
    common(q, shared=True)
    q.set_defaults(_data=export_trees_cmd)

    q = sub.add_parser("import-trees", help="Open Assistant JSONL trees as new conversations")
    q.add_argument("file", type=Path, help="input .jsonl (or .jsonl.gz)")
    common(q, shared=False)
    q.set_defaults(_data=import_trees_cmd)

    from homellm.cli.data_prepare import add_parser  # `data prepare`: pretraining text
    add_parser(sub)
    add_parsers(sub)  # `data collect-export` / `collect-import`: the volunteer collection


def main(args: argparse.Namespace) -> int:
    return args._data(args)


# ---------------------------------------------------------------- helpers

def _store(args, must_exist: bool):
    from homellm.errors import HomellmError
    from homellm.store import open_store
    from homellm.store.dialect import SQLITE, parse_url
    if args.db is None:
        from homellm.catalog.library import home
        dialect, target = SQLITE, str(home() / "homellm.db")
    else:
        dialect, target = parse_url(args.db)
    if must_exist and dialect is SQLITE and not Path(target).expanduser().is_file():
        raise HomellmError(f"no database at {target}")
    return open_store(args.db)


def _user(store, args):
    from homellm.errors import HomellmError
    if args.user is None:
        return store.local_user()
    u = store.user_by_name(args.user)
    if u is None:
        raise HomellmError(f"no user {args.user!r} in {store.url}")
    return u


class _Output:
    """A JSONL file written beside its target and renamed at the end: complete or absent."""

    def __init__(self, path: Path):
        from homellm.errors import HomellmError
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.n = 0
        if path.is_dir():
            raise HomellmError(f"cannot write {path}: it is a folder")
        try:
            self.f = open(self.tmp, "w", encoding="utf-8")
        except OSError as e:
            raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, record: dict):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.n += 1

    def commit(self):
        from homellm.errors import HomellmError
        self.f.close()
        try:
            self.tmp.replace(self.path)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise HomellmError(f"cannot write {self.path}: {e.strerror or e}") from None

    def discard(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _bar(items, desc: str, total: int | None = None):
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, unit="tree", file=sys.stderr, leave=False,
                disable=None)  # None: no bar when stderr is not a terminal


def _rate(n: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({n / max(seconds, 1e-9):.0f} trees/s)"


def _load_trees(path: Path):
    from homellm.data.oasst import read_trees
    from homellm.errors import HomellmError
    try:
        return read_trees(path)
    except ValueError as e:
        raise HomellmError(str(e)) from None


def _db_trees(args, conversation_ids=None):
    from homellm.data.oasst import export_trees
    with _store(args, must_exist=True) as store:
        user = _user(store, args)
        if getattr(args, "shared", False):
            if not user.is_admin:
                from homellm.errors import HomellmError
                raise HomellmError(f"--shared is an admin's export; {user.username!r} is not one")
            return export_trees(store, user, shared=True)
        return export_trees(store, user, conversation_ids)


# ---------------------------------------------------------------- the actions

def export_training(args) -> int:
    from homellm.cli.data_collect import collect_source, filtered
    from homellm.data.oasst import dpo_pairs, sft_examples
    from homellm.data.oasst_filters import rm_pairs
    from homellm.errors import HomellmError
    if args.sft is None and args.dpo is None and args.rm is None:
        raise HomellmError("nothing to write: give --sft FILE, --dpo FILE and/or --rm FILE")
    if args.trees is not None and (args.db or args.user or args.shared):
        raise HomellmError("--trees reads a file: drop --db / --user / --shared")
    t0 = time.perf_counter()
    trees = collect_source(args) if args.collect else \
        _load_trees(args.trees) if args.trees is not None else _db_trees(args)
    trees = filtered(args, trees)
    arena = _arena_pairs(args) if args.dpo is not None and args.arena and \
        args.trees is None and not args.collect else []
    outs = {k: _Output(p) for k, p in (("sft", args.sft), ("dpo", args.dpo), ("rm", args.rm))
            if p is not None}
    try:
        for tree in _bar(trees, "export"):
            if "sft" in outs:
                for ex in sft_examples(tree):
                    outs["sft"].write(ex)
            if "dpo" in outs:
                for pair in dpo_pairs(tree):
                    outs["dpo"].write(pair)
            if "rm" in outs:
                for pair in rm_pairs(tree):
                    outs["rm"].write(pair)
        for pair in arena:
            outs["dpo"].write(pair)
    except BaseException:
        for o in outs.values():
            o.discard()
        raise
    for o in outs.values():
        o.commit()
    dt = time.perf_counter() - t0
    parts = [f"{o.n} {k.upper()} {'examples' if k == 'sft' else 'pairs'}"
             f"{f' ({len(arena)} from arena votes)' if k == 'dpo' and arena else ''} -> {o.path}"
             for k, o in outs.items()]
    print(f"{'; '.join(parts)} from {len(trees)} trees in {_rate(len(trees), dt)}",
          file=sys.stderr)
    return 0


def _arena_pairs(args) -> list[dict]:
    """The arena's A/B votes as DPO pairs (homellm.data.arena), of the same user(s) as the
    trees: --user (default the local user) or, with --shared, the opted-in users."""
    from homellm.data.arena import dpo_pairs as arena_dpo_pairs
    from homellm.store.arena import Battles
    with _store(args, must_exist=True) as store:
        battles = Battles(store.db)
        voted = battles.voted(shared=True) if args.shared else battles.voted(_user(store, args))
    return arena_dpo_pairs(voted)


def export_trees_cmd(args) -> int:
    from homellm.data.oasst import write_trees
    from homellm.errors import HomellmError
    if args.shared and args.conversation:
        raise HomellmError("--shared exports every opted-in user's feedback; drop --conversation")
    if args.file.is_dir():
        raise HomellmError(f"cannot write {args.file}: it is a folder")
    t0 = time.perf_counter()
    trees = _db_trees(args, args.conversation)
    try:
        n = write_trees(_bar(trees, "export-trees"), args.file)
    except OSError as e:
        raise HomellmError(f"cannot write {args.file}: {e.strerror or e}") from None
    n_msgs = sum(len(t.messages()) for t in trees)
    print(f"{n} trees ({n_msgs} messages) -> {args.file} in "
          f"{_rate(n, time.perf_counter() - t0)}", file=sys.stderr)
    return 0


def import_trees_cmd(args) -> int:
    from homellm.data.oasst import import_trees
    t0 = time.perf_counter()
    trees = _load_trees(args.file)  # all checked before anything is written
    with _store(args, must_exist=False) as store:
        user = _user(store, args)
        bar = _bar(None, "import", total=len(trees))
        made = import_trees(store, user, trees, progress=bar.update)
        bar.close()
    print(f"{len(made)} conversations ({len(trees)} trees) imported from {args.file} into "
          f"{store.url} in {_rate(len(trees), time.perf_counter() - t0)}", file=sys.stderr)
    return 0
