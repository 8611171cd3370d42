"""Stream a completion through a served model, without HTTP: the serve layer's Python API.

The OpenAI routes call this, and so can the web app:

    settings = GenerationSettings(max_tokens=256, temperature=0.7, seed=None)
    stream = await start_chat(registry, "smollm2", messages, settings)  # APIError if refused
    async for delta in stream:          # Delta: text, tokens (ids and logprobs)
        ...
    stream.result                       # Result: finish_reason, usage, timings, seed
    stream.cancel()                     # e.g. the user pressed stop: frees the slot at once

`start_*` refuse at once (before any text) with an APIError: unknown model 404, a prompt
longer than the context 400 `context_length_exceeded`, a full queue 503 with Retry-After,
invalid settings 400 naming the field. A task cancelled while it waits for the next delta
cancels the request in the engine; a consumer that stops reading for another reason calls
`cancel()`, or reads inside `async with stream:`, which cancels on the way out.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, replace

from homellm.engine.sampling import SamplingParams

from homellm.serve.errors import APIError, invalid
from homellm.serve.registry import LoadedModel, ModelRegistry

MAX_STOPS = 16
MAX_STOP_CHARS = 1024
MAX_CACHE_KEY_CHARS = 1024


@dataclass
class GenerationSettings(SamplingParams):
    """A request's settings: the sampler's (SamplingParams' fields, the one sampling-settings
    type of the CLI, the Python API and the server; here with OpenAI's defaults, top_p 0
    meaning greedy; seed None: a random one, reported in Result.seed) and the rest of the
    request's."""

    temperature: float = 1.0          # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    max_tokens: int | None = None     # None: until the end of the reply or of the context
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0             # alternatives per token (logprobs of chosen tokens always)
    response_format: dict | None = None  # {"type": "json_object"} / {"type": "json_schema", ...}
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    logprobs: bool = True             # False: the tokens' logprobs are not computed (None)
    # a conversation whose keys and values the server keeps (in memory, then on disk) so its
    # next turn, even after a restart, is not prefilled again (OpenAI's prompt_cache_key)
    prompt_cache_key: str | None = None

    def __post_init__(self):
        pass  # checked as a request starts (routes set fields one by one): sampling_params()

    def sampling_params(self) -> SamplingParams:
        """What the sampler takes (ValueError naming a field out of range)."""
        greedy = self.top_p == 0  # OpenAI's top_p takes 0: the most likely token only
        return SamplingParams(
            temperature=self.temperature, top_k=1 if greedy else self.top_k,
            top_p=1.0 if greedy else self.top_p, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            seed=self.seed)


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float | None      # None: the first token of an echoed prompt (nothing before it)
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class Delta:
    text: str                                  # "" only on the last delta, if nothing is left
    tokens: list[TokenLogprob] = field(default_factory=list)  # the tokens behind this text


@dataclass
class Result:
    finish_reason: str          # "stop" (end of turn, stop string, complete JSON) or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int          # prompt tokens whose keys/values came from the prefix cache
    seed: int
    queued_s: float             # waiting for a slot
    ttft_s: float               # from admission to the first token
    decode_s: float
    model: str

    @property
    def decode_tps(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def timings(self) -> dict:
        """Speeds, as llama.cpp's server reports them next to `usage`."""
        fresh = self.prompt_tokens - self.cached_tokens
        return {"queued_ms": round(self.queued_s * 1e3, 2), "prompt_n": fresh,
                "prompt_cached": self.cached_tokens, "ttft_ms": round(self.ttft_s * 1e3, 2),
                "prompt_per_second": round(fresh / self.ttft_s, 2) if self.ttft_s > 0 else 0.0,
                "predicted_n": self.completion_tokens, "predicted_ms": round(self.decode_s * 1e3, 2),
                "predicted_per_second": round(self.decode_tps, 2)}


class CompletionStream:
    """The deltas of one running request (async iterator), then `.result`."""

    def __init__(self, registry: ModelRegistry, model: LoadedModel, ids: list[int],
                 settings: GenerationSettings, seed: int, grammar, prompt_param: str = "messages"):
        from homellm.api import TextStream
        from homellm.engine.batch import EngineClosedError, QueueFullError, Request
        from homellm.errors import ContextOverflowError

        self.registry, self.model, self.settings, self.seed = registry, model, settings, seed
        self.prompt_tokens = len(ids)
        self.prompt_ids = ids
        self.tool_format: str | None = None  # set by start_chat when the reply may hold tool calls
        self.result: Result | None = None
        self._tokenizer = model.tokenizer
        self._text = TextStream(model.tokenizer, settings.stop)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._count = 0
        self._pending: list[TokenLogprob] = []
        self._done = self._released = False
        s = settings
        try:
            params = replace(s, seed=seed).sampling_params()
        except ValueError as e:
            name = str(e).split("=")[0]
            raise invalid(name, str(e)) from None
        request = Request(ids, params, max_tokens=s.max_tokens,
                          stop_ids=frozenset(model.tokenizer.eos_ids),
                          top_logprobs=s.top_logprobs,
                          constraint=grammar.start() if grammar is not None else None,
                          logit_bias=s.logit_bias or None, logprobs=s.logprobs, adapter=model.adapter,
                          cache_key=s.prompt_cache_key or None)
        try:
            self._ticket = model.engine.submit(request, self._sink)
        except ContextOverflowError as e:
            raise APIError(400, f"This model's maximum context length is {e.n_ctx} tokens "
                           f"(at most {e.n_ctx - 1} for the prompt). However, your request has "
                           f"{e.n_prompt} prompt tokens: {e.n_prompt - e.n_ctx + 1} too many. "
                           "Please shorten the messages or prompt.",
                           param=prompt_param, code="context_length_exceeded") from None
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(int(e.retry_after_s))}) from None
        except EngineClosedError as e:  # unloaded (keep_alive) just as this request came
            raise APIError(503, str(e), type="server_error", code="model_unloaded",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise invalid(None, str(e)) from None

    def _sink(self, item):
        """From the engine thread: hand the step to this request's event loop. The request's
        hold on its model ends with its last step even if nobody reads it (a client gone
        before its response started)."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._loop.call_soon_threadsafe(self._release)

    def __aiter__(self):
        return self

    async def __aenter__(self) -> "CompletionStream":
        return self

    async def __aexit__(self, *exc):
        self.cancel()  # a no-op for the engine once the request has finished

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", type="server_error",
                                   code="generation_failed")
                if item.finish_reason is not None:
                    self._finish(item.finish_reason, item.timings)
                    text = self._text.flush()
                    if text or self._pending:
                        return self._delta(text)
                    raise StopAsyncIteration
                self._count += 1
                self._pending.append(self._logprob(item))
                text, hit = self._text.feed(item.token)
                if hit:
                    self._ticket.cancel()
                    self._finish("stop", self._ticket.timings)
                    return self._delta(text)
                if text:
                    return self._delta(text)
        except BaseException:
            self.cancel()
            raise

    def _delta(self, text: str) -> Delta:
        tokens, self._pending = self._pending, []
        return Delta(text, tokens)

    def _logprob(self, step) -> TokenLogprob:
        if step.logprob is None:  # not asked for: no text either
            return TokenLogprob(step.token, "", None)
        piece = self._tokenizer.decode
        top = [(i, piece([i]), lp) for i, lp in step.top_logprobs]
        return TokenLogprob(step.token, piece([step.token]), step.logprob, top)

    def _finish(self, reason: str, timings):
        self._done = True
        self.result = Result(
            finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=self._count,
            cached_tokens=timings.cached_tokens, seed=self.seed, queued_s=self._ticket.queued_s,
            ttft_s=timings.prefill_s, decode_s=timings.decode_s, model=self.model.id)
        metrics = getattr(self.registry, "metrics", None)
        if metrics is not None:
            metrics.observe(self.result)
        self._release()

    def cancel(self):
        """Stop generating now (the slot is free before the next decode step)."""
        self._ticket.cancel()
        self._done = True
        self._release()

    def _release(self):
        if not self._released:  # once: the request no longer keeps its model loaded
            self._released = True
            self.registry.release(self.model)

    async def collect(self) -> tuple[str, list[TokenLogprob]]:
        """The whole text and every token's logprobs (for non-streaming responses)."""
        text, tokens = [], []
        async for delta in self:
            text.append(delta.text)
            tokens.extend(delta.tokens)
        return "".join(text), tokens


def _check_settings(s: GenerationSettings):
    if len(s.stop) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop strings, got {len(s.stop)}")
    if any(not isinstance(x, str) for x in s.stop):
        raise invalid("stop", "expected a string or a list of strings")
    if any(len(x) > MAX_STOP_CHARS for x in s.stop):
        raise invalid("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters")
    if s.top_logprobs < 0 or s.top_logprobs > 20:
        raise invalid("top_logprobs", f"expected 0 to 20, got {s.top_logprobs}")
    if s.seed is not None and not -2**63 <= s.seed < 2**64 - 16:
        raise invalid("seed", f"expected a 64-bit integer, got {s.seed}")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise invalid("max_tokens", f"expected at least 1, got {s.max_tokens}")
    if s.prompt_cache_key is not None and (not isinstance(s.prompt_cache_key, str)
                                           or len(s.prompt_cache_key) > MAX_CACHE_KEY_CHARS):
        raise invalid("prompt_cache_key", f"expected a string of at most {MAX_CACHE_KEY_CHARS} characters")


def check_logit_bias(bias, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias}) as {int: float}; a 400 naming the entry for an
    id outside the vocabulary or a bias outside [-100, 100]."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("logit_bias", "expected an object mapping token ids to biases")
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise invalid("logit_bias", f"{key!r} is not a token id (an integer)") from None
        if not 0 <= tid < vocab_size:
            raise invalid("logit_bias", f"token id {tid} is outside this model's vocabulary "
                          f"[0, {vocab_size})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"the bias of token {tid} must be a number from -100 to "
                          f"100, got {value!r}")
        out[tid] = float(value)
    return out


async def _start(registry: ModelRegistry, model_name: str, make_ids, settings: GenerationSettings,
                 prompt_param: str, make_grammar=None) -> CompletionStream:
    """`make_grammar(model)`: a Grammar that replaces response_format's (a forced tool call)."""
    _check_settings(settings)
    model = await registry.acquire(model_name)
    try:
        # rendering and tokenizing a long prompt takes a while: never on the event loop
        ids = await asyncio.to_thread(make_ids, model)
        if settings.logit_bias:
            from dataclasses import replace
            settings = replace(settings, logit_bias=check_logit_bias(
                settings.logit_bias, min(model.tokenizer.vocab_size, model.network.args.vocab_size)))
        grammar = None
        if make_grammar is not None:
            grammar = await asyncio.to_thread(make_grammar, model)
        elif settings.response_format is not None:
            from homellm.engine.constrain import compile_response_format
            try:
                grammar = await asyncio.to_thread(compile_response_format, model.tokenizer,
                                                  settings.response_format)
            except ValueError as e:
                raise invalid("response_format", str(e)) from None
        seed = settings.seed if settings.seed is not None else random.randrange(2**63)
        return CompletionStream(registry, model, ids, settings, seed, grammar, prompt_param)
    except BaseException:
        registry.release(model)
        raise


def check_length(model: LoadedModel, text: str, param: str):
    """A 400 context_length_exceeded for a text that cannot fit the context, from its length
    alone: a text of B bytes has at least B / max_token_bytes tokens (tokenizing 30 MB would
    take half a minute and gigabytes first)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # JSON may carry "\ud800", which no tokenizer takes
        raise invalid(param, f"not valid Unicode text: a lone surrogate at character {e.start}"
                      ) from None
    at_least = size // model.tokenizer.max_token_bytes
    if at_least > model.ctx - 1:
        raise APIError(400, f"This model's maximum context length is {model.ctx} tokens (at "
                       f"most {model.ctx - 1} for the prompt). However, your request has at "
                       f"least {at_least} prompt tokens ({len(text)} characters). Please shorten "
                       "the messages or prompt.", param=param, code="context_length_exceeded")


def chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> {role, content} for the chat template: text parts joined,
    "developer" as "system"; an assistant's `tool_calls` kept (arguments as objects), and a
    tool result's `tool_call_id` and `name`; anything else a 400 naming the message."""
    from homellm.serve.tools import history_calls
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content[{j}]",
                                  f"only text parts are supported, got type {part.get('type')!r}")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content", "expected a string or a list of text parts")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(f"messages[{i}].role", f"unknown role {m.get('role')!r}")
        message = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = history_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        out.append(message)
    return out


async def start_chat(registry: ModelRegistry, model: str, messages: list[dict],
                     settings: GenerationSettings, tools=None,
                     prefill: str = "") -> CompletionStream:
    """Start the assistant's reply to `messages` (OpenAI format), rendered with the model's
    chat template. `tools`: a serve.tools.ToolPlan (OpenAI's tools and tool_choice); then
    `stream.tool_format` names the syntax to parse calls from (None: plain text). `prefill`:
    text the reply already has (a reply cut by max tokens, continued): the deltas are what
    follows it."""
    from homellm.serve import tools as tooling
    convo = chat_messages(messages)
    with_tools = tooling.needs_tools_handling(convo, tools)

    def ids(m: LoadedModel) -> list[int]:  # in a worker thread
        try:
            if with_tools:
                text = tooling.render_with_tools(m.tokenizer, convo, tools)
            else:
                text = m.tokenizer.render_chat(convo, add_generation_prompt=True) + prefill
        except Exception as e:  # a template that refuses the conversation (e.g. role order)
            raise invalid("messages", f"the model's chat template refused them: {e}") from None
        check_length(m, text, "messages")
        return m.tokenizer.encode(text, add_special_tokens=False)

    def forced_call(m: LoadedModel):  # in a worker thread
        from homellm.engine.constrain import compile_lark
        try:
            return compile_lark(m.tokenizer, tooling.call_grammar(m.tokenizer, tools), "tools")
        except ValueError as e:
            raise invalid(_schema_at_fault(m, tools), str(e).removeprefix("tools: ")) from None
    stream = await _start(registry, model, ids, settings, "messages",
                          forced_call if tools is not None and tools.forced else None)
    if tools is not None and tools.active:
        stream.tool_format = tooling.tool_format(stream.model.tokenizer)[0]
    return stream


def _schema_at_fault(m: LoadedModel, plan) -> str:
    """The field of the first forced tool whose parameters schema does not compile."""
    from homellm.engine.constrain import compile_response_format
    for i, tool in enumerate(plan.tools):
        if tool not in plan.forced_tools():
            continue
        try:
            compile_response_format(m.tokenizer, {"type": "json_schema", "json_schema": {
                "name": "parameters", "schema": tool.parameters}})
        except ValueError:
            return f"tools[{i}].function.parameters"
    return "tools"


async def start_completion(registry: ModelRegistry, model: str, prompt: str | list[int],
                           settings: GenerationSettings, suffix: str | None = None) -> CompletionStream:
    """Start a raw continuation of `prompt` (text, or token ids), without a chat template;
    with `suffix`, the middle between them (the model's fill-in-the-middle tokens)."""
    def ids(m: LoadedModel) -> list[int]:  # in a worker thread
        return completion_ids(m, prompt, suffix)
    return await _start(registry, model, ids, settings, "prompt")


def fim_prompt_ids(m: LoadedModel, prefix: str, suffix: str) -> list[int]:
    """Fill-in-the-middle ids in prefix-suffix-middle order, with the model's own FIM tokens
    (StarCoder's <fim_prefix>, Qwen's <|fim_prefix|>, CodeLlama's <PRE>); a 400 naming
    `suffix` for a model without them."""
    tk = m.tokenizer
    for names in (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
                  ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
                  ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
                  ("▁<PRE>", "▁<SUF>", "▁<MID>"), ("<PRE>", "<SUF>", "<MID>")):
        ids = [tk.token_to_id(n) for n in names]
        if all(i is not None and i in tk.special_ids for i in ids):
            pre, suf, mid = ids
            head = [tk.bos_id] if tk.add_bos and tk.bos_id is not None else []
            return (head + [pre] + tk.encode(prefix, add_special_tokens=False) + [suf]
                    + tk.encode(suffix, add_special_tokens=False) + [mid])
    raise invalid("suffix", f"the model {m.id!r} has no fill-in-the-middle tokens (such as "
                  "<fim_prefix>, <fim_suffix>, <fim_middle>), so it cannot complete between a "
                  "prompt and a suffix", "unsupported")


def completion_ids(m: LoadedModel, prompt: str | list[int], suffix: str | None = None) -> list[int]:
    """The ids of a raw completion prompt (text, or token ids checked against the vocabulary)."""
    if isinstance(prompt, str):
        if not prompt and not suffix:
            raise invalid("prompt", "the prompt is empty")
        check_length(m, prompt + (suffix or ""), "prompt")
        if suffix:
            return fim_prompt_ids(m, prompt, suffix)
        return m.tokenizer.encode(prompt)
    if suffix:
        raise invalid("suffix", "a suffix needs a text prompt, not token ids")
    vocab = m.network.args.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad or not prompt:
        raise invalid("prompt", f"token ids must be in [0, {vocab}), got {bad[:3] or 'none'}")
    return list(prompt)


LOGIT_ROWS = 256  # prompt positions whose logits are computed at once (rows x vocab floats)


def teacher_forced(m: LoadedModel, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each token of `ids` after the first with its logprob given the ones before it (and the
    `top` most likely alternatives), from the served network (LOGIT_ROWS positions at once)."""
    from homellm.engine.generate import logprobs
    from homellm.engine.score import prompt_logits
    if len(ids) > m.ctx:
        raise APIError(400, f"This model's maximum context length is {m.ctx} tokens. However, "
                       f"your prompt has {len(ids)} tokens.", param="prompt",
                       code="context_length_exceeded")
    piece = m.tokenizer.decode
    out = []
    for a, logits in prompt_logits(m.network, ids, LOGIT_ROWS):
        for r, row in enumerate(logits):
            t = ids[a + r + 1]
            lse, alts = logprobs(row, top)
            out.append(TokenLogprob(t, piece([t]), float(row[t]) - lse,
                                    [(i, piece([i]), lp) for i, lp in alts]))
    return out


async def echo_prompt(registry: ModelRegistry, model_name: str, prompt: str | list[int],
                      top: int, suffix: str | None = None) -> tuple[str, list[TokenLogprob], int]:
    """(the prompt's text, its tokens with teacher-forced logprobs, prompt token count), for
    /v1/completions' echo. A BOS the tokenizer adds is context, not echoed; the first echoed
    token without any context before it has logprob None (as OpenAI reports it)."""
    model = await registry.acquire(model_name)
    try:
        def work():
            ids = completion_ids(model, prompt, suffix)
            tokens = teacher_forced(model, ids, top)
            tk = model.tokenizer
            if not (tk.add_bos and ids[0] == tk.bos_id and isinstance(prompt, str)):
                tokens.insert(0, TokenLogprob(ids[0], tk.decode([ids[0]]), None, []))
            text = prompt if isinstance(prompt, str) else tk.decode(ids)
            return text, tokens, len(ids)
        return await asyncio.to_thread(work)
    finally:
        registry.release(model)
