"""`homellm`: the command line. One module per subcommand, each with HELP, add_arguments, main.

Errors are handled here, once: a HomellmError prints `error: <message>` and exits 1 with no
traceback; Ctrl-C exits 130; anything else prints a short message, and the traceback only
when HOMELLM_DEBUG=1. Subcommand modules import torch inside main(), never at the top, so
`homellm --help` and `homellm list` stay instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import homellm

# the order `homellm --help` lists them in
COMMANDS = ["run", "chat", "serve", "pull", "list", "show", "rm", "export", "bench", "tune", "merge", "data", "eval", "tokenizer", "pretrain", "score", "loop"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homellm",
        description="The open LLM stack for a home machine: run, chat and serve models, keep a catalog, collect feedback data, fine-tune and measure them.",
        epilog="Models live in $HOMELLM_HOME/models (default ~/.homellm). "
               "Set HOMELLM_DEBUG=1 to see tracebacks.")
    parser.add_argument("--version", action="version", version=f"homellm {homellm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"homellm.cli.{name}")
        doc = (module.__doc__ or "").strip().splitlines()
        help_text = getattr(module, "HELP", None) or (doc[0] if doc else None)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from homellm.errors import HomellmError

    debug = os.environ.get("HOMELLM_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._main(args) or 0)
    except HomellmError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `homellm list | head`
        sys.stderr.close()
        return 141
    except Exception as e:  # a bug, not bad input: say so briefly
        if debug:
            import traceback
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(e).__name__}: {e}\n"
                  "(a bug in homellm; run again with HOMELLM_DEBUG=1 for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
