"""`homellm list`: the models in the catalog, one line each (like `ollama list`)."""
from __future__ import annotations

import argparse
import json
import time

HELP = "list the models in the catalog"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print the manifests as a JSON list")


def human_size(n: int | None) -> str:
    """Bytes in decimal units, as `ollama list` shows them: '98 MB', '1.3 GB'."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def human_count(n: int | None) -> str:
    """A parameter count: '135M', '1.7B', '52K'."""
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def ago(t: float, now: float | None = None) -> str:
    """'just now', '5 minutes ago', '3 days ago'."""
    s = max(0.0, (now or time.time()) - t)
    for unit, scale in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= scale:
            k = int(s // scale)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(args: argparse.Namespace) -> int:
    from homellm.catalog import list_models, models_dir

    entries = list_models()
    if args.json:
        print(json.dumps([dict(e.to_json(), path=str(e.path)) for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no models in {models_dir()}; `homellm pull` fetches the default one")
        return 0
    rows = [["NAME", "FORMAT", "QUANT", "PARAMS", "SIZE", "MODIFIED"]]
    for e in entries:
        rows.append([e.name, e.format, e.quant, human_count(e.n_params), human_size(e.size),
                     ago(e.modified)])
    print(table(rows))
    return 0
