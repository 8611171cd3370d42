"""`homellm chat [-m NAME]`: a terminal chat that keeps the conversation in the KV cache.

Each turn prefills only what is new: the earlier turns' keys and values stay cached.
Ctrl-C stops a reply (what was said so far stays in the conversation); Ctrl-D or /bye ends.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from homellm.cli.options import (SAMPLING_FLAGS, add_model_arguments, add_sampling_arguments,
                                 checked_text, load_model, sampling_options, speed_line)

HELP = "chat with a model in the terminal"

COMMANDS = """commands:
  /help                 this help
  /reset                forget the conversation (keeps the system prompt)
  /system [TEXT]        set the system prompt and start over (no TEXT: clear it)
  /set NAME VALUE       a sampling setting: {names}, max_tokens
  /set                  show the settings
  /bye, /exit           leave (or Ctrl-D)
Ctrl-C stops a reply."""


def add_arguments(p: argparse.ArgumentParser):
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no speed line after each reply")


def set_option(settings: dict, name: str, value: str) -> str:
    from homellm.engine.sampling import SamplingParams
    name = name.replace("-", "_")
    kinds = {k: kind for k, (kind, _) in SAMPLING_FLAGS.items()} | {"max_tokens": int}
    if name not in kinds:
        return f"unknown setting {name!r}; one of: {', '.join(kinds)}"
    if value.lower() in ("none", "default"):
        settings.pop(name, None)
        return f"{name} back to its default"
    try:
        parsed = kinds[name](value)
        if name == "max_tokens" and parsed < 1:
            raise ValueError(f"max_tokens={parsed}: expected at least 1")
        trial = {k: v for k, v in (settings | {name: parsed}).items() if k != "max_tokens"}
        SamplingParams(**trial)
    except ValueError as e:
        return f"invalid value for {name}: {e}"
    settings[name] = parsed
    return f"{name} = {parsed}"


def main(args: argparse.Namespace) -> int:
    from homellm.errors import HomellmError
    args.system = checked_text(args.system, "--system")
    settings = sampling_options(args)
    if args.max_tokens is not None:
        settings["max_tokens"] = args.max_tokens
    model = load_model(args)
    session = model.session(system=args.system)
    interactive = sys.stdin.isatty()
    print(f"homellm chat: {model.checkpoint.metadata.get('name') or args.model or 'default model'},"
          f" context {model.ctx} tokens. /help for commands, Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye to leave)", file=sys.stderr)
            continue
        except UnicodeDecodeError as e:
            print(f"(that line is not valid {e.encoding} text; ignored)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            words = shlex.split(line) if line.count('"') % 2 == 0 else line.split()
            cmd, rest = words[0], words[1:]
            if cmd in ("/bye", "/exit", "/quit"):
                break
            if cmd in ("/help", "/?"):
                print(COMMANDS.format(names=", ".join(SAMPLING_FLAGS)))
            elif cmd == "/reset":
                session.reset()
                print("(conversation cleared)")
            elif cmd == "/system":
                text = line[len("/system"):].strip()
                session.system = text or None
                session.reset()
                print("(system prompt set; conversation cleared)" if text else
                      "(system prompt cleared)")
            elif cmd == "/set":
                if len(rest) == 2:
                    print(set_option(settings, rest[0], rest[1]))
                elif not rest:
                    print(", ".join(f"{k}={v}" for k, v in settings.items()) or "(all defaults)")
                else:
                    print("usage: /set NAME VALUE")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        try:
            line = checked_text(line, "that line")
        except HomellmError as e:
            print(f"({e}; ignored)", file=sys.stderr)
            continue
        steps = session.send(line, stop=args.stop, logprobs=False, **settings)
        final = None
        try:
            for step in steps:
                if step.text:
                    sys.stdout.write(step.text)
                    sys.stdout.flush()
                if step.finish_reason:
                    final = step
        except KeyboardInterrupt:
            steps.close()
            print("\n(stopped)", file=sys.stderr)
            continue
        print(flush=True)  # (before the speed line on stderr, also when stdout is a pipe)
        if final is not None and not args.quiet:
            print(speed_line(final.timings), file=sys.stderr)
    return 0
