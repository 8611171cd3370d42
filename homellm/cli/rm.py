"""`homellm rm NAME...`: delete models from the catalog."""
from __future__ import annotations

import argparse

HELP = "delete models from the catalog"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("names", nargs="+", metavar="NAME", help="catalog names (see `homellm list`)")


def main(args: argparse.Namespace) -> int:
    from homellm.catalog import get, rm
    from homellm.cli.list import human_size

    entries = [get(name) for name in args.names]  # all must exist before any is deleted
    for entry in entries:
        rm(entry.name)
        print(f"deleted {entry.name} ({human_size(entry.size)} freed)")
    return 0
