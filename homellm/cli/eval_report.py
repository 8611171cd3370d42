"""`homellm eval report`: not written yet."""
from __future__ import annotations

import argparse

from homellm.errors import HomellmError

HELP = "(not yet available)"


def add_arguments(p: argparse.ArgumentParser):
    pass


def main(args: argparse.Namespace) -> int:
    raise HomellmError("homellm eval report is not available yet")
