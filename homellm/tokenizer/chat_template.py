"""Chat templates: the model's own Jinja template, rendered as transformers renders it.

transformers' `apply_chat_template` compiles the template in a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that
keeps non-ASCII text, and the globals `raise_exception` and `strftime_now`; it passes
`messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens
(`bos_token`, `eos_token`, ...). We do the same, so a template renders here exactly as it
does there. The `{% generation %}` tag some templates use to mark assistant text is accepted
and renders its body (we find assistant text by rendering prefixes, see `assistant_spans`).

A template comes from a model file, so it is untrusted code. The sandbox stops it reaching
Python's internals; the limits here stop it spending the machine (a 60-byte template can
otherwise write 50 MB, loop 10**10 times or ask for a 4 GB string). Through the sandbox's
own hooks, every render is bounded in
- time: RENDER_SECONDS, checked at each loop iteration, call, operator and output piece;
- loop iterations: LOOP_ITERATIONS over the whole render (every `for` is wrapped);
- size: every string or list an operator (`*`, `+`, `~`, `%`, `**` for numbers), a call or a
  filter makes, and the output itself, at most OUTPUT_CHARS plus 4x the conversation's own
  text; a width in a format string, or a width or count given to a filter or a str method,
  above that is refused before anything is allocated;
- depth: Python's recursion limit (a macro that calls itself forever).
A template over a limit raises HomellmError ("the chat template failed to render: ...").
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import wraps

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from homellm.errors import HomellmError

# Used for models whose files carry no template: plain ChatML (<|im_start|>role\n...<|im_end|>\n),
# the format most small open chat models are trained on.
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (ai.google.dev/gemma/docs/core/prompt-structure): user and "model" turns
# between <start_of_turn>ROLE\n and <end_of_turn>\n, a system message put in front of the next
# user turn (Gemma has no system role), BOS first.
GEMMA_FALLBACK = (
    "{{ bos_token or '' }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\n' + ns.system + message['content'] + '<end_of_turn>\n' }}{% set ns.system = '' %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# a model without a template speaks the turn format whose special tokens its vocabulary has
FALLBACKS = ((("<start_of_turn>", "<end_of_turn>"), GEMMA_FALLBACK), ((), CHATML_FALLBACK))

RENDER_SECONDS = 5.0        # a real template renders a long conversation in milliseconds
LOOP_ITERATIONS = 1_000_000  # over all the loops of one render
OUTPUT_CHARS = 1 << 20      # characters a render may write beyond 4x the conversation's text
INT_BITS = 4096             # the largest integer an operator may make (10**1233)
_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string
WIDTH_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}  # str methods given a width
_PASSED = (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment)  # pass_* filters


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A render went over one of the limits above."""


class _Budget:
    """What one render may still spend (per thread: renders run concurrently in a server)."""

    def __init__(self, max_chars: int, seconds: float = RENDER_SECONDS):
        self.max_chars = max_chars
        self.deadline = time.monotonic() + seconds
        self.iterations = LOOP_ITERATIONS

    def tick(self):
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {RENDER_SECONDS:g} s")

    def size(self, n: int, what: str):
        if n > self.max_chars:
            raise TemplateLimitError(f"{what} would be {n:,} long, more than the "
                                     f"{self.max_chars:,} characters a render may make")


_state = threading.local()
_COMPILE_BUDGET_CHARS = OUTPUT_CHARS  # Jinja folds constant filters at compile time


def _budget() -> _Budget:
    budget = getattr(_state, "budget", None)
    return budget if budget is not None else _Budget(_COMPILE_BUDGET_CHARS)


def _length(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else None


def _check_value(value, budget: _Budget, what: str):
    """A made value must fit the size budget; integers must stay below INT_BITS bits."""
    n = _length(value)
    if n is not None:
        budget.size(n, what)
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > INT_BITS:
        raise TemplateLimitError(f"{what} would be an integer of {value.bit_length():,} bits")


def _check_arguments(args, kwargs, budget: _Budget, what: str):
    """Integer arguments (widths, counts) above the size budget are refused before a call."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > budget.max_chars:
            raise TemplateLimitError(f"{what} got the argument {a:,}, more than the "
                                     f"{budget.max_chars:,} characters a render may make")


def _check_format_string(text, what: str):
    if isinstance(text, str) and _WIDTH.search(text):
        raise TemplateLimitError(f"{what}: a format width of a million or more")


def _replace_size(value, old, new) -> int | None:
    """Length of value.replace(old, new), found without making it."""
    if not all(isinstance(x, str) for x in (value, old, new)):
        return None
    count = value.count(old) if old else len(value) + 1
    return len(value) + count * (len(new) - len(old))


def _guard_filter(name: str, f):
    @wraps(f)  # (keeps Jinja's pass_context / pass_environment marks)
    def guarded(*args, **kwargs):
        budget = _budget()
        budget.tick()
        # the value filtered may be any number ({{ 1733400000|string }}); the arguments after
        # it are widths and counts (center, indent, wordwrap, slice, ...)
        first = 2 if args and isinstance(args[0], _PASSED) else 1
        _check_arguments(args[first:], kwargs, budget, f"the filter {name}")
        values = [a for a in args if isinstance(a, str)]
        if name == "format" and values:
            _check_format_string(values[0], f"the filter {name}")
        if name == "replace" and len(values) >= 3:  # (after the eval context: s, old, new)
            budget.size(_replace_size(*values[:3]), "the result of the filter replace")
        if name == "indent" and values:
            width = args[1] if len(args) > 1 else kwargs.get("width", 4)
            if isinstance(width, int):
                budget.size((values[0].count("\n") + 1) * abs(width) + len(values[0]),
                            "the result of the filter indent")
        result = f(*args, **kwargs)
        _check_value(result, budget, f"the result of the filter {name}")
        return result

    return guarded


class _Guards(NodeTransformer):
    """Every `for` iterates through environment.guard_iter; every `~` is environment.guard_concat."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("guard_iter"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("guard_concat"),
                          [nodes.List(node.nodes, lineno=node.lineno)], [], None, None,
                          lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with time, iteration and size limits (see the module docstring)."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _length(seq) is not None and isinstance(n, int):
                    budget.size(_length(seq) * n, f"{type(seq).__name__} * {n}")
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > INT_BITS:
                    raise TemplateLimitError(f"an integer product of over {INT_BITS} bits")
        elif operator == "+":
            if _length(left) is not None and _length(right) is not None:
                budget.size(_length(left) + _length(right), "a sum of sequences")
        elif operator == "%":
            _check_format_string(left, "the % operator")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and right * left.bit_length() > INT_BITS:
                raise TemplateLimitError(f"{left} ** {right} has over {INT_BITS} bits")
        result = super().call_binop(context, operator, left, right)
        _check_value(result, budget, f"the result of {operator}")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        budget = _budget()
        budget.tick()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(target, "__name__", "") in WIDTH_METHODS:
            _check_arguments(args, kwargs, budget, f"the call of {target.__name__}")
        if getattr(target, "__name__", "") in ("format", "format_map"):
            _check_format_string(getattr(target, "__self__", None), "str.format")
        if getattr(target, "__name__", "") == "replace" and len(args) >= 2:
            size = _replace_size(getattr(target, "__self__", None), args[0], args[1])
            if size is not None:
                budget.size(size, "the result of replace")
        result = super().call(__context, __obj, *args, **kwargs)
        _check_value(result, budget, "the result of a call")
        return result

    @staticmethod
    def guard_iter(iterable):
        """The items of a `for` loop, each one counted and timed."""
        budget = _budget()
        for item in iterable:
            budget.iterations -= 1
            if budget.iterations < 0:
                raise TemplateLimitError(f"its loops ran more than {LOOP_ITERATIONS:,} times")
            budget.tick()
            yield item

    @staticmethod
    def guard_concat(parts):
        """`a ~ b ~ c`: the joined text, within the size budget."""
        texts = [str(p) for p in parts]
        _budget().size(sum(map(len, texts)), "a string joined with ~")
        return "".join(texts)


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


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    return env


def _text_size(value, depth: int = 0) -> int:
    """Characters of text in a conversation (strings inside dicts and lists, shallowly)."""
    if isinstance(value, str):
        return len(value)
    if depth > 6:
        return 0
    if isinstance(value, dict):
        return sum(_text_size(k, depth + 1) + _text_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v, depth + 1) for v in value)
    return 8


@dataclass
class AssistantSpan:
    """Characters [start, end) of one assistant reply in a rendered conversation."""

    message_index: int
    start: int
    end: int


def fallback_for(special_tokens: set[str]) -> str:
    """The turn format for a model without a chat template, by the special (control) tokens
    of its vocabulary: Gemma's where it has <start_of_turn> and <end_of_turn>, else ChatML."""
    for needed, template in FALLBACKS:
        if all(t in special_tokens for t in needed):
            return template
    return CHATML_FALLBACK


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to.

    `source=None` selects `fallback` (and `is_fallback` is True): a model without a
    template is assumed to speak ChatML, or the format `fallback_for` finds in its vocabulary.
    """

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None,
                 fallback: str = CHATML_FALLBACK):
        if source is not None and not isinstance(source, str):
            raise HomellmError(f"the chat template is a {type(source).__name__}, not a string "
                               f"(a Jinja template)")
        self.is_fallback = source is None
        self.source = fallback if source is None else source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        env = _environment()
        try:
            tree = env.parse(self.source)
            tree = _Guards().visit(tree)
            tree.set_environment(env)
            self._template = env.from_string(tree)
        except jinja2.TemplateSyntaxError as e:
            raise HomellmError(f"the chat template does not compile: {e.message} "
                               f"(template line {e.lineno})") from None
        except RecursionError:
            raise HomellmError("the chat template does not compile: it nests too deeply") from None
        except (jinja2.TemplateError, MemoryError, ArithmeticError, ValueError, TypeError) as e:
            raise HomellmError(f"the chat template does not compile: {type(e).__name__}: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra) -> str:
        """The conversation as the template writes it (text, special tokens spelled out),
        within the limits of the module docstring."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise HomellmError(f"chat message {i} must be a dict with a 'role', got {message!r}")
        variables = {**self.special_tokens, **extra}
        budget = _Budget(OUTPUT_CHARS + 4 * (_text_size(messages) + _text_size(tools)
                                             + _text_size(variables)))
        _state.budget = budget
        try:
            pieces, n = [], 0
            for piece in self._template.generate(
                    messages=[dict(m) for m in messages], tools=tools, documents=None,
                    add_generation_prompt=add_generation_prompt, **variables):
                n += len(piece)
                budget.size(n, "the rendered prompt")
                budget.tick()
                pieces.append(piece)
            return "".join(pieces)
        except TemplateLimitError as e:
            raise HomellmError(f"the chat template failed to render: it went over a limit: {e}") from None
        except jinja2.TemplateError as e:
            raise HomellmError(f"the chat template failed to render: {e}") from None
        except RecursionError:
            raise HomellmError("the chat template failed to render: it recursed too deeply "
                               "(a macro or loop that calls itself without end)") from None
        except MemoryError:
            raise HomellmError("the chat template failed to render: it ran out of memory") from None
        except (TypeError, KeyError, AttributeError, ValueError, IndexError, ArithmeticError) as e:
            raise HomellmError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
            _state.budget = None

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
