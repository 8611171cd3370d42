"""Preference pairs for a reward model, from every format people publish them in.

    data = read_pairs("pairs.jsonl")     # Dataset of {"prompt", "chosen", "rejected"} records
    pair = pair_from_record(json_obj, "pairs.jsonl:3")   # [] / [pair] / [pairs of a tree]

One record a line; the format is recognized per record, so files may mix them:

| format                 | a line                                                               |
|------------------------|----------------------------------------------------------------------|
| DPO pair               | {"prompt": str or [messages], "chosen": str or [messages],           |
|                        |  "rejected": str or [messages]}  (`homellm data export --dpo`)        |
| Open Assistant tree    | {"message_tree_id", "prompt": {message tree}}: its ranked siblings   |
| implicit prompt        | {"chosen": [messages], "rejected": [messages], "margin"?}: two whole  |
|                        | conversations that share a beginning (`data export --rm`, TRL's form) |
| Anthropic HH           | {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}    |
| Stanford SHP           | {"history": str, "human_ref_A": str, "human_ref_B": str,             |
|                        |  "labels": 1 if A is preferred else 0}                                |
| arena battle           | {"conversation_a", "conversation_b", "winner": "model_a" | "model_b"  |
|                        |  | "tie" | "tie (bothbad)"}  (LMSYS's arena data, `arena export`)    |

Every pair becomes {"prompt": [messages ending with the user's], "chosen": [assistant
messages], "rejected": [...]}: the shape `homellm tune dpo` reads, and what the reward model
scores (the prompt followed by each reply). A tie, or a tree without ranked siblings, gives no
pair (it is not an error). A pair whose two replies are the same text, an empty prompt or an
empty reply is a problem "FILE:LINE: what is wrong", as in data/conversations.py; a file where
more than half the records are bad stops before any training.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from homellm.data import conversations
from homellm.data.conversations import Dataset, _Bad, _messages

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLE = {"Human": "user", "Assistant": "assistant"}
ARENA_WINNER = {"model_a": "a", "model_b": "b"}


def _hh(text, what: str) -> list[dict]:
    """An Anthropic HH transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...") as messages."""
    if not isinstance(text, str):
        raise _Bad(f"field '{what}': expected a string transcript")
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise _Bad(f"field '{what}': not a transcript of '\\n\\nHuman:' and '\\n\\nAssistant:' turns "
                   f"(and no 'prompt' field)")
    return [{"role": HH_ROLE[parts[i]], "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def split_conversations(chosen: list[dict], rejected: list[dict]) -> dict:
    """Two whole conversations with a common beginning -> {"prompt", "chosen", "rejected"}:
    the prompt is what they share, each reply what follows (it must start with the assistant)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise _Bad("'chosen' and 'rejected' are the same conversation")
    prompt, a, b = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or not any(m["role"] == "user" for m in prompt):
        raise _Bad("the two conversations share no prompt (they differ from their first message)")
    if prompt[-1]["role"] != "user":
        raise _Bad("the two conversations part after an assistant message: expected them to "
                   "part at the reply to a user message")
    if not a or not b:
        raise _Bad("one conversation is the beginning of the other: no reply to compare")
    if a[0]["role"] != "assistant" or b[0]["role"] != "assistant":
        raise _Bad("the two conversations part at a user message, not at the assistant's reply")
    return {"prompt": prompt, "chosen": a, "rejected": b}


def _check(pair: dict) -> dict:
    """The checks every pair passes, whatever its format."""
    if not any(m["content"].strip() for m in pair["prompt"] if m["role"] == "user"):
        raise _Bad("empty prompt: the user's messages have no text")
    for side in ("chosen", "rejected"):
        if not any(m["content"].strip() for m in pair[side]):
            raise _Bad(f"field '{side}': empty reply")
    if [m["content"].strip() for m in pair["chosen"]] == [m["content"].strip() for m in pair["rejected"]]:
        raise _Bad("'chosen' and 'rejected' are the same reply: a pair must prefer one text to another")
    return pair


def pair_from_record(d, where: str) -> list[dict]:
    """The preference pairs one parsed line holds (see the module docstring)."""
    if not isinstance(d, dict):
        raise _Bad(f"expected a JSON object, got {type(d).__name__}")
    if "history" in d and "human_ref_A" in d:  # SHP
        history, a, b, label = d["history"], d.get("human_ref_A"), d.get("human_ref_B"), d.get("labels")
        if not all(isinstance(x, str) for x in (history, a, b)):
            raise _Bad("SHP fields 'history', 'human_ref_A', 'human_ref_B': expected strings")
        if label not in (0, 1, True, False):
            raise _Bad(f"SHP field 'labels': expected 1 (A preferred) or 0 (B preferred), got "
                       f"{json.dumps(label)[:40]}")
        chosen, rejected = (a, b) if label else (b, a)
        return [_check({"prompt": [{"role": "user", "content": history}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})]
    if "conversation_a" in d and "winner" in d:  # an arena battle
        side = ARENA_WINNER.get(d["winner"])
        if d["winner"] not in ("model_a", "model_b", "tie", "tie (bothbad)"):
            raise _Bad(f"field 'winner': expected model_a, model_b, tie or 'tie (bothbad)', got "
                       f"{json.dumps(d['winner'])[:40]}")
        if side is None:
            return []
        a = _messages(d["conversation_a"], "conversation_a")
        b = _messages(d.get("conversation_b"), "conversation_b")
        return [_check(split_conversations(a, b) if side == "a" else split_conversations(b, a))]
    if "prompt" in d or conversations._is_tree(d):  # a DPO pair, or a tree's ranked siblings
        return [_check(p) for p in conversations.dpo_records(d, where)]
    if "chosen" in d and "rejected" in d:
        c, r = d["chosen"], d["rejected"]
        if isinstance(c, list) and isinstance(r, list):  # implicit prompt
            return [_check(split_conversations(_messages(c, "chosen"), _messages(r, "rejected")))]
        return [_check(split_conversations(_hh(c, "chosen"), _hh(r, "rejected")))]  # HH
    raise _Bad(f"unknown record: expected a DPO pair (prompt/chosen/rejected), chosen/rejected "
               f"conversations, HH or SHP fields, an arena battle or an Open Assistant tree, got "
               f"keys {', '.join(sorted(d)[:6]) or '(none)'}")


def read_pairs(path: str | Path, max_bad: float = conversations.MAX_BAD) -> Dataset:
    """Preference pairs from a JSONL file of any of the formats above (DataError when it
    cannot be used; bad lines listed in `problems`)."""
    data = conversations.read_jsonl(Dataset(path=Path(path), kind="pairs"), pair_from_record, "pairs file")
    why = "" if data.records or data.problems else \
        " (no record holds a preference: ties and unranked trees give none)"
    return conversations.check_usable(data, max_bad, "records", "preference pairs", why)


def fingerprint(pair: dict) -> str:
    """A short stable id of a pair's content (prompt, chosen, rejected)."""
    blob = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False,
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:24]
