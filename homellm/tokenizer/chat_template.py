"""Chat templates: the model's own Jinja template, rendered as transformers renders it.

transformers' `apply_chat_template` compiles the template in a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that
keeps non-ASCII text, and the globals `raise_exception` and `strftime_now`; it passes
`messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens
(`bos_token`, `eos_token`, ...). We do the same, so a template renders here exactly as it
does there. The `{% generation %}` tag some templates use to mark assistant text is accepted
and renders its body (we find assistant text by rendering prefixes, see `assistant_spans`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from homellm.errors import HomellmError

# Used for models whose files carry no template: plain ChatML (<|im_start|>role\n...<|im_end|>\n),
# the format most small open chat models are trained on.
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass
class AssistantSpan:
    """Characters [start, end) of one assistant reply in a rendered conversation."""

    message_index: int
    start: int
    end: int


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to.

    `source=None` selects `CHATML_FALLBACK` (and `is_fallback` is True): a model without a
    template is assumed to speak ChatML.
    """

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None):
        self.is_fallback = source is None
        self.source = CHATML_FALLBACK if source is None else source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise HomellmError(f"the chat template does not compile: {e.message} "
                               f"(template line {e.lineno})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra) -> str:
        """The conversation as the template writes it (text, special tokens spelled out)."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise HomellmError(f"chat message {i} must be a dict with a 'role', got {message!r}")
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=tools,
                                         documents=None, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as e:
            raise HomellmError(f"the chat template failed to render: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
            raise HomellmError(f"the chat template failed to render: {type(e).__name__}: {e}") from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[AssistantSpan]]:
        """Render the whole conversation once and find each assistant reply in it.

        A reply's span starts where the prompt for it ends (the render of the messages before
        it with add_generation_prompt=True) and ends where the render through it ends, so it
        holds the reply and whatever the template writes to close it (e.g. "<|im_end|>\\n").
        Templates that rewrite earlier turns depending on later ones (some drop old reasoning)
        fall back to finding the reply's text after the previous span.
        """
        full = self.render(messages, add_generation_prompt=False)
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if full.startswith(prompt) and full.startswith(through) and len(prompt) <= len(through):
                start, end = len(prompt), len(through)
            else:
                content = message.get("content")
                start = full.find(content, cursor) if isinstance(content, str) and content else -1
                if start < 0:
                    raise HomellmError(f"cannot locate assistant message {i} in the rendered "
                                       f"conversation: the chat template rewrites earlier turns")
                end = start + len(content)
            spans.append(AssistantSpan(i, start, end))
            cursor = end
        return full, spans
