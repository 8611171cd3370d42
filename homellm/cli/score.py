"""`homellm score -m RM [FILE]`: a reward model's score of (prompt, reply) pairs.

    homellm score -m my-rm pairs.jsonl > scored.jsonl
    echo '{"prompt": "Hi", "reply": "Hello!"}' | homellm score -m ./my-rm

Each input line is {"prompt": str or [messages], "reply": str} ("response" and "completion"
are read as reply) or {"messages": [... ending with the assistant's reply]}; each output line
is the input with "score" added, in order. A bad line stops before anything is scored, naming
it. The speed goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "score (prompt, reply) pairs with a reward model (homellm tune rm)"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", required=True, metavar="RM",
                   help="a reward model folder, or a name under $HOMELLM_HOME/rewards")
    p.add_argument("file", nargs="?", default=None, help="JSONL input (default: standard input)")
    p.add_argument("--base", default=None,
                   help="the base model to put the reward model on (default: the one it was trained on; "
                        "it must have the same tokenizer)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens a forward (default 8192)")


def _pair(d, where: str) -> tuple[list[dict], str]:
    from homellm.data.conversations import _Bad, _messages
    from homellm.errors import HomellmError
    try:
        if not isinstance(d, dict):
            raise _Bad(f"expected a JSON object, got {type(d).__name__}")
        if "messages" in d:
            messages = _messages(d["messages"], "messages")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise _Bad("field 'messages': expected a conversation ending with the assistant's reply")
            return messages[:-1], messages[-1]["content"]
        reply = next((d[k] for k in ("reply", "response", "completion") if k in d), None)
        if "prompt" not in d or not isinstance(reply, str):
            raise _Bad("expected 'prompt' and 'reply' (a string), or 'messages'")
        prompt = d["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        if not any(m["content"].strip() for m in prompt):
            raise _Bad("empty prompt")
        return prompt, reply
    except ValueError as e:
        raise HomellmError(f"{where}: {e}") from None


def main(args: argparse.Namespace) -> int:
    from homellm.cli.options import read_stdin_text
    from homellm.data import deep_json
    from homellm.errors import HomellmError
    from homellm.train.reward import find_reward_model, load_reward_model
    if args.batch_tokens < 1:
        raise HomellmError(f"--batch-tokens {args.batch_tokens}: expected at least 1")
    folder = find_reward_model(args.model)  # (not a reward model: said before reading the input)
    source = args.file or "<stdin>"
    if args.file is None:
        text = read_stdin_text()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise HomellmError(f"{args.file}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise HomellmError(f"{args.file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    records, pairs = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            d = deep_json.loads(line)
        except json.JSONDecodeError as e:
            raise HomellmError(f"{where}: not JSON: {e.msg} (column {e.colno})") from None
        records.append(d)
        pairs.append(_pair(d, where))
    if not pairs:
        raise HomellmError(f"{source}: nothing to score (no lines)")
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    rm = load_reward_model(folder, base=args.base, device=device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = rm.rewards(pairs, batch_tokens=args.batch_tokens)
    dt = time.perf_counter() - t0
    for d, s in zip(records, scores):
        sys.stdout.write(json.dumps({**d, "score": s}, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    print(f"scored {len(scores)} replies in {dt:.2f} s ({len(scores) / max(dt, 1e-9):.1f} replies/s; "
          f"load {load_s:.2f} s) with {rm.info.folder}", file=sys.stderr)
    return 0
