"""Continuous batching (engine/batch.py): batched == single, admission between steps,
cancellation, queue limit, context limits, per-request seeds, prefix reuse."""
import threading
import time

import pytest
import torch

from homellm.engine.batch import BatchConfig, BatchEngine, QueueFullError, Request
from homellm.engine.generate import Engine
from homellm.engine.sampling import SamplingParams
from homellm.errors import ContextOverflowError
from homellm.model.llama import Llama, ModelArgs, rope_inv_freq

ARGS = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=97, max_position_embeddings=256)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = Llama(ARGS)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.inv_freq.copy_(rope_inv_freq(ARGS))
    return m.eval().requires_grad_(False)


class Loaded:
    """The default model on the C runtime (what the server runs a GGUF file on), and its
    tokenizer."""

    def __init__(self, path):
        from homellm.engine.kernels.native import NativeModel
        from homellm.model.formats import open_checkpoint
        from homellm.tokenizer import Tokenizer
        ckpt = open_checkpoint(path, as_numpy=True)
        self.tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
        self.network = NativeModel(ckpt.args, ckpt.tensors, 512, threads=2)


@pytest.fixture(scope="module")
def real(default_gguf):
    return Loaded(default_gguf)


def tokens_of(steps):
    return [s.token for s in steps if s.token is not None]


def run_concurrently(engine, requests):
    """Submit all requests at once (from threads); their token lists, in order."""
    out = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def work(i):
        barrier.wait()
        out[i] = list(engine.generate(requests[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_batched_greedy_equals_alone_on_the_default_model(real):
    """The most important property: the same greedy request, alone or among others, gives the
    same token ids (strict), with more requests than slots (so some join mid-stream)."""
    tok = real.tokenizer
    questions = ["What is 2+2?", "Name a color.", "Tell me a joke.", "Why is the sky blue?",
                 "Hi", "Write a haiku about rain.", "What is Python?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    engine = BatchEngine(real.network, BatchConfig(max_batch=4, ctx=512, prefill_chunk_busy=8))
    try:
        reqs = [Request(p, GREEDY, max_tokens=24, stop_ids=tok.eos_ids) for p in prompts]
        alone = [tokens_of(engine.generate(r)) for r in reqs]
        engine.prefix.clear()  # the batch run prefills again, in chunks, among running streams
        for s in range(engine.config.max_batch):
            engine.cache.tokens[s] = []
        together = run_concurrently(engine, reqs)
        assert [tokens_of(s) for s in together] == alone
        assert all(len(a) > 3 for a in alone)
    finally:
        engine.close()


def test_greedy_equals_the_single_sequence_engine(tiny):
    prompts = [[5, 9, 2, 40, 11], [3, 1, 4], [7], list(range(20, 50))]
    ref = [tokens_of(Engine(tiny, ctx=128).generate(p, GREEDY, max_tokens=12)) for p in prompts]
    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=128))
    try:
        out = run_concurrently(engine, [Request(p, GREEDY, max_tokens=12) for p in prompts])
        assert [tokens_of(s) for s in out] == ref
        final = [s[-1] for s in out]
        assert all(f.finish_reason == "length" and f.timings.generated_tokens == 12 for f in final)
        assert [f.timings.prompt_tokens for f in final] == [len(p) for p in prompts]
    finally:
        engine.close()


def test_a_request_joins_between_decode_steps(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=256))
    try:
        events = []
        lock = threading.Lock()
        first, submitted = threading.Event(), threading.Event()

        def sink(name):
            def put(item):
                with lock:
                    events.append((name, item))
                if name == "long":
                    first.set()
                    assert submitted.wait(30)  # the engine waits here until "short" is queued
            return put

        engine.submit(Request([1, 2, 3], GREEDY, max_tokens=150), sink("long"))
        assert first.wait(30)  # "long" is decoding (its first step is being delivered)
        engine.submit(Request([4, 5, 6], GREEDY, max_tokens=5), sink("short"))
        submitted.set()
        deadline = time.time() + 60
        while time.time() < deadline and sum(1 for n, s in events if s.finish_reason) < 2:
            time.sleep(0.01)
        names = [n for n, _ in events]
        short_done = max(i for i, n in enumerate(names) if n == "short")
        assert names.index("short") < 10 and names[:2] == ["long", "long"]  # joined mid-stream
        assert names[short_done + 1:].count("long") > 100, "the short one waited for the long one"
        short = tokens_of([s for n, s in events if n == "short"])
        assert short == tokens_of(Engine(tiny, ctx=256).generate([4, 5, 6], GREEDY, max_tokens=5))
    finally:
        engine.close()


def test_cancel_frees_the_slot_at_once(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=1, ctx=256, max_queue=4))
    try:
        got, cancelled = [], threading.Event()

        def sink(item):
            got.append(item)
            if len(got) == 2:
                assert cancelled.wait(30)  # hold the engine until the client has gone

        ticket = engine.submit(Request([1, 2, 3], GREEDY, max_tokens=200), sink)
        while len(got) < 2:
            time.sleep(0.001)
        ticket.cancel()  # the client went away
        cancelled.set()
        t0 = time.perf_counter()
        out = list(engine.generate(Request([9, 8], GREEDY, max_tokens=3)))
        assert len(tokens_of(out)) == 3 and time.perf_counter() - t0 < 5
        assert len(tokens_of(got)) == 2 and got[-1].finish_reason == "stop"  # no step after cancel
        assert engine.stats()["generated_tokens"] == 5
    finally:
        engine.close()


def test_a_full_queue_is_refused(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=1, ctx=256, max_queue=1))
    try:
        started, done = threading.Event(), threading.Event()

        def hold(step):  # keeps "a" in its slot (the engine waits here) until the checks are done
            started.set()
            done.wait(30)

        a = engine.submit(Request([1, 2], GREEDY, max_tokens=250), hold)
        assert started.wait(30)
        b = engine.submit(Request([3, 4], GREEDY, max_tokens=2), lambda s: None)
        try:
            with pytest.raises(QueueFullError, match="busy") as e:
                engine.submit(Request([5, 6], GREEDY, max_tokens=2), lambda s: None)
            assert e.value.retry_after_s >= 1
        finally:
            a.cancel(), b.cancel()
            done.set()
    finally:
        engine.close()


def test_context_limits(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=16))
    try:
        with pytest.raises(ContextOverflowError, match="20 tokens but the context holds 16"):
            engine.submit(Request(list(range(20)), GREEDY), lambda s: None)
        with pytest.raises(ValueError, match="empty"):
            engine.submit(Request([], GREEDY), lambda s: None)
        steps = list(engine.generate(Request(list(range(10)), GREEDY)))
        assert len(tokens_of(steps)) == 6 and steps[-1].finish_reason == "length"
    finally:
        engine.close()


def test_each_request_keeps_its_own_seed_and_settings(tiny):
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    engine = BatchEngine(tiny, BatchConfig(max_batch=4, ctx=128))
    try:
        reqs = [Request([1, 2, 3], SamplingParams(seed=s, **sampled), max_tokens=20) for s in (7, 7, 8)]
        reqs.append(Request([1, 2, 3], GREEDY, max_tokens=20))
        out = [tokens_of(s) for s in run_concurrently(engine, reqs)]
        assert out[0] == out[1] and out[0] != out[2]
        assert out[0] == tokens_of(engine.generate(reqs[0]))  # alone: the same draws
        assert out[3] == tokens_of(Engine(tiny, ctx=128).generate([1, 2, 3], GREEDY, max_tokens=20))
    finally:
        engine.close()


def test_stop_ids_and_logprobs(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=128))
    try:
        free = tokens_of(engine.generate(Request([1, 2, 3], GREEDY, max_tokens=10)))
        steps = list(engine.generate(Request([1, 2, 3], GREEDY, max_tokens=10, stop_ids={free[4]},
                                             top_logprobs=3)))
        assert tokens_of(steps) == free[:free.index(free[4])] and steps[-1].finish_reason == "stop"
        ref = list(Engine(tiny, ctx=128).generate([1, 2, 3], GREEDY, max_tokens=4, top_logprobs=3))
        for got, want in zip(steps[:-1], ref[:-1]):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [i for i, _ in got.top_logprobs] == [i for i, _ in want.top_logprobs]
            assert got.top_logprobs[0][0] == got.token  # greedy: the top choice
    finally:
        engine.close()


def test_prefix_reuse_across_turns_and_slots(tiny):
    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=256))
    try:
        first = list(range(10, 40))
        reply = tokens_of(engine.generate(Request(first, GREEDY, max_tokens=6)))
        second = first + reply + [7, 7, 7]
        # fill both slots with other sequences, so the first turn moves to the prefix cache
        run_concurrently(engine, [Request(list(range(50, 70)), GREEDY, max_tokens=3),
                                  Request(list(range(60, 90)), GREEDY, max_tokens=3)])
        steps = list(engine.generate(Request(second, GREEDY, max_tokens=8)))
        assert steps[-1].timings.cached_tokens == len(first) + len(reply) - 1
        assert engine.prefix.hits >= 1
        fresh = tokens_of(Engine(tiny, ctx=256).generate(second, GREEDY, max_tokens=8))
        assert tokens_of(steps) == fresh
    finally:
        engine.close()


def test_a_failing_request_does_not_stop_the_engine(tiny):
    class Broken:
        def mask_logits(self, logits):
            raise ValueError("broken constraint")

    engine = BatchEngine(tiny, BatchConfig(max_batch=2, ctx=128))
    try:
        with pytest.raises(ValueError, match="broken constraint"):
            list(engine.generate(Request([1, 2], GREEDY, max_tokens=3, constraint=Broken())))
        assert len(tokens_of(engine.generate(Request([1, 2], GREEDY, max_tokens=3)))) == 3
    finally:
        engine.close()


def test_the_engine_on_the_c_runtime_never_imports_torch(default_gguf, tmp_path):
    """A GGUF model served by the BatchEngine runs on the C runtime alone: no PyTorch in the
    process (~220 MB of resident memory and a second of start-up saved)."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from homellm.engine.batch import BatchConfig, BatchEngine, Request\n"
            "from homellm.engine.kernels.native import NativeModel\n"
            "from homellm.engine.sampling import SamplingParams\n"
            "from homellm.model.formats import open_checkpoint\n"
            f"ckpt = open_checkpoint({str(default_gguf)!r}, as_numpy=True)\n"
            "e = BatchEngine(NativeModel(ckpt.args, ckpt.tensors, 64), BatchConfig(max_batch=2, ctx=64))\n"
            "steps = list(e.generate(Request([1, 2, 3], SamplingParams(temperature=0), max_tokens=3)))\n"
            "e.close()\n"
            "print(len(steps), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "False"]
