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

from pathlib import Path

from homellm.data import conversations
from homellm.data.conversations import Dataset, _Bad, _messages


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
    """Prompts from a JSONL file (or a .txt file, a prompt a line)."""
    path = Path(path)
    data = conversations.read_jsonl(Dataset(path=path, kind="prompts"), lambda d, where: [_record(d, where)],
                                    "prompts file", plain=path.suffix == ".txt")
    return conversations.check_usable(data, max_bad, "prompts", "prompts")
