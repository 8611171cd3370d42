"""Continuous batching: one engine thread decodes many sequences together.

Each submitted request gets a slot of a BatchKVCache (its own positions and keys/values)
once one is free. Between decode steps the thread admits waiting requests, prefills a bounded
number of prompt positions (chunks of the waiting prompts in turn, so running streams keep
flowing while a long prompt comes in), then runs one decode step for every sequence that has a token to feed: B tokens as the B rows of
one forward through the PyTorch `Llama`, at B different positions (the quantized linear
layers read their weights once for all rows; attention runs per row on the row's own keys).

One path for one request and for many: a request's logits do not depend on which others
share its steps (the linear kernels work row by row, attention per row), so a greedy reply
served in a batch equals the same request served alone, token for token. The last prompt
token is always fed by a decode step (never by prefill), so the first generated token comes
out of the same computation whether or not the prompt was found in the prefix cache.

Each request keeps its own Sampler (own seed), stop ids, token budget, logprobs and optional
constraint (engine/constrain.py). Steps go to the request's `sink` callback from the engine
thread; `Ticket.cancel()` (a client that went away) frees the slot before the next step.
Finished slots keep their keys and values: a follow-up turn that lands on the same slot
reuses them in place; when a slot is taken over by another sequence, its content moves to the
PrefixCache (bounded in bytes, LRU), from which any slot can copy it back.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from homellm.engine.generate import Step, Timings
from homellm.engine.kv_cache import BatchKVCache
from homellm.engine.prefix_cache import PrefixCache
from homellm.engine.sampling import Sampler, SamplingParams
from homellm.errors import ContextOverflowError, HomellmError
from homellm.model.llama import Llama


class QueueFullError(HomellmError):
    """Every slot is busy and the waiting queue is full: try again later."""

    def __init__(self, waiting: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"the server is busy: {waiting} requests are already waiting; "
                         f"retry in about {retry_after_s:.0f} s")


class EngineClosedError(HomellmError):
    """The engine was shut down (its model unloaded) before the request finished."""


@dataclass
class BatchConfig:
    max_batch: int = 8            # sequences decoded together (slots of the KV cache)
    ctx: int = 4096               # positions per slot (prompt + reply)
    max_queue: int = 64           # requests waiting for a slot; one more is QueueFullError
    prefill_chunk: int = 512      # prompt positions per step while nothing else decodes
    prefill_chunk_busy: int = 128  # ... while other streams decode (they wait for each step)
    prefix_cache_bytes: int = 512 << 20  # keys/values kept for prefix reuse (LRU)
    threads: int | None = None    # threads of the matmul kernels; None: torch's setting

    def __post_init__(self):
        for name in ("max_batch", "prefill_chunk", "prefill_chunk_busy"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.ctx < 2:
            raise ValueError(f"ctx={self.ctx}: the context must hold at least 2 tokens")
        if self.max_queue < 0 or self.prefix_cache_bytes < 0:
            raise ValueError("max_queue and prefix_cache_bytes must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: expected at least 1")


@dataclass
class Request:
    """What to generate: prompt ids and this request's own settings."""

    ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop_ids: frozenset[int] | set[int] = frozenset()
    top_logprobs: int = 0
    constraint: object | None = None  # engine/constrain.py Constraint: mask, advance, done


Sink = Callable[["Step | BaseException"], None]


class Ticket:
    """A submitted request. Its Steps (then a final one with finish_reason and timings, or an
    exception) go to `sink` from the engine thread; `cancel()` ends it at the next step."""

    def __init__(self, engine: "BatchEngine", request: Request, sink: Sink):
        self.engine = engine
        self.request = request
        self.sink = sink
        self.timings = Timings(prompt_tokens=len(request.ids))
        self.submitted = time.perf_counter()
        self.queued_s = 0.0       # time spent waiting for a slot
        self.cancelled = False
        self.finished = False

    def cancel(self):
        if not self.finished:
            self.cancelled = True
            self.engine._wake()


class _Sequence:
    """A ticket in a slot: where its prompt and reply stand."""

    def __init__(self, ticket: Ticket, slot: int, reused: int):
        req = ticket.request
        self.ticket = ticket
        self.slot = slot
        self.prefilled = reused          # prompt positions whose keys/values are in the slot
        self.pending = req.ids[-1]       # the next token to feed (the prompt's last, then replies)
        self.history = list(req.ids)     # for penalties
        self.sampler = Sampler(req.params)
        self.admitted = time.perf_counter()
        self.first_at: float | None = None
        budget = ticket.engine.config.ctx - len(req.ids)
        self.budget = budget if req.max_tokens is None else min(budget, req.max_tokens)

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.ticket.request.ids) - 1


class BatchEngine:
    """One model, `config.max_batch` slots, and the thread that runs them (started here)."""

    def __init__(self, model: Llama, config: BatchConfig | None = None,
                 cache_dtype: torch.dtype = torch.float32):
        self.model = model
        self.config = config or BatchConfig()
        self.device = model.inv_freq.device
        # the kernels' teams get explicit sizes; the engine thread's own torch ops (tiny
        # per-row attention, argmax and logsumexp over the vocabulary) then run on one thread
        self.threads = self.config.threads or torch.get_num_threads()
        self.kernels_only = _set_kernel_threads(model, self.threads)
        if not self.kernels_only:
            _attach_row_attention(model, self.device, cache_dtype)
        self.cache = BatchKVCache(model.args, self.config.ctx, self.config.max_batch,
                                  dtype=cache_dtype, device=self.device)
        self.prefix = PrefixCache(self.config.prefix_cache_bytes)
        self.waiting: deque[Ticket] = deque()
        self.active: list[_Sequence] = []            # in admission order
        self.free: list[int] = list(range(self.config.max_batch))  # least recently used first
        self.steps = self.generated = self.prefilled = 0
        self.busy_s = 0.0
        self.last_active = time.monotonic()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="homellm-batch", daemon=True)
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, request: Request, sink: Sink) -> Ticket:
        """Queue a request; raises ContextOverflowError, ValueError or QueueFullError at once."""
        if not request.ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(request.ids) >= self.config.ctx:
            raise ContextOverflowError(len(request.ids), self.config.ctx)
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens}: expected at least 1")
        ticket = Ticket(self, request, sink)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the model was unloaded; send the request again")
            busy = len(self.active) >= self.config.max_batch
            if busy and len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(len(self.waiting), self.retry_after_s())
            self.waiting.append(ticket)
            self.last_active = time.monotonic()
            self._cond.notify()
        return ticket

    def generate(self, request: Request) -> Iterator[Step]:
        """The Steps of one request, as a blocking iterator (closing it cancels the request)."""
        steps: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(request, steps.put)
        try:
            while True:
                item = steps.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            ticket.cancel()

    def retry_after_s(self) -> float:
        """A guess at when a slot frees up: the mean step time times a typical reply."""
        per_step = self.busy_s / self.steps if self.steps else 0.05
        return max(1.0, round(per_step * 64))

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self.active and not self.waiting

    def stats(self) -> dict:
        with self._cond:
            return {"slots": self.config.max_batch, "active": len(self.active),
                    "waiting": len(self.waiting), "ctx": self.config.ctx, "steps": self.steps,
                    "generated_tokens": self.generated, "prefilled_tokens": self.prefilled,
                    "prefix_cache": self.prefix.stats()}

    def close(self, timeout: float | None = 10.0):
        """Stop the thread; requests still queued or running end with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _wake(self):
        with self._cond:
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------

    def _run(self):
        if self.kernels_only and self.device.type == "cpu" and not _torch_ops_on_one_thread():
            _attach_row_attention(self.model, self.device, self.cache.k[0].dtype)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not self.active:
                        self._cond.wait()
                    if self._closed:
                        break
                    for t in [t for t in self.waiting if t.cancelled]:
                        self.waiting.remove(t)
                        self._finish_ticket(t, "stop")
                    admits = [self.waiting.popleft()
                              for _ in range(min(len(self.waiting), len(self.free)))]
                for ticket in admits:
                    self._guard([ticket], lambda: self._admit(ticket))
                for seq in [s for s in self.active if s.ticket.cancelled]:
                    self._finish(seq, "stop")
                if self.active:
                    t0 = time.perf_counter()
                    self._step()
                    self.busy_s += time.perf_counter() - t0
                    self.last_active = time.monotonic()
        closed = EngineClosedError("the model was unloaded before the request finished")
        for seq in list(self.active):
            self._release(seq)
            self._deliver(seq.ticket, closed)
        while self.waiting:
            self._deliver(self.waiting.popleft(), closed)

    def _guard(self, tickets: list[Ticket], fn):
        """Run fn; if it raises, the tickets concerned end with the exception (others go on)."""
        try:
            fn()
        except Exception as e:  # a failing request must not stop the engine
            for t in tickets:
                seq = next((s for s in self.active if s.ticket is t), None)
                if seq is not None:
                    self._release(seq)
                self._deliver(t, e)

    def _admit(self, ticket: Ticket):
        ids = ticket.request.ids
        ticket.queued_s = time.perf_counter() - ticket.submitted
        # the free slot that already holds the longest prefix of ids (ties: least recently used)
        slot = max(self.free, key=lambda s: self.cache.common_prefix(s, ids))
        self.free.remove(slot)
        in_slot = self.cache.common_prefix(slot, ids)
        held = self.cache.tokens[slot]
        if len(held) > in_slot and len(held) >= self.prefix.min_tokens:
            self._save(slot)  # about to be overwritten: keep it for later turns
        entry, in_store = (None, 0) if in_slot >= len(ids) - 1 else self.prefix.lookup(ids)
        reuse = min(max(in_slot, in_store), len(ids) - 1)
        if in_store > in_slot:
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][slot, :, :reuse] = entry.keys[layer, :, :reuse]
                self.cache.v[layer][slot, :, :reuse] = entry.values[layer, :, :reuse]
        self.cache.tokens[slot] = list(ids[:reuse])
        ticket.timings.cached_tokens = reuse
        self.active.append(_Sequence(ticket, slot, reuse))

    def _save(self, slot: int):
        tokens = self.cache.tokens[slot]
        n = len(tokens)
        keys = torch.stack([k[slot, :, :n] for k in self.cache.k])    # (L, n_kv, n, head_dim)
        values = torch.stack([v[slot, :, :n] for v in self.cache.v])
        self.prefix.store(tokens, keys, values)

    def _step(self):
        # prompts take turns in admission order, up to `budget` prompt positions per step
        # (several short prompts arriving together all start in the same step)
        busy = any(s.decoding for s in self.active)
        budget = self.config.prefill_chunk_busy if busy else self.config.prefill_chunk
        for seq in [s for s in self.active if not s.decoding]:
            if budget <= 0:
                break
            n = min(budget, len(seq.ticket.request.ids) - 1 - seq.prefilled)
            self._guard([seq.ticket], lambda: self._prefill(seq, n))
            budget -= n
        decoding = [s for s in self.active if s.decoding]
        if decoding:
            self._guard([s.ticket for s in decoding], lambda: self._decode(decoding))

    def _prefill(self, seq: _Sequence, chunk: int):
        """Prefill the next chunk of the prompt (all but its last token) into the slot."""
        ids = seq.ticket.request.ids
        start, end = seq.prefilled, min(seq.prefilled + chunk, len(ids) - 1)
        tokens = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)
        self.model(tokens, start_pos=start, cache=self.cache.slot(seq.slot), last_only=True)
        self.cache.tokens[seq.slot].extend(ids[start:end])
        seq.prefilled = end
        self.prefilled += end - start

    def _decode(self, seqs: list[_Sequence]):
        """One forward for the pending token of each sequence, then one sample each."""
        tokens = torch.tensor([[s.pending] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([len(self.cache.tokens[s.slot]) for s in seqs], dtype=torch.long)
        logits = self.model(tokens, start_pos=positions, cache=self.cache.rows([s.slot for s in seqs]))
        logits = logits[:, 0].float().cpu()  # (B, vocab)
        self.steps += 1
        for b, seq in enumerate(seqs):
            self.cache.tokens[seq.slot].append(seq.pending)
            self._guard([seq.ticket], lambda: self._sample(seq, logits[b]))

    def _sample(self, seq: _Sequence, logits: torch.Tensor):
        ticket, req = seq.ticket, seq.ticket.request
        timings, now = ticket.timings, time.perf_counter()
        if seq.first_at is None:
            seq.first_at = now
            timings.prefill_s = now - seq.admitted  # to the first token's logits
        c = req.constraint
        if c is not None:
            lse, top = _logprobs(logits, req.top_logprobs)  # under the model, before the mask
            c.mask_logits(logits)
        token = seq.sampler(logits, seq.history)
        if token in req.stop_ids:
            return self._finish(seq, "stop")
        if c is None:
            lse, top = _logprobs(logits, req.top_logprobs)
        else:
            c.advance(token)
        timings.generated_tokens += 1
        timings.decode_s = now - seq.first_at
        self.generated += 1
        self._deliver(ticket, Step(token=token, logprob=float(logits[token]) - lse, top_logprobs=top))
        seq.history.append(token)
        if c is not None and c.done:
            return self._finish(seq, "stop")
        if timings.generated_tokens >= seq.budget:
            return self._finish(seq, "length")
        seq.pending = token

    def _finish(self, seq: _Sequence, reason: str):
        self._release(seq)
        self._finish_ticket(seq.ticket, reason)

    def _finish_ticket(self, ticket: Ticket, reason: str):
        self._deliver(ticket, Step(token=None, finish_reason=reason, timings=ticket.timings))

    def _release(self, seq: _Sequence):
        if seq in self.active:
            self.active.remove(seq)
            with self._cond:
                self.free.append(seq.slot)  # keeps its keys/values until another takes it

    def _deliver(self, ticket: Ticket, item):
        if ticket.finished:
            return
        if isinstance(item, BaseException) or item.finish_reason is not None:
            ticket.finished = True
        try:
            ticket.sink(item)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop its work
            ticket.cancelled = True


def _logprobs(logits: torch.Tensor, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log-sum-exp of logits (vocab,) and the k most likely (id, logprob): one pass."""
    lse = float(torch.logsumexp(logits, -1))
    if not k:
        return lse, []
    vals, idx = logits.topk(k)
    return lse, [(i, v - lse) for i, v in zip(idx.tolist(), vals.tolist())]


def _attach_row_attention(model: Llama, device: torch.device, dtype: torch.dtype):
    """Per-row attention of decode steps in C on one thread (the kernels' hl_attention_causal,
    called directly: its Python wrapper costs ~4x the work of a one-query row). A batch makes
    B small calls per layer, and a thread team for each would cost more than the work (~30x
    more when other processes share the CPU). Without the kernels, SDPA row by row stays."""
    import os

    from homellm.engine import kernels
    if device.type != "cpu" or dtype != torch.float32 or not kernels.available():
        return
    lib = kernels.load()
    path = kernels.path_id(os.environ.get("HOMELLM_KERNEL_PATH"))

    def rows_attention(q, keys, values):
        # q (B, n_heads, T, hd) float32; keys, values: per row (1, n_kv, S_b, hd) cache views
        B, nh, T, hd = q.shape
        q = q if q.dtype == torch.float32 and q.stride(-1) == 1 else q.float().contiguous()
        y = torch.empty(B, T, nh * hd, dtype=torch.float32)  # (B, T, n_heads * hd)
        scale = hd ** -0.5
        for b, (k, v) in enumerate(zip(keys, values)):
            if k.dtype != torch.float32 or k.stride(-1) != 1 or v.stride(-1) != 1:
                k, v = k.float().contiguous(), v.float().contiguous()
            rc = lib.hl_attention_causal(q[b].data_ptr(), q.stride(2), q.stride(1),
                                         k.data_ptr(), k.stride(2), k.stride(1),
                                         v.data_ptr(), v.stride(2), v.stride(1),
                                         T, nh, k.shape[1], hd, k.shape[2] - T, scale,
                                         y[b].data_ptr(), 1, path)
            if rc:
                raise RuntimeError(f"hl_attention_causal failed ({rc})")
        return y

    for layer in model.model.layers:
        layer.self_attn.rows_attention_fn = rows_attention


def _set_kernel_threads(model: Llama, threads: int) -> bool:
    """Give the C kernels of the model (GGMLLinear and the fused projections over them, the
    prefill attention) an explicit thread count; return whether every matmul is such a
    kernel (then nothing else in a step needs more than one thread)."""
    from homellm.engine import kernels
    for m in model.modules():
        if isinstance(m, kernels.GGMLLinear):
            m.threads = threads
    for layer in model.model.layers:
        if isinstance(layer.self_attn.attention_fn, kernels.CausalAttention):
            layer.self_attn.attention_fn = _PrefillAttention(threads)
    projections = [model.lm_head]
    for layer in model.model.layers:
        projections += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(m, kernels.GGMLLinear) for m in projections)


class _PrefillAttention:
    """kernels.CausalAttention on a fixed number of threads."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, q, k, v):
        from homellm.engine import kernels
        return kernels.attention_causal(q, k, v, k.shape[2] - q.shape[2], threads=self.threads)


def _torch_ops_on_one_thread() -> bool:
    """Run this thread's PyTorch ops on one OpenMP thread, leaving other threads and torch's
    global setting alone (torch.set_num_threads would change the default of every thread
    started later). A decode step's own torch ops are tiny (one query's attention per row,
    argmax over the vocabulary): a thread team costs more than their work, and ~50x more when
    other processes share the CPU. Returns whether it took effect."""
    import ctypes
    import glob
    import os
    torch.zeros(1 << 16).sum()  # torch sets this thread's count on its first parallel op
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libgomp*.so*"))):
        try:
            ctypes.CDLL(path).omp_set_num_threads(1)
        except (OSError, AttributeError):
            continue
        if torch.get_num_threads() == 1:
            return True
    return False
