"""Options shared by the subcommands that run a model: -m, --ctx, sampling flags, loading.

The sampling flags are derived from SamplingParams' fields, so a new field is a new flag.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

# SamplingParams lives in engine/ (imports torch); its fields are mirrored here by name and
# type so that `homellm --help` stays instant. test_cli checks the two agree.
SAMPLING_FLAGS = {
    "temperature": (float, "0 is greedy (default 0.8)"),
    "top_k": (int, "keep the k most likely tokens; 0 disables (default 40)"),
    "top_p": (float, "keep the most likely tokens up to this probability mass (default 0.95)"),
    "min_p": (float, "drop tokens below min_p x the top probability (default 0.05)"),
    "repeat_penalty": (float, "penalize recently seen tokens; 1.0 disables (default 1.0)"),
    "repeat_last_n": (int, "how many recent tokens repeat_penalty looks at (default 64)"),
    "frequency_penalty": (float, "OpenAI-style frequency penalty (default 0)"),
    "presence_penalty": (float, "OpenAI-style presence penalty (default 0)"),
    "seed": (int, "random seed: the same seed gives the same output"),
}


def logit_bias_pair(value: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS (llama.cpp's ID+BIAS / ID-BIAS too) -> (id, bias)."""
    import re
    m = re.fullmatch(r"\s*(\d+)\s*(?:=\s*([-+]?[\d.]+(?:e[-+]?\d+)?)|([-+][\d.]+(?:e[-+]?\d+)?))\s*", value, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r}: expected ID=BIAS, e.g. 15043=-100")
    try:
        return int(m.group(1)), float(m.group(2) or m.group(3))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected ID=BIAS, e.g. 15043=-100") from None


def add_model_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None,
                   help="catalog name, .gguf file or Hugging Face folder (default: the default model)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context size in tokens: the KV cache holds this many (default 4096)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                   help="weights at run time: default keeps what the file records")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="a LoRA adapter folder (PEFT layout, from `homellm tune`) applied without merging")


def add_sampling_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    for name, (kind, help_text) in SAMPLING_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    g.add_argument("--logit-bias", type=logit_bias_pair, action="append", default=None,
                   metavar="ID=BIAS", help="add BIAS to token ID's logit before sampling (-100 "
                                           "bans it, 100 forces it; repeatable)")
    g.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def add_format_argument(p: argparse.ArgumentParser):
    p.add_argument("--format", default=None, metavar="json|SCHEMA.json",
                   help="constrain the reply: 'json' for any JSON object, or a JSON Schema file "
                        "the reply must follow (like Ollama's --format)")


def response_format(value: str | None) -> dict | None:
    """The OpenAI response_format that --format asks for ('json' or a JSON Schema file)."""
    import json
    from pathlib import Path

    from homellm.errors import HomellmError
    if value is None:
        return None
    if value == "json":
        return {"type": "json_object"}
    path = Path(value)
    if not path.is_file():
        raise HomellmError(f"--format {value}: expected 'json' or a JSON Schema file, "
                           f"and there is no such file")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HomellmError(f"{path}: not a JSON Schema: not valid JSON ({e})") from None
    return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}


def checked_text(value: str | None, what: str) -> str | None:
    """Text from argv as Python hands it over (bytes that are not UTF-8 become lone
    surrogates) -> the same text, or HomellmError naming the first bad byte."""
    from homellm.errors import HomellmError
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        at = e.start
        raw = value.encode("utf-8", "surrogateescape") if 0xDC80 <= ord(value[at]) <= 0xDCFF \
            else None
    if raw is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as d:
            raise HomellmError(f"{what} is not valid UTF-8: byte 0x{raw[d.start]:02x} at byte "
                               f"{d.start} (check the terminal's or the file's encoding)") from None
    raise HomellmError(f"{what} is not valid Unicode: a lone surrogate at character {at}")


def read_stdin_text(what: str = "standard input") -> str:
    """All of standard input as UTF-8 text (HomellmError naming the first bad byte)."""
    from homellm.errors import HomellmError
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as d:
        raise HomellmError(f"{what} is not valid UTF-8: byte 0x{raw[d.start]:02x} at byte "
                           f"{d.start}") from None


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling keywords the user gave (the rest keep SamplingParams' defaults)."""
    from homellm.engine.sampling import SamplingParams
    from homellm.errors import HomellmError
    opts = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 1:
        raise HomellmError(f"--max-tokens {args.max_tokens}: expected at least 1")
    try:
        SamplingParams(**opts)
    except ValueError as e:
        raise HomellmError(f"invalid sampling option: {e}") from None
    if getattr(args, "logit_bias", None):
        opts["logit_bias"] = dict(args.logit_bias)
    return opts


def run_training(train, config, bar, report: bool = True, **kw):
    """train(config, **kw) under a progress bar (closed after); on Ctrl+C, where the run saved
    a checkpoint, how to continue it (`report`: the main process says it)."""
    from pathlib import Path
    try:
        result = train(config, **kw)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if report and (Path(config.out) / "checkpoint").exists():
            print(f"checkpoint saved in {config.out}: continue with the same command and --resume",
                  file=sys.stderr)
        raise
    if bar is not None:
        bar.close()
    return result


def check_flags_match_params():
    """SAMPLING_FLAGS mirrors SamplingParams (checked by the tests)."""
    from homellm.engine.sampling import SamplingParams
    return set(SAMPLING_FLAGS) == {f.name for f in fields(SamplingParams)}


def load_model(args: argparse.Namespace, quiet: bool = False):
    """Load -m (pulling the default model when needed), with a progress bar on stderr."""
    from tqdm import tqdm

    from homellm.api import load
    if args.ctx is not None and args.ctx < 2:
        from homellm.errors import HomellmError
        raise HomellmError(f"--ctx {args.ctx}: the context must hold at least 2 tokens")
    bar = None

    def progress(done, total):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total, desc="loading", unit="layer", file=sys.stderr, leave=False,
                       disable=None)  # None: no bar when stderr is not a terminal
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    from homellm.engine.kernels import build
    if not build.is_built() and not quiet:
        print("building homellm's CPU kernels (once; cached for later runs)...", file=sys.stderr)
    model = load(args.model, device=args.device, ctx=args.ctx, quant=args.quant, progress=progress,
                 adapter=getattr(args, "adapter", None))
    if bar is not None:
        bar.close()
    model.load_s = time.perf_counter() - t0
    return model


def speed_line(timings, load_s: float | None = None) -> str:
    parts = []
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    cached = f", {timings.cached_tokens} cached" if timings.cached_tokens else ""
    parts.append(f"prompt {timings.prompt_tokens} tokens{cached} at {timings.prefill_tps:.1f} tok/s")
    n = timings.generated_tokens
    # the first token comes out of the prefill: a reply's rate needs a second one
    parts.append(f"reply {n} tokens at {timings.decode_tps:.1f} tok/s" if n > 1 else
                 f"reply {n} token{'' if n == 1 else 's'} (from the prefill)")
    return " | ".join(parts)
