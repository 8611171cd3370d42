"""Continuous batching: one engine thread runs many sequences together.

Each submitted request gets a slot of the KV cache (its own positions and keys/values) once
one is free. Every step of the engine thread is one pass through the network of all the rows
that have work: the pending token of every sequence that decodes, and chunks of the prompts
still coming in (up to a budget of prompt positions a step, so running streams keep flowing
while a long prompt arrives), in admission order.

On the C runtime (a `NativeModel`: every GGUF type it takes) the step is one call,
`NativeModel.batch` (network.h hl_batch): prompt chunks and decode rows together, each row with
its own position, slot and LoRA adapter. A row's logits are the same bits whatever else is in
its step and however its prompt was cut into chunks, so a greedy reply served among others
equals the same request served alone, token for token, and a prompt's last chunk gives the
first token at once. On the PyTorch network (Hugging Face float models, the GPU, types the C
runtime does not take) prompt chunks run one sequence at a time and the decode rows together,
and the prompt's last token goes through a decode step (the two paths round differently).

Each request keeps its own generation step (engine/generate.py Generation: its sampler and
seed, stop ids, token budget, logprobs and constraint). Steps go to the request's `sink`
callback from the engine thread; `Ticket.cancel()` (a client that went away) frees the slot
before the next step. Requests that share a prompt prefix with one admitted before them (n > 1
choices, a regeneration) copy its keys and values instead of computing them again (a fork).
Finished slots keep their keys and values: a follow-up turn that lands on the same slot reuses
them in place; when a slot is taken over by another sequence, its content moves to the
PrefixCache (bounded in bytes, LRU), from which any slot can copy it back. A request that names
a conversation (`cache_key`) and an engine with a KVStore (engine/kv_persist.py) also keep that
conversation on disk: written when it leaves memory (evicted from the PrefixCache) and when the
engine closes (unload, shutdown), read back when the conversation returns and memory no longer
holds it, so it continues without prefilling again, even after a restart.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from homellm.engine.generate import Generation, Step, Timings
from homellm.engine.kernels.native import NativeModel, SlotCache
from homellm.engine.prefix_cache import PrefixCache
from homellm.engine.sampling import SamplingParams, as_numpy
from homellm.engine.tokens import common_prefix
from homellm.errors import ContextOverflowError, HomellmError


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
    threads: int | None = None    # threads of the C runtime; None: the model's own setting
    kv_dtype: str = "f16"         # the C runtime's slots: "f16" (as llama.cpp keeps them) or "f32"

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
        if self.kv_dtype not in ("f16", "f32"):
            raise ValueError(f"kv_dtype={self.kv_dtype!r}: expected 'f16' or 'f32'")


@dataclass
class Request:
    """What to generate: prompt ids and this request's own settings."""

    ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop_ids: frozenset[int] | set[int] = frozenset()
    top_logprobs: int = 0
    constraint: object | None = None  # engine/constrain.py Constraint: mask, advance, done
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    logprobs: bool = True             # each token's log-probability (False: Step.logprob None)
    adapter: object | None = None     # a LoraAdapter of the served model (C runtime), or None
    cache_key: str | None = None      # a conversation whose keys and values outlive memory


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

    def __init__(self, ticket: Ticket, slot: int, reused: int, ctx: int, admitted: float):
        req = ticket.request
        self.ticket = ticket
        self.slot = slot
        self.fed = reused                # positions whose keys/values are in the slot
        self.pending: int | None = None  # the sampled token to feed next
        budget = ctx - len(req.ids)
        budget = budget if req.max_tokens is None else min(budget, req.max_tokens)
        self.gen = Generation(req.ids, req.params, budget, req.stop_ids, req.top_logprobs,
                              req.constraint, req.logit_bias, req.logprobs)
        self.admitted = admitted
        self.first_at: float | None = None

    @property
    def ids(self) -> list[int]:
        return self.ticket.request.ids

    @property
    def decoding(self) -> bool:
        return self.pending is not None


@dataclass
class _Rows:
    """One sequence's rows of a step: ids at positions start.., the last one's logits wanted."""
    seq: _Sequence
    start: int
    ids: list[int]
    want: bool


class _NativeRunner:
    """Steps on the C runtime: every sequence's rows in one NativeModel.batch call."""

    last_by_decode = False

    def __init__(self, model: NativeModel, config: BatchConfig):
        self.model = model
        if config.threads:
            model.set_threads(config.threads, model.path, model.hi)
        self.cache = SlotCache(model.args, config.max_batch, config.ctx, config.kv_dtype)
        # the logits of a step's wanting rows (at most one a sequence), reused every step
        self.logits = np.empty((config.max_batch, model.args.vocab_size), dtype=np.float32)

    def run(self, groups: list[_Rows]) -> list[np.ndarray | None]:
        toks, pos, slots, want, ads = [], [], [], [], []
        for g in groups:
            n = len(g.ids)
            toks += g.ids
            pos += range(g.start, g.start + n)
            slots += [g.seq.slot] * n
            want += [False] * (n - 1) + [g.want]
            ads += [g.seq.ticket.request.adapter] * n
        logits = self.model.batch(self.cache, toks, pos, slots, want, ads, out=self.logits)
        out, i = [], 0
        for g in groups:
            del self.cache.tokens[g.seq.slot][g.start:]
            self.cache.tokens[g.seq.slot].extend(g.ids)
            out.append(logits[i] if g.want else None)
            i += g.want
        return out

    def read(self, slot: int, n: int):
        return self.cache.read(slot, n)

    def write(self, slot: int, keys, values, tokens: list[int]):
        self.cache.write(slot, keys, values, tokens)


class _TorchRunner:
    """Steps on the PyTorch network: prompt chunks one sequence at a time, then one forward for
    the decode rows (B tokens at B positions; attention per row on the row's own keys)."""

    last_by_decode = True

    def __init__(self, model, config: BatchConfig, cache_dtype=None):
        import torch

        from homellm.engine.kv_cache import BatchKVCache
        self.model = model
        self.device = model.inv_freq.device
        self.cache = BatchKVCache(model.args, config.ctx, config.max_batch,
                                  dtype=cache_dtype or torch.float32, device=self.device)

    def run(self, groups: list[_Rows]) -> list[np.ndarray | None]:
        import torch
        out: list = [None] * len(groups)
        decode = [i for i, g in enumerate(groups) if g.want]  # (single rows: last_by_decode)
        with torch.inference_mode():
            for g in groups:
                if g.want:
                    continue
                tokens = torch.tensor([g.ids], dtype=torch.long, device=self.device)
                self.model(tokens, start_pos=g.start, cache=self.cache.slot(g.seq.slot), last_only=True)
            if decode:
                rows = [groups[i] for i in decode]
                tokens = torch.tensor([g.ids for g in rows], dtype=torch.long, device=self.device)
                positions = torch.tensor([g.start for g in rows], dtype=torch.long)
                logits = self.model(tokens, start_pos=positions,
                                    cache=self.cache.rows([g.seq.slot for g in rows]))[:, 0]
                for i, row in zip(decode, as_numpy(logits)):
                    out[i] = row
        for g in groups:
            del self.cache.tokens[g.seq.slot][g.start:]
            self.cache.tokens[g.seq.slot].extend(g.ids)
        return out

    def read(self, slot: int, n: int):
        import torch
        return (torch.stack([k[slot, :, :n] for k in self.cache.k]),    # (L, n_kv, n, head_dim)
                torch.stack([v[slot, :, :n] for v in self.cache.v]))

    def write(self, slot: int, keys, values, tokens: list[int]):
        n = len(tokens)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][slot, :, :n] = keys[layer, :, :n]
            self.cache.v[layer][slot, :, :n] = values[layer, :, :n]
        self.cache.tokens[slot] = list(tokens)


class BatchEngine:
    """One model, `config.max_batch` slots, and the thread that runs them (started here).

    model: a `NativeModel` (the C runtime) or a PyTorch `Llama`."""

    def __init__(self, model, config: BatchConfig | None = None, cache_dtype=None, kv_store=None):
        self.model = model
        self.config = config or BatchConfig()
        self.native = isinstance(model, NativeModel)
        self.runner = (_NativeRunner(model, self.config) if self.native
                       else _TorchRunner(model, self.config, cache_dtype))
        self.cache = self.runner.cache  # .tokens[slot]: the ids each slot holds
        self.kv_store = kv_store if self.native else None  # engine/kv_persist.py KVStore, or None
        self.prefix = PrefixCache(self.config.prefix_cache_bytes, on_drop=self._persist_entry)
        self.slot_key: list[str | None] = [None] * self.config.max_batch  # each slot's conversation
        self._forget: list[str] = []  # conversations to drop from memory (engine.forget)
        self.waiting: deque[Ticket] = deque()
        self.active: list[_Sequence] = []            # in admission order
        self.free: list[int] = list(range(self.config.max_batch))  # least recently used first
        # the adapter whose rows computed each slot's keys and values (None: the base model):
        # keys and values are reused only for requests with the same adapter
        self.owner: list = [None] * self.config.max_batch
        self.steps = self.generated = self.prefilled = self.forked = 0
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
        if request.adapter is not None and not self.native:
            raise ValueError("adapters per request need the C runtime (a GGUF model on the CPU)")
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
                    "forked_tokens": self.forked, "runtime": "native" if self.native else "torch",
                    "prefix_cache": self.prefix.stats(),
                    **({"kv_disk": self.kv_store.stats()} if self.kv_store is not None else {})}

    def close(self, timeout: float | None = 10.0):
        """Stop the thread; requests still queued or running end with EngineClosedError. The
        conversations in memory go to disk (with a KVStore)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.kv_store is not None and not self._thread.is_alive():
            self._drop_forgotten()
            for entry in self.prefix.tagged():
                self._persist_entry(entry)
            for s, key in enumerate(self.slot_key):
                if key is not None and self.cache.tokens[s]:
                    keys, values = self.runner.read(s, len(self.cache.tokens[s]))
                    self.kv_store.save(key, self.cache.tokens[s], keys, values, _namespace(self.owner[s]))
            self.kv_store.flush()

    def forget(self, cache_key: str):
        """A conversation was deleted: its keys and values leave memory (before the next step)
        and disk."""
        with self._cond:
            self._forget.append(cache_key)
            self._cond.notify()
        if self.kv_store is not None:
            self.kv_store.remove(cache_key)

    def _wake(self):
        with self._cond:
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------

    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.active and not self._forget:
                    self._cond.wait()
                if self._closed:
                    break
                for t in [t for t in self.waiting if t.cancelled]:
                    self.waiting.remove(t)
                    self._finish_ticket(t, "stop")
                self._drop_forgotten()
                admits = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.free)))]
            for ticket in admits:
                self._guard([ticket], lambda: self._admit(ticket))
            for seq in [s for s in self.active if s.ticket.cancelled]:
                self._finish(seq, "stop")
            if self.active:
                t0 = time.perf_counter()
                self._guard([s.ticket for s in self.active], self._step)
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
        req = ticket.request
        ids, adapter = req.ids, req.adapter
        t0 = time.perf_counter()
        ticket.queued_s = t0 - ticket.submitted
        # the free slot that already holds the longest prefix of ids (ties: least recently used)
        tokens = self.cache.tokens

        def in_slot_of(s: int) -> int:
            return self.cache.common_prefix(s, ids) if self.owner[s] is adapter else 0

        slot = max(self.free, key=in_slot_of)
        self.free.remove(slot)
        in_slot = in_slot_of(slot)
        held = tokens[slot]
        if len(held) > in_slot and len(held) >= self.prefix.min_tokens:
            self._save(slot)  # about to be overwritten: keep it for later turns
        elif len(held) > in_slot and self.slot_key[slot] is not None and self.kv_store is not None:
            self._persist_slot(slot)  # too short for the prefix cache: straight to disk
        self.owner[slot] = adapter
        entry, in_store = (None, 0) if in_slot >= len(ids) - 1 else self.prefix.lookup(ids, adapter)
        reuse = min(max(in_slot, in_store), len(ids) - 1)  # the last one yields logits
        if in_store > in_slot:
            self.runner.write(slot, entry.keys, entry.values, list(ids[:reuse]))
        if req.cache_key is not None and self.kv_store is not None and reuse < len(ids) - 1:
            saved = self.kv_store.load(req.cache_key, _namespace(adapter))  # (None: no, or refused)
            if saved is not None:
                n = min(common_prefix(saved[0], ids), len(ids) - 1)
                if n > reuse:
                    self.runner.write(slot, saved[1], saved[2], list(ids[:n]))
                    reuse = n
        del tokens[slot][reuse:]
        self.slot_key[slot] = req.cache_key
        ticket.timings.cached_tokens = reuse
        self.active.append(_Sequence(ticket, slot, reuse, self.config.ctx, t0))

    def _save(self, slot: int):
        n = len(self.cache.tokens[slot])
        keys, values = self.runner.read(slot, n)  # copies: (L, n_kv, n, head_dim)
        self.prefix.store(self.cache.tokens[slot], keys, values, self.owner[slot], self.slot_key[slot])

    def _persist_slot(self, slot: int):
        n = len(self.cache.tokens[slot])
        keys, values = self.runner.read(slot, n)
        self.kv_store.save(self.slot_key[slot], self.cache.tokens[slot], keys, values,
                           _namespace(self.owner[slot]))

    def _persist_entry(self, entry):
        """A conversation's keys and values leave memory: to disk, with a KVStore."""
        if self.kv_store is not None and entry.tag is not None:
            self.kv_store.save(entry.tag, list(entry.tokens), entry.keys, entry.values,
                               _namespace(entry.namespace))

    def _drop_forgotten(self):
        """Conversations deleted (engine.forget): out of the slots and the prefix cache."""
        with self._cond:
            keys, self._forget = self._forget, []
        for key in keys:
            self.prefix.pop_tag(key)
            for s, k in enumerate(self.slot_key):
                if k == key:
                    self.slot_key[s] = None  # (a running reply keeps its slot until it ends)
                    if s in self.free:
                        self.cache.tokens[s] = []

    def _fork(self, seq: _Sequence) -> bool:
        """Copy the keys and values of the prompt prefix `seq` shares with a sequence admitted
        before it (n > 1 choices, a regeneration); True when that one has yet to compute some
        of it (seq then waits a step rather than compute it twice)."""
        ids = seq.ids
        cap = len(ids) - 1  # the last prompt token yields the logits: computed by seq itself
        for other in self.active:
            if other is seq:
                break
            if other.ticket.request.adapter is not seq.ticket.request.adapter:
                continue
            target = min(common_prefix(other.ids, ids), cap)
            if target <= seq.fed:
                continue
            have = min(self.cache.common_prefix(other.slot, ids), target)
            if have > seq.fed:
                keys, values = self.runner.read(other.slot, have)
                self.runner.write(seq.slot, keys, values, list(ids[:have]))
                self.forked += have - seq.fed
                seq.ticket.timings.cached_tokens = max(seq.ticket.timings.cached_tokens, have)
                seq.fed = have
            if seq.fed < target:
                return True
        return False

    def _step(self):
        # decode rows for every sequence with a sampled token; prompt chunks take turns in
        # admission order, up to `budget` prompt positions a step (several short prompts
        # arriving together all start in the same step)
        busy = any(s.decoding for s in self.active)
        budget = self.config.prefill_chunk_busy if busy else self.config.prefill_chunk
        groups: list[_Rows] = []
        for seq in list(self.active):
            if seq.decoding:
                groups.append(_Rows(seq, seq.fed, [seq.pending], True))
                continue
            if budget <= 0 or self._fork(seq):
                continue
            ids = seq.ids
            end = len(ids)
            if self.runner.last_by_decode and seq.fed < len(ids) - 1:
                end = len(ids) - 1  # (the PyTorch path feeds the prompt's last token as a decode row)
            n = min(budget, end - seq.fed)
            groups.append(_Rows(seq, seq.fed, ids[seq.fed:seq.fed + n], seq.fed + n == len(ids)))
            budget -= n
        if not groups:
            return
        out = self.runner.run(groups)
        self.steps += 1
        for g, logits in zip(groups, out):
            seq = g.seq
            seq.fed = g.start + len(g.ids)
            if not seq.decoding:
                self.prefilled += len(g.ids)
            if logits is not None:
                self._guard([seq.ticket], lambda: self._sample(seq, logits))

    def _sample(self, seq: _Sequence, logits: np.ndarray):
        ticket, timings, now = seq.ticket, seq.ticket.timings, time.perf_counter()
        if seq.first_at is None:
            seq.first_at = now
            timings.prefill_s = now - seq.admitted  # to the first token's logits
        step, finish = seq.gen.step(logits)
        if step is not None:
            timings.generated_tokens = seq.gen.generated
            timings.decode_s = now - seq.first_at
            self.generated += 1
            self._deliver(ticket, step)
            seq.pending = step.token
        if finish is not None:
            self._finish(seq, finish)

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


def _namespace(adapter) -> str:
    """The name of an adapter's keys and values on disk ("" for the base model)."""
    return "" if adapter is None else adapter.identity
