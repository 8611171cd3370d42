"""Conversation files for fine-tuning: SFT examples and DPO preference pairs from JSONL.

One record a line; the format is recognized per record, so files may mix them:

| format              | a line                                                              |
|---------------------|---------------------------------------------------------------------|
| OpenAI messages     | {"messages": [{"role": "system"/"user"/"assistant", "content": str}]} |
| ShareGPT            | {"conversations": [{"from": "human"/"gpt"/"system", "value": str}]}  |
| prompt / response   | {"prompt": str, "response": str}  ("completion" is read as response) |
| DPO pair            | {"prompt": str or [messages], "chosen": str or [messages],          |
|                     |  "rejected": str or [messages]}  (what `dpo_pairs` writes)          |
| Open Assistant tree | {"message_tree_id": ..., "prompt": {message tree}} (homellm.data.oasst) |

SFT records become {"messages": [...]} (OpenAI roles); a tree gives its best-rated paths
(`oasst.sft_examples`). DPO records become {"prompt": [messages], "chosen": [assistant
messages], "rejected": [...]}; a tree gives its ranked sibling pairs (`oasst.dpo_pairs`).

A malformed record (including a string with a lone UTF-16 surrogate, JSON "\\ud800", which is
not Unicode text) is reported as "FILE:LINE: what is wrong" and skipped; a file where more
than `max_bad` of the records are bad (or none is good) raises DataError before any training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from homellm.data import deep_json
from homellm.errors import HomellmError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
MAX_BAD = 0.5  # the fraction of bad records that stops a run


class DataError(HomellmError):
    """A data file that cannot be used: missing, unreadable, or mostly malformed."""


class _Bad(ValueError):
    pass


@dataclass
class Dataset:
    """Records read from one file, and what was wrong with the lines that were skipped."""

    path: Path
    kind: str  # "sft" or "dpo"
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: message"
    n_lines: int = 0  # non-blank lines

    def __len__(self) -> int:
        return len(self.records)


def _messages(value, what: str) -> list[dict]:
    """A list of {"role", "content"} dicts with known roles and string content."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"field '{what}': expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"field '{what}' message {i}: expected an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _Bad(f"field '{what}' message {i}: 'role' must be one of {', '.join(ROLES)}, "
                       f"got {json.dumps(role)}")
        if not isinstance(content, str):
            raise _Bad(f"field '{what}' message {i}: 'content' must be a string, got "
                       f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad("field 'conversations': expected a non-empty list of {from, value}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES:
            who = m.get("from") if isinstance(m, dict) else m
            raise _Bad(f"field 'conversations' turn {i}: 'from' must be one of "
                       f"{', '.join(SHAREGPT_ROLES)}, got {json.dumps(who)[:40]}")
        if not isinstance(m.get("value"), str):
            raise _Bad(f"field 'conversations' turn {i}: 'value' must be a string")
        out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    return out


def _reply(value, what: str) -> list[dict]:
    """A DPO completion: a string, or a list of (assistant) messages."""
    if isinstance(value, str):
        if not value:
            raise _Bad(f"field '{what}': empty reply")
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, what)
    if messages[-1]["role"] != "assistant":
        raise _Bad(f"field '{what}': the last message must be the assistant's reply")
    return messages


def _is_tree(d: dict) -> bool:
    return "message_tree_id" in d or (isinstance(d.get("prompt"), dict) and "message_id" in d["prompt"])


def sft_records(d, where: str) -> list[dict]:
    """The SFT examples one parsed line holds (a tree may hold several, or none)."""
    if not isinstance(d, dict):
        raise _Bad(f"expected a JSON object, got {type(d).__name__}")
    if _is_tree(d):
        from homellm.data import oasst
        return oasst.sft_examples(oasst.tree_from_dict(d, where))
    if "messages" in d:
        messages = _messages(d["messages"], "messages")
    elif "conversations" in d:
        messages = _sharegpt(d["conversations"])
    elif "prompt" in d and ("response" in d or "completion" in d):
        prompt, response = d["prompt"], d.get("response", d.get("completion"))
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise _Bad("fields 'prompt' and 'response': expected two strings, the response non-empty")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    elif "chosen" in d:
        raise _Bad("a preference pair (prompt/chosen/rejected): that is DPO data, not SFT")
    else:
        raise _Bad(f"unknown record: expected 'messages', 'conversations', 'prompt'+'response' "
                   f"or an Open Assistant tree, got keys {', '.join(sorted(d)[:6]) or '(none)'}")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise _Bad("no assistant reply to learn from")
    return [{"messages": messages}]


def dpo_records(d, where: str) -> list[dict]:
    """The preference pairs one parsed line holds (a tree may hold several, or none)."""
    if not isinstance(d, dict):
        raise _Bad(f"expected a JSON object, got {type(d).__name__}")
    if _is_tree(d):
        from homellm.data import oasst
        return oasst.dpo_pairs(oasst.tree_from_dict(d, where))
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in d]
    if missing:
        raise _Bad(f"a preference pair needs 'prompt', 'chosen' and 'rejected'; missing "
                   f"{', '.join(missing)}")
    prompt = d["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise _Bad("field 'prompt': empty")
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = _messages(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise _Bad("field 'prompt': the last message must be the user's")
    chosen, rejected = _reply(d["chosen"], "chosen"), _reply(d["rejected"], "rejected")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are the same reply")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def read_jsonl(data: Dataset, parse, what: str, plain: bool = False) -> Dataset:
    """Fill `data` from its JSONL file (`plain`: a text file, a line a record): each non-blank
    line's record through parse(record, where) -> records; a bad line (not JSON, not UTF-8 text,
    a lone surrogate, a ValueError from parse) goes to data.problems with its file and line."""
    path = data.path
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                data.n_lines += 1
                where = f"{path}:{lineno}"
                try:
                    if plain:
                        data.records.extend(parse(line.rstrip("\n"), where))
                        continue
                    record = deep_json.loads(line)  # a conversation tree may nest deeply
                    bad_text = deep_json.lone_surrogate(record, line)
                    if bad_text:
                        raise _Bad(bad_text)
                    data.records.extend(parse(record, where))
                except json.JSONDecodeError as e:
                    data.problems.append(f"{where}: not JSON: {e.msg} (column {e.colno})")
                except ValueError as e:  # _Bad here, oasst's ValueError already says where
                    text = str(e)
                    data.problems.append(text if text.startswith(where) else f"{where}: {text}")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return data


def check_usable(data: Dataset, max_bad: float, units: str, usable: str, why: str = "") -> Dataset:
    """DataError unless the file had records and at most `max_bad` of its lines were bad,
    naming the first five problems."""
    if data.n_lines == 0:
        raise DataError(f"{data.path}: no {units} (the file is empty)")
    bad = len(data.problems)
    if not data.records or bad > max_bad * data.n_lines:
        shown = "\n  ".join(data.problems[:5])
        more = f"\n  ... and {bad - 5} more" if bad > 5 else ""
        raise DataError(f"{data.path}: {bad} of {data.n_lines} {units} are malformed and "
                        f"{len(data.records)} {usable} are usable{why}; fix the file before "
                        f"training" + (f":\n  {shown}{more}" if bad else ""))
    return data


def read(path: str | Path, kind: str = "sft", max_bad: float = MAX_BAD) -> Dataset:
    """Read an SFT (kind="sft") or DPO (kind="dpo") JSONL file; see the module docstring."""
    parse = {"sft": sft_records, "dpo": dpo_records}[kind]
    data = read_jsonl(Dataset(path=Path(path), kind=kind), parse, "data file")
    return check_usable(data, max_bad, "records", "examples" if kind == "sft" else "preference pairs")
