"""Questions in MT-bench's JSONL format, and the models' answers to them, made once and kept.

    questions = load_questions("mt.jsonl")
    cache = AnswerCache(model_hash)                       # $HOMELLM_HOME/evals/answers/<hash>.jsonl
    missing = [q for q in questions if cache.get(q, settings) is None]
    for answer in generate_answers(model, missing, settings):
        cache.add(answer)                                 # appended at once: a killed run resumes

A question file has one JSON object a line, as FastChat's MT-bench writes them:
{"question_id": 81, "category": "writing", "turns": ["first user turn", "second user turn"]}
and optionally "reference": ["a reference answer for turn 1", ...] (shown to the judge).
A model answers turn 1, then turn 2 with its own first answer in the conversation, and so on.

An answer is keyed by the model's file hash (results.model_identity), the question's content
(its turns, not only its id: an edited question is answered again) and the settings that change
the text (max_tokens, sampling). The cache file of a model is appended one answer at a time
and flushed, so a run that is killed, or whose judge is down, keeps every answer made so far.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from homellm.errors import HomellmError

if TYPE_CHECKING:
    from homellm.api import Model


@dataclass
class Question:
    id: str  # question_id as text (MT-bench uses numbers)
    turns: list[str]
    category: str = ""
    reference: list[str] | None = None  # reference answers, one per turn (or fewer)

    def digest(self) -> str:
        """sha256 of the turns: what an answer depends on."""
        return hashlib.sha256(json.dumps(self.turns, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Answer:
    model_hash: str
    question_id: str
    key: str  # answer_key(model_hash, question, settings)
    turns: list[str]  # the model's reply to each user turn
    settings: dict
    tokens: list[int] = field(default_factory=list)  # generated tokens a turn
    finish_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def length(self) -> int:
        """Characters over all turns: the length the length-controlled win rate uses."""
        return sum(len(t) for t in self.turns)

    def to_json(self) -> dict:
        return {"key": self.key, "model_hash": self.model_hash, "question_id": self.question_id,
                "turns": self.turns, "settings": self.settings, "tokens": self.tokens,
                "finish_reasons": self.finish_reasons, "seconds": round(self.seconds, 4)}


def _field_error(path: Path, line: int, message: str) -> HomellmError:
    return HomellmError(f"{path}, line {line}: {message}")


def _text_list(path: Path, line: int, name: str, value, allow_empty_items: bool = False) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _field_error(path, line, f'"{name}" must be a non-empty list of strings, got '
                                       f"{json.dumps(value)[:60]}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or (not allow_empty_items and not item.strip()):
            raise _field_error(path, line, f'"{name}"[{i}] must be a non-empty string, got '
                                           f"{json.dumps(item)[:60]}")
    return list(value)


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read an MT-bench style question file; HomellmError names the line and field of a bad one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HomellmError(f"{path}: no such question file")
    if not path.is_file():
        raise HomellmError(f"{path}: not a file (expected a JSONL question file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HomellmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise HomellmError(f"{path}: cannot read: {e.strerror or e}") from None
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _field_error(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _field_error(path, n, "expected a JSON object with \"question_id\" and \"turns\"")
        if "turns" not in obj:
            raise _field_error(path, n, 'no "turns" field (expected a list of user messages)')
        turns = _text_list(path, n, "turns", obj["turns"])
        qid = obj.get("question_id")
        if qid is None:
            qid = n  # MT-bench files always carry ids; a hand-written file may not
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid) == "":
            raise _field_error(path, n, f'"question_id" must be a number or a string, got '
                                        f"{json.dumps(qid)[:40]}")
        if str(qid) in seen:
            raise _field_error(path, n, f'"question_id" {qid} repeats line {seen[str(qid)]}')
        seen[str(qid)] = n
        category = obj.get("category", "")
        if not isinstance(category, str):
            raise _field_error(path, n, f'"category" must be a string, got {json.dumps(category)[:40]}')
        reference = obj.get("reference")
        if reference is not None:
            reference = _text_list(path, n, "reference", reference, allow_empty_items=True)
            if len(reference) > len(turns):
                raise _field_error(path, n, f'"reference" has {len(reference)} answers for '
                                            f"{len(turns)} turns")
        questions.append(Question(str(qid), turns, category, reference))
    if not questions:
        raise HomellmError(f"{path}: no questions (the file is empty; expected one JSON object "
                           f'a line with "question_id" and "turns")')
    return questions


def answer_key(model_hash: str, question: Question, settings: dict) -> str:
    blob = json.dumps({"model": model_hash, "turns": question.digest(), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def answers_dir() -> Path:
    from homellm.eval.results import evals_dir
    return evals_dir() / "answers"


class JsonlCache:
    """Records kept one JSON line each, by their "key" field; appended and flushed one at a time.

    A line that does not parse (the tail of a write that was killed) is skipped, and the next
    append starts on a fresh line."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.is_file():
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    d = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(d, dict) and isinstance(d.get("key"), str):
                    self.records[d["key"]] = d

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        """Append one record (with a "key") and flush it to the disk."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a killed write left half a line: end it
                        f.write(b"\n")
                f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise HomellmError(f"cannot keep results in {self.path}: {e.strerror or e}") from None
        self.records[record["key"]] = record


class AnswerCache:
    """The kept answers of one model: `answers/<model hash>.jsonl`, one answer a line."""

    def __init__(self, model_hash: str, folder: Path | None = None):
        self.model_hash = model_hash
        self.lines = JsonlCache((folder or answers_dir()) / f"{model_hash}.jsonl")

    @property
    def path(self) -> Path:
        return self.lines.path

    def get(self, question: Question, settings: dict) -> Answer | None:
        d = self.lines.get(answer_key(self.model_hash, question, settings))
        try:
            answer = Answer(self.model_hash, str(d["question_id"]), d["key"], list(d["turns"]),
                            dict(d["settings"]), list(d.get("tokens", [])),
                            list(d.get("finish_reasons", [])), float(d.get("seconds", 0)))
        except (KeyError, TypeError, ValueError):
            return None  # (also d is None: not kept)
        ok = len(answer.turns) == len(question.turns) and all(isinstance(t, str) for t in answer.turns)
        return answer if ok else None

    def add(self, answer: Answer) -> None:
        self.lines.add(answer.to_json())


def answer_settings(max_tokens: int, sampling: dict) -> dict:
    """The settings an answer is keyed by: max_tokens and the sampling options given
    (greedy, temperature 0, unless the user asked otherwise)."""
    return {"max_tokens": int(max_tokens), "temperature": 0.0,
            **{k: v for k, v in sorted(sampling.items()) if v is not None}}


def generate_answers(model: "Model", model_hash: str, questions: Iterable[Question],
                     settings: dict, label: str = "",
                     on_turn: Callable[[int], None] | None = None) -> Iterator[Answer]:
    """Answer each question turn by turn, each turn with the model's earlier replies in the
    conversation; yields one Answer a question. on_turn(tokens) after each turn (progress)."""
    from homellm.errors import ContextOverflowError
    options = {k: v for k, v in settings.items() if k != "max_tokens"}
    for q in questions:
        t0 = time.perf_counter()
        messages: list[dict] = []
        replies, tokens, finishes = [], [], []
        for i, turn in enumerate(q.turns):
            messages.append({"role": "user", "content": turn})
            text, final = [], None
            try:
                for step in model.chat(messages, max_tokens=settings["max_tokens"], **options):
                    text.append(step.text)
                    if step.finish_reason:
                        final = step
            except ContextOverflowError as e:
                raise HomellmError(f"model {label}, question {q.id}, turn {i + 1}: {e}") from None
            reply = "".join(text)
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
            tokens.append(final.timings.generated_tokens if final and final.timings else 0)
            finishes.append(final.finish_reason if final else "stop")
            if on_turn is not None:
                on_turn(tokens[-1])
        yield Answer(model_hash, q.id, answer_key(model_hash, q, settings), replies, settings,
                     tokens, finishes, time.perf_counter() - t0)
