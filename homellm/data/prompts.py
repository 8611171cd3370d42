"""Prompt files for PPO and GRPO: what the policy answers during training.

    data = read_prompts("prompts.jsonl")   # Dataset of {"prompt": [messages], "text": str}

| format              | a line                                                              |
|---------------------|---------------------------------------------------------------------|
| prompt              | {"prompt": str or [messages ending with the user's]}, other keys    |
|                     | kept in "extra" (a reward function may want an "answer")           |
| messages            | {"messages": [...]}: the conversation up to its last user message   |
| DPO / preference    | a pair's prompt (its replies are not used)                          |
| plain text (.txt)   | one prompt a line                                                   |

"text" is the last user message: what a reward function receives as the prompt. A line with
an empty prompt, or no user message, is a problem "FILE:LINE: ..." and is skipped; a file where
more than half the lines are bad stops before any training.
"""
from __future__ import annotations

import json
from pathlib import Path

from homellm.data import conversations, deep_json
from homellm.data.conversations import DataError, Dataset, _Bad, _messages


def _record(d, where: str) -> dict:
    if isinstance(d, str):
        messages = [{"role": "user", "content": d}]
        extra = {}
    elif isinstance(d, dict):
        extra = {k: v for k, v in d.items() if k not in ("prompt", "messages", "chosen", "rejected")}
        if "prompt" in d:
            p = d["prompt"]
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
        elif "messages" in d:
            messages = _messages(d["messages"], "messages")
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # an SFT example: answer its question again
        else:
            raise _Bad(f"expected 'prompt' or 'messages', got keys {', '.join(sorted(d)[:6]) or '(none)'}")
    else:
        raise _Bad(f"expected a JSON object or string, got {type(d).__name__}")
    if not messages or messages[-1]["role"] != "user":
        raise _Bad("the prompt must end with a user message")
    text = messages[-1]["content"]
    if not text.strip():
        raise _Bad("empty prompt: the user message has no text")
    return {"prompt": messages, "text": text, "extra": extra}


def read_prompts(path: str | Path, max_bad: float = conversations.MAX_BAD) -> Dataset:
    path = Path(path)
    data = Dataset(path=path, kind="prompts")
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompts file: {e.strerror or e}") from None
    plain = path.suffix == ".txt"
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if plain:
                    if not line.strip():
                        continue
                    data.n_lines += 1
                    data.records.append(_record(line.rstrip("\n"), where))
                    continue
                if not line.strip():
                    continue
                data.n_lines += 1
                try:
                    record = deep_json.loads(line)
                    bad_text = deep_json.lone_surrogate(record, line)
                    if bad_text:
                        raise _Bad(bad_text)
                    data.records.append(_record(record, where))
                except json.JSONDecodeError as e:
                    data.problems.append(f"{where}: not JSON: {e.msg} (column {e.colno})")
                except ValueError as e:
                    data.problems.append(f"{where}: {e}")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    if data.n_lines == 0:
        raise DataError(f"{path}: no prompts (the file is empty)")
    bad = len(data.problems)
    if not data.records or bad > max_bad * data.n_lines:
        shown = "\n  ".join(data.problems[:5])
        more = f"\n  ... and {bad - 5} more" if bad > 5 else ""
        raise DataError(f"{path}: {bad} of {data.n_lines} prompts are malformed and "
                        f"{len(data.records)} are usable; fix the file before training:\n  {shown}{more}")
    return data
