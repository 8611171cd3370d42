"""Token ids in, tokens out: prefill, decode, and the typed steps a generation streams.

The engine knows nothing of text: stop strings and detokenization live one layer up
(homellm/api.py). It keeps one KV cache; a new prompt that starts with what the cache
already holds prefills only the rest (a chat's earlier turns are never prefilled again).

It runs one of two networks: the C runtime (`kernels.NativeModel`: a GGUF file's blocks on
the CPU, no PyTorch in the process) or the PyTorch `Llama` (any device, any format). Logits
come out as numpy float32 either way, and sampling runs on them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from homellm.engine.kernels.native import NativeModel
from homellm.engine.sampling import NonFiniteLogitsError, Sampler, SamplingParams, as_numpy, biased
from homellm.errors import ContextOverflowError, HomellmError

PREFILL_CHUNK = 512  # prompt positions per forward: bounds activation and attention memory


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0      # prompt tokens whose keys/values were already in the cache
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0       # from the first generated token to the last

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; the rest each cost one decode step
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prefill_s": round(self.prefill_s, 4), "prefill_tps": round(self.prefill_tps, 2),
                "generated_tokens": self.generated_tokens, "decode_s": round(self.decode_s, 4),
                "decode_tps": round(self.decode_tps, 2)}


@dataclass
class Step:
    """One generated token, or the final step that says why generation ended."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""                     # filled by the text layer
    finish_reason: str | None = None   # "stop" (EOS or stop string) or "length"
    timings: Timings | None = None     # on the final step


def logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))


def logprobs(logits: np.ndarray, top_logprobs: int) -> tuple[float, list[tuple[int, float]]]:
    """log-sum-exp of the logits and the top alternatives, under the model (before any penalty
    or constraint): one pass over the vocab."""
    lse = logsumexp(logits)
    top = []
    if top_logprobs:
        idx = np.argpartition(-logits, top_logprobs - 1)[:top_logprobs]
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        top = [(int(i), float(logits[i]) - lse) for i in idx]
    return lse, top


class Generation:
    """One request's generation step, shared by `Engine` (one sequence) and `BatchEngine`
    (many): from the logits of the last position to the next token, and whether that ends it.

    Per token: the constraint masks the logits (its log-probabilities stay the model's, taken
    before the mask), the sampler draws from them with logit_bias added (OpenAI's: token id ->
    bias; then penalties over the history, then the filters), a stop id ends the generation
    without being a token, the constraint takes the
    token (and ends it once its value is complete), and the budget ends it ("length").
    NaN/inf logits raise NonFiniteLogitsError with `.ids`: the tokens that produced them.
    """

    def __init__(self, ids: list[int], params: SamplingParams | None, budget: int,
                 stop_ids=frozenset(), top_logprobs: int = 0, constraint=None,
                 logit_bias: dict[int, float] | None = None, logprobs: bool = True):
        self.sampler = Sampler(params or SamplingParams())
        self.history = list(ids)
        self.budget = budget
        self.stop_ids = stop_ids
        self.top_logprobs = top_logprobs
        self.constraint = constraint
        self.logit_bias = logit_bias or None
        # a pass over the vocabulary a token: skipped where nobody reads them (Step.logprob None)
        self.logprobs = logprobs or top_logprobs > 0
        self.generated = 0

    def step(self, logits: np.ndarray) -> tuple[Step | None, str | None]:
        """(the token's Step, or None for a stop id; the finish reason, or None to go on).
        `logits` (vocab,) float32 may be changed (the constraint's mask)."""
        c = self.constraint
        lse, top = None, []
        if c is not None:
            if self.logprobs:
                lse, top = logprobs(logits, self.top_logprobs)  # before the mask
            c.mask_logits(logits)
        try:
            token = self.sampler(biased(logits, self.logit_bias) if self.logit_bias else logits,
                                 self.history)
        except NonFiniteLogitsError as e:
            e.ids = list(self.history)  # what went through the model (for a diagnosis)
            raise
        if token in self.stop_ids:
            return None, "stop"
        if c is None:
            if self.logprobs:
                lse, top = logprobs(logits, self.top_logprobs)
        else:
            c.advance(token)
        self.generated += 1
        self.history.append(token)
        step = Step(token=token, logprob=None if lse is None else float(logits[token]) - lse,
                    top_logprobs=top)
        if c is not None and c.done:
            return step, "stop"
        if self.generated >= self.budget:
            return step, "length"
        return step, None


class Engine:
    """One network and one KV cache of `ctx` positions (batch 1).

    model: a `NativeModel` (it holds its own cache, of at least `ctx` positions), or a PyTorch
    `Llama`, for which the engine makes a `KVCache`. On the PyTorch path, single-token decode
    steps go through `fast` when one is attached (kernels.FastDecoder: the whole step in one C
    call, on the same KV cache).
    """

    def __init__(self, model, ctx: int, cache_dtype=None):
        self.model = model
        self.ctx = ctx
        self.fast = None
        self.native = isinstance(model, NativeModel)
        if self.native:
            if model.max_seq_len < ctx:
                raise ValueError(f"the model's KV cache holds {model.max_seq_len} positions; ctx is {ctx}")
            self.device = "cpu"
            self.cache = model  # NativeModel keeps `tokens` and `common_prefix` like KVCache
        else:
            import torch

            from homellm.engine.kv_cache import KVCache
            self.device = str(model.inv_freq.device)
            self.cache = KVCache(model.args, ctx, dtype=cache_dtype or torch.float32, device=self.device)

    def attach_fast_decoder(self, checkpoint) -> bool:
        """Decode with our C kernels when they are built and cover every weight of the
        checkpoint; return whether they do (else decoding stays on the PyTorch path)."""
        if self.native:
            return False  # the C runtime decodes already
        import torch
        from torch import nn

        from homellm.engine import kernels
        if self.native or self.device != "cpu" or self.cache.k[0].dtype != torch.float32 \
                or not kernels.available():
            return False
        float32 = all(m.weight.dtype == torch.float32 for m in self.model.modules()
                      if isinstance(m, nn.Linear))
        try:
            if checkpoint.format == "gguf":  # on the file's own blocks
                self.fast = kernels.FastDecoder.from_checkpoint(checkpoint, cache=self.cache)
            elif float32:  # on the network's float32 weights, without a copy
                self.fast = kernels.FastDecoder.from_model(self.model, cache=self.cache)
        except (ValueError, RuntimeError, KeyError):
            self.fast = None  # e.g. K-quant weights: the PyTorch layers handle those
        return self.fast is not None

    def reset(self):
        self.cache.tokens = []

    def forward(self, ids: list[int], start_pos: int, last_only: bool = True,
                logits: bool = True) -> np.ndarray | None:
        """Run ids at start_pos through the network, storing their keys/values; (T or 1, vocab).
        logits=False: the keys and values alone where the runtime can skip the rest (the C
        runtime: no row past the last layer's attention), returns None."""
        if self.native:
            return self.model.forward(ids, start_pos, last_only, logits)  # (it keeps cache.tokens)
        import torch
        want = logits
        with torch.inference_mode():
            if self.fast is not None and len(ids) == 1:
                logits = self.fast.decode(ids[0], start_pos)[None]
            else:
                tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
                logits = self.model(tokens, start_pos=start_pos, cache=self.cache, last_only=last_only)[0]
        del self.cache.tokens[start_pos:]
        self.cache.tokens.extend(ids)
        return as_numpy(logits) if want else None

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Make the cache hold `ids`; return the last position's logits and how many were cached."""
        if len(ids) >= self.ctx:
            raise ContextOverflowError(len(ids), self.ctx)
        if not ids:
            raise HomellmError("the prompt is empty: it encodes to no tokens (at least one is "
                               "needed; an empty chat template or vocabulary gives this)")
        reuse = min(self.cache.common_prefix(ids), len(ids) - 1)  # the last one yields logits
        del self.cache.tokens[reuse:]
        pos = reuse
        logits = None
        while pos < len(ids):  # (the chunks before the last: keys and values alone)
            chunk = ids[pos:pos + PREFILL_CHUNK]
            last = pos + len(chunk) >= len(ids)
            out = self.forward(chunk, pos, logits=last)
            if last:
                logits = out[-1]
            pos += len(chunk)
        return logits, reuse

    def generate(self, ids: list[int], params: SamplingParams | None = None,
                 max_tokens: int | None = None, stop_ids: set[int] = frozenset(),
                 top_logprobs: int = 0, timings: Timings | None = None,
                 constraint=None, logit_bias: dict[int, float] | None = None,
                 logprobs: bool = True) -> Iterator[Step]:
        """Yield one Step per generated token, then a final Step with finish_reason and timings.

        `constraint` (engine/constrain.py Constraint) masks the logits before each sample and
        takes each token after; generation stops ("stop") once its value is complete.
        Log-probabilities stay those of the model, before penalties and the mask.
        The stop token itself is not yielded. Closing the iterator early leaves the cache
        consistent (it holds exactly the tokens that went through the model) and `timings`
        (filled as generation goes, when the caller passes one) complete.
        NaN/inf logits raise NonFiniteLogitsError with `.ids`: the tokens that produced them.
        `logprobs=False` skips each token's pass over the vocabulary for its log-probability
        (Step.logprob None) where nobody reads it.
        """
        timings = timings if timings is not None else Timings()
        timings.prompt_tokens = len(ids)
        t0 = time.perf_counter()
        logits, timings.cached_tokens = self.prefill(ids)
        timings.prefill_s = time.perf_counter() - t0
        budget = self.ctx - len(ids)  # each generated token but the last needs a cache slot
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        gen = Generation(ids, params, budget, stop_ids, top_logprobs, constraint, logit_bias, logprobs)
        finish = "length"
        t_first = time.perf_counter()
        try:
            while True:
                step, finish = gen.step(logits)
                if step is not None:
                    timings.generated_tokens = gen.generated
                    yield step
                if finish is not None:
                    break
                logits = self.forward([step.token], len(self.cache.tokens))[-1]
        finally:
            timings.decode_s = time.perf_counter() - t_first
        yield Step(token=None, finish_reason=finish, timings=timings)
