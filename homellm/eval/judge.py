"""An LLM judge, MT-bench style: compare two models' answers pairwise, or grade answers 1-10.

    prompts = pairwise_prompts(questions, answers_a, answers_b)   # both orders a question
    replies = run_judgments(judge, prompts, cache, max_tokens=1024)  # judges.py
    results = pair_results(questions, answers_a, answers_b, replies)
    metrics = pairwise_metrics(results)   # win / tie / loss, intervals, length-controlled

The method is the one of Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot
Arena" (FastChat's llm_judge), with our own prompts:
- pairwise: every question is judged twice, A shown first and then B shown first. A verdict
  counts only when it survives the swap; two verdicts that disagree make a tie (the judge's
  position bias cancels). The judge ends its reply with [[A]], [[B]] or [[C]] (a tie).
- single: each answer is graded on its own, "Rating: [[N]]" with N from 1 to 10.
A reply without a readable verdict is an error: reported and counted apart, never a tie.

Multi-turn questions are judged once over the whole conversation (every turn's answer, each
after its own user turn). A question's "reference" answers, when given, are shown to the judge.

The judge is a model homellm loads or any OpenAI-compatible endpoint (judges.py).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from homellm.errors import HomellmError
from homellm.eval.answers import Answer, Question
from homellm.eval.judges import Reply

PAIRWISE_SYSTEM = (
    "You are a careful and impartial judge of AI assistants. You read how two assistants "
    "answered the same user and decide which one served the user better.")

PAIRWISE_TASK = (
    "Below, the same user messages were answered by assistant A and by assistant B. Decide "
    "which assistant answered better{scope}: more helpful, correct, relevant and complete, and "
    "clearer. The order in which the assistants appear, the length of their answers and their "
    "names must not sway you.{reference_note}\n\n"
    "{reference}{first}\n\n{second}\n\n"
    "Explain your reasoning in a few sentences. Then, on the last line, give your verdict as "
    "exactly one of: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] if "
    "they are equally good.")

SINGLE_SYSTEM = (
    "You are a careful and impartial judge of AI assistants. You read how an assistant "
    "answered a user and grade the quality of its answers.")

SINGLE_TASK = (
    "Below is a conversation between a user and an assistant. Grade the assistant's "
    "answers{scope}: how helpful, correct, relevant, complete and clear they are.{reference_note}"
    "\n\n{reference}{conversation}\n\n"
    "Explain your grade in a few sentences. Then, on the last line, give a rating from 1 "
    "(useless) to 10 (excellent) in the form Rating: [[N]], N a whole number.")

REFERENCE_NOTE = " A reference answer is given: use it to check whether the answers are right."


# -- prompts -----------------------------------------------------------------------------

def _conversation(question: Question, replies: Sequence[str], who: str) -> str:
    lines = [f"[Conversation with {who}]"]
    for turn, reply in zip(question.turns, replies):
        lines += [f"User: {turn}", "", f"{who[0].upper() + who[1:]}: {reply}", ""]
    lines[-1] = f"[End of the conversation with {who}]"
    return "\n".join(lines)


def _reference(question: Question) -> tuple[str, str]:
    if not question.reference:
        return "", ""
    parts = []
    for i, ref in enumerate(question.reference):
        parts.append(f"[Reference answer to user message {i + 1}]\n{ref}\n[End of the reference answer]")
    return REFERENCE_NOTE, "\n\n".join(parts) + "\n\n"


def _scope(question: Question) -> str:
    return " over the whole conversation" if len(question.turns) > 1 else ""


def pairwise_prompt(question: Question, first: Sequence[str], second: Sequence[str]) -> list[dict]:
    """Chat messages asking which of two conversations is better; `first` is shown as A."""
    note, reference = _reference(question)
    task = PAIRWISE_TASK.format(scope=_scope(question), reference_note=note, reference=reference,
                                first=_conversation(question, first, "assistant A"),
                                second=_conversation(question, second, "assistant B"))
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": task}]


def single_prompt(question: Question, replies: Sequence[str]) -> list[dict]:
    """Chat messages asking for a 1-10 grade of one model's answers."""
    note, reference = _reference(question)
    task = SINGLE_TASK.format(scope=_scope(question), reference_note=note, reference=reference,
                              conversation=_conversation(question, replies, "the assistant"))
    return [{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": task}]


# -- reading the judge's reply -------------------------------------------------------------

VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RATING_LOOSE = re.compile(r"rating\s*:?\s*\[?\s*(\d+(?:\.\d+)?)\s*\]?", re.IGNORECASE)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_verdict(reply: str) -> tuple[str | None, str]:
    """("A" | "B" | "C", "") from a pairwise reply, or (None, why it has no verdict).

    One marker, even repeated, is the verdict. Several different ones (a judge that quotes the
    instructions, or changes its mind) count only when the last line holds exactly one."""
    def found(text):
        return {("C" if m.group(1).lower() == "tie" else m.group(1).upper())
                for m in VERDICT.finditer(text)}
    every = found(reply)
    if len(every) == 1:
        return every.pop(), ""
    if not every:
        return None, "no verdict: the reply has none of [[A]], [[B]], [[C]]"
    last = found(_last_line(reply))
    if len(last) == 1:
        return last.pop(), ""
    named = ", ".join(f"[[{v}]]" for v in sorted(every))
    return None, f"several verdicts ({named}) and none alone on the last line"


def parse_rating(reply: str) -> tuple[float | None, str]:
    """(rating in 1..10, "") from a single-answer reply ("Rating: [[7]]"), or (None, why not)."""
    for pattern in (RATING, RATING_LOOSE):
        every = {float(m.group(1)) for m in pattern.finditer(reply)}
        if len(every) > 1:
            every = {float(m.group(1)) for m in pattern.finditer(_last_line(reply))}
            if len(every) != 1:
                return None, "several ratings and none alone on the last line"
        if every:
            rating = every.pop()
            if not 1 <= rating <= 10:
                return None, f"rating {rating:g} is outside 1-10"
            return rating, ""
    return None, "no rating: the reply has no Rating: [[N]]"


# -- verdicts -----------------------------------------------------------------------------

@dataclass
class PairResult:
    question: Question
    a: Answer
    b: Answer
    replies: tuple[Reply, Reply]  # (A shown first, B shown first)
    verdicts: tuple[str | None, str | None]  # as the judge wrote them: "A", "B", "C" or None
    errors: tuple[str, str]
    outcome: str  # for model A: "win", "tie", "loss", or "error"
    consistent: bool  # both orders gave the same winner

    def to_json(self, label_a: str, label_b: str) -> dict:
        q = self.question

        def verdict(i, shown_first):
            v = self.verdicts[i]
            winner = None if v is None else "tie" if v == "C" else (
                shown_first if v == "A" else (label_b if shown_first == label_a else label_a))
            return {"shown_first": shown_first, "reply": self.replies[i].text,
                    "verdict": v, "winner": winner, "error": self.errors[i] or None}
        final = {"win": label_a, "loss": label_b, "tie": "tie", "error": None}[self.outcome]
        return {"question_id": q.id, "category": q.category, "turns": q.turns,
                "reference": q.reference, "answers": {label_a: self.a.turns, label_b: self.b.turns},
                "lengths": {label_a: self.a.length, label_b: self.b.length},
                "verdicts": [verdict(0, label_a), verdict(1, label_b)],
                "outcome": self.outcome, "winner": final, "consistent": self.consistent}


# verdict letter -> outcome for model A, when A was shown first / when B was
_FIRST = {"A": "win", "B": "loss", "C": "tie"}
_SWAPPED = {"A": "loss", "B": "win", "C": "tie"}


def pairwise_prompts(questions: Sequence[Question], a: dict[str, Answer],
                     b: dict[str, Answer]) -> list[list[dict]]:
    """Two prompts a question: A shown first, then B shown first."""
    prompts = []
    for q in questions:
        prompts.append(pairwise_prompt(q, a[q.id].turns, b[q.id].turns))
        prompts.append(pairwise_prompt(q, b[q.id].turns, a[q.id].turns))
    return prompts


def pair_results(questions: Sequence[Question], a: dict[str, Answer], b: dict[str, Answer],
                 replies: Sequence[Reply]) -> list[PairResult]:
    """The outcome of each question from its two replies (pairwise_prompts' order)."""
    results = []
    for k, q in enumerate(questions):
        pair = (replies[2 * k], replies[2 * k + 1])
        parsed = [parse_verdict(r.text) if r.text is not None else (None, r.error) for r in pair]
        (v1, e1), (v2, e2) = parsed
        if v1 is None or v2 is None:
            outcome, consistent = "error", False
        else:
            first, swapped = _FIRST[v1], _SWAPPED[v2]
            consistent = first == swapped
            outcome = first if consistent else "tie"  # MT-bench: a verdict must survive the swap
        results.append(PairResult(q, a[q.id], b[q.id], pair, (v1, v2), (e1, e2), outcome,
                                  consistent))
    return results


def pairwise_metrics(results: Sequence[PairResult]) -> dict:
    """stats.pairwise_summary over the questions with an outcome, and the error counts."""
    from homellm.eval.stats import pairwise_summary
    ok = [r for r in results if r.outcome != "error"]
    out = pairwise_summary([r.outcome for r in ok], [r.a.length for r in ok],
                           [r.b.length for r in ok])
    out["questions"] = len(results)
    out["errors"] = len(results) - len(ok)
    out["inconsistent"] = sum(1 for r in ok if not r.consistent)
    return out


@dataclass
class GradeResult:
    question: Question
    answer: Answer
    reply: Reply
    rating: float | None
    error: str

    def to_json(self, label: str) -> dict:
        q = self.question
        return {"question_id": q.id, "category": q.category, "turns": q.turns,
                "reference": q.reference, "model": label, "answer": self.answer.turns,
                "length": self.answer.length, "reply": self.reply.text, "rating": self.rating,
                "error": self.error or None}


def grade_results(questions: Sequence[Question], answers: dict[str, Answer],
                  replies: Sequence[Reply]) -> list[GradeResult]:
    results = []
    for q, r in zip(questions, replies):
        rating, error = parse_rating(r.text) if r.text is not None else (None, r.error)
        results.append(GradeResult(q, answers[q.id], r, rating, error))
    return results


def write_results(path: Path, rows: Sequence[dict]) -> None:
    """The per-question results as JSONL, written whole (temp file + rename)."""
    import tempfile
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise HomellmError(f"{path}: cannot write the results: {e.strerror or e}") from None


def single_metrics(results: Sequence[GradeResult]) -> dict:
    """Mean rating (with its 95% bootstrap interval over the questions) and the error count."""
    from homellm.eval.stats import mean_interval
    ratings = [r.rating for r in results if r.rating is not None]
    mean = sum(ratings) / len(ratings) if ratings else float("nan")
    return {"questions": len(results), "n": len(ratings), "errors": len(results) - len(ratings),
            "mean_rating": mean, "mean_rating_ci": list(mean_interval(ratings)),
            "mean_length": (sum(r.answer.length for r in results) / len(results)
                            if results else float("nan"))}
