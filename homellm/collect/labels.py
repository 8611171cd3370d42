"""Open Assistant's text labels, which of them each kind of message gets, and acceptance.

The labels, their widgets and texts are Open Assistant's `TextLabel`
(oasst-shared/oasst_shared/schemas/protocol.py); the lists per kind of message and the
mandatory `spam` are its `TreeManagerConfiguration`. Every value is a number from 0 to 1:
- yes_no (spam, fails_task): 1 yes, 0 no;
- flag (lang_mismatch, pii, not_appropriate, hate_speech, sexual_content): 1 set, 0 not;
- likert (quality, helpfulness, creativity, humor, toxicity, violence): a five-point scale
  sent as 0, 0.25, 0.5, 0.75 or 1 (any value from 0 to 1 is taken).

A review in "full" mode may set any of the kind's labels and must set the mandatory ones; in
"simple" mode (a share of the prompter replies, `p_full_labeling_review_*`) only the
mandatory labels, lang_mismatch and quality are offered.

Acceptance (OA's `_calculate_acceptance`): 1 - (mean of spam + mean of lang_mismatch over the
message's reviews, a review without lang_mismatch counting 0); a message is accepted when
this is above the threshold once it has its reviews.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    name: str
    widget: str                     # "yes_no" | "flag" | "likert"
    display_text: str
    help_text: str | None = None

    def json(self) -> dict:
        return {"name": self.name, "widget": self.widget, "display_text": self.display_text,
                "help_text": self.help_text}


LABELS = {x.name: x for x in (
    Label("spam", "yes_no", "Seems to be intentionally low-quality or irrelevant"),
    Label("fails_task", "yes_no", "Fails to follow the correct instruction / task"),
    Label("lang_mismatch", "flag", "Wrong Language",
          "The message is written in a language that differs from the currently selected "
          "language."),
    Label("pii", "flag", "Contains personal identifiable information (PII)"),
    Label("not_appropriate", "flag", "Inappropriate"),
    Label("hate_speech", "flag", "Content is abusive or threatening and expresses prejudice "
          "against a protected characteristic",
          "Prejudice refers to preconceived views not based on reason. Protected "
          "characteristics include gender, ethnicity, religion, sexual orientation, and "
          "similar characteristics."),
    Label("sexual_content", "flag", "Contains sexual content"),
    Label("quality", "likert", "Overall subjective quality rating of the message"),
    Label("toxicity", "likert", "Rude, abusive, profane or insulting content"),
    Label("humor", "likert", "Humorous content including sarcasm"),
    Label("helpfulness", "likert", "Helpfulness of the message"),
    Label("creativity", "likert", "Creativity"),
    Label("violence", "likert", "Violence/abuse/terrorism/self-harm"),
)}

_PROMPT = ("spam", "lang_mismatch", "quality", "creativity", "humor", "toxicity", "violence",
           "not_appropriate", "pii", "hate_speech", "sexual_content")
VALID = {  # the labels of each kind of message, in OA's order
    "initial_prompt": _PROMPT,
    "prompter": _PROMPT,
    "assistant": ("spam", "lang_mismatch", "fails_task", "quality", "helpfulness", "creativity",
                  "humor", "toxicity", "violence", "not_appropriate", "pii", "hate_speech",
                  "sexual_content"),
}
MANDATORY = ("spam",)
SIMPLE_EXTRA = ("lang_mismatch", "quality")


class LabelError(ValueError):
    """A label submission that does not fit its task; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def valid_labels(kind: str, mode: str) -> list[str]:
    """The labels a review of a message of `kind` ("initial_prompt", "prompter",
    "assistant") offers in `mode` ("full" or "simple")."""
    if mode == "full":
        return list(VALID[kind])
    return list(MANDATORY) + [x for x in SIMPLE_EXTRA if x not in MANDATORY]


def check(values, valid: list[str], mandatory: list[str]) -> dict[str, float]:
    """The submitted labels as {name: float}; LabelError names what is wrong."""
    if not isinstance(values, dict):
        raise LabelError("labels: expected an object {name: value from 0 to 1}", "labels")
    out = {}
    for name, v in values.items():
        if name not in valid:
            known = "a label this task offers" if name in LABELS else "a known label"
            raise LabelError(f"labels.{name}: not {known} (this task takes: "
                             f"{', '.join(valid)})", f"labels.{name}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise LabelError(f"labels.{name}: expected a number from 0 to 1, got {v!r}",
                             f"labels.{name}")
        out[name] = float(v)
    missing = [m for m in mandatory if m not in out]
    if missing:
        raise LabelError(f"labels: the mandatory label{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} must be set", f"labels.{missing[0]}")
    return out


def acceptance(reviews: list[dict]) -> float:
    """OA's acceptance score of a message from its reviews' label dicts."""
    if not reviews:
        return 0.0
    spam = sum(r.get("spam", 0.0) for r in reviews) / len(reviews)
    mismatch = sum(r.get("lang_mismatch") or 0.0 for r in reviews) / len(reviews)
    return 1.0 - (spam + mismatch)

