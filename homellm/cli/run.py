"""`homellm run [-m NAME] "prompt"`: stream one reply to stdout, speeds to stderr."""
from __future__ import annotations

import argparse
import json
import sys

from homellm.cli.options import (add_format_argument, add_model_arguments, add_sampling_arguments,
                                 checked_text, load_model, read_stdin_text, response_format,
                                 sampling_options, speed_line)

HELP = "run a model on one prompt and stream the reply"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: read from standard input)")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true",
                   help="no chat template: continue the prompt text as it is")
    add_sampling_arguments(p)
    add_format_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token counts, speeds")


def main(args: argparse.Namespace) -> int:
    from homellm.errors import HomellmError
    prompt = checked_text(args.prompt, "the prompt")
    args.system = checked_text(args.system, "--system")
    if prompt is None:
        if sys.stdin.isatty():
            raise HomellmError("no prompt: give one as an argument or on standard input")
        prompt = read_stdin_text().rstrip("\r\n")  # `echo ... |` adds a newline, as $(...) drops it
    if not prompt.strip():
        raise HomellmError("the prompt is empty: give one as an argument or on standard input")
    if args.raw and args.system:
        raise HomellmError("--system needs the chat template; drop --raw")
    options = sampling_options(args)
    fmt = response_format(args.format)
    model = load_model(args, quiet=args.json)
    try:
        if args.raw:
            steps = model.generate(prompt, max_tokens=args.max_tokens, stop=args.stop,
                                   response_format=fmt, logprobs=False, **options)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                       [{"role": "user", "content": prompt}]
            steps = model.chat(messages, max_tokens=args.max_tokens, stop=args.stop,
                               response_format=fmt, logprobs=False, **options)
    except ValueError as e:  # the schema: what llguidance cannot enforce, or is not a schema
        raise HomellmError(f"--format {args.format}: {e}") from None
    text, final = [], None
    for step in steps:
        if step.text:
            text.append(step.text)
            if not args.json:
                sys.stdout.write(step.text)
                sys.stdout.flush()
        if step.finish_reason:
            final = step
    t = final.timings
    if args.json:
        print(json.dumps({"model": str(args.model or "default"), "text": "".join(text),
                          "finish_reason": final.finish_reason,
                          "load_s": round(model.load_s, 3), **t.as_dict()}))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()  # (before the speed line on stderr, also when stdout is a pipe)
        print(speed_line(t, model.load_s), file=sys.stderr)
    return 0
