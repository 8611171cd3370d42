"""The C runtime's batch call (network.h hl_batch, NativeModel.batch): rows of several sequences
at once, bit for bit what each sequence gives alone.

A row's logits must not depend on what else is in its batch, on how its sequence's prompt was cut
into chunks, or on whether the single-sequence call (hl_forward / hl_decode on the model's own
cache) or the batch call computed it: `np.array_equal`, on every kernel path this CPU has, for
packed and raw blocks, float16 and float32 caches.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import gguf
import numpy as np
import pytest

from homellm.engine import kernels
from homellm.engine.kernels.native import NativeModel, SlotCache

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, TINY_QWEN2  # noqa: E402
from test_kernels import _paths, quantized_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")
# three heads a kv head (GQA, as the default model) and a head_dim of 16
ARGS = dataclasses.replace(TINY_LLAMA, num_attention_heads=6, num_key_value_heads=2)


def ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def alone(model: NativeModel, prompt: list[int], replies: list[int]) -> list[np.ndarray]:
    """Logits of the prompt's last token, then of each reply token fed one at a time, from the
    single-sequence calls."""
    model.reset()
    out = [model.forward(prompt, 0)[-1]]
    for i, t in enumerate(replies):
        out.append(model.forward([t], len(prompt) + i)[-1])
    return out


def model_for(args, qtype, path, kv_dtype="f16", packed=True):
    return NativeModel(args, quantized_tensors(args, qtype), 96, path=path, threads=2, kv_dtype=kv_dtype,
                       packed=packed)


CASES = [(Q.Q4_0, "f16"), (Q.Q4_1, "f32"), (Q.Q8_0, "f16"), (Q.Q5_1, "f16"), (Q.Q5_0, "f16"), (Q.F16, "f32")]


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("qtype,kv", CASES, ids=[f"{q.name}-{k}" for q, k in CASES])
def test_mixed_batch_rows_equal_each_sequence_alone(path, qtype, kv):
    """Three sequences of different lengths arriving at different steps, prompts cut into chunks
    of other sizes than alone, decode rows beside prompt chunks: every logit bit for bit."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    model = model_for(ARGS, qtype, path, kv)
    V = ARGS.vocab_size
    prompts = [ids(37, 1, V), ids(5, 2, V), ids(20, 3, V)]
    replies = [ids(6, 4, V), ids(9, 5, V), ids(4, 6, V)]
    ref = [alone(model, p, r) for p, r in zip(prompts, replies)]

    cache = SlotCache(ARGS, 4, 96, kv)
    got: list[list[np.ndarray]] = [[], [], []]
    fed = [0, 0, 0]   # prompt positions in the cache
    step = [0, 0, 0]  # reply tokens fed
    # (sequence, prompt rows) per step: A comes in chunks of 16, B at once, C arrives at step 2
    schedule = [[(0, 16), (1, 5)], [(0, 16), (2, 7)], [(0, 5), (2, 13)]] + [[]] * 9
    for plan in schedule:
        toks, pos, slots, want, who = [], [], [], [], []
        for s, n in plan:  # prompt chunks
            p = prompts[s]
            chunk = p[fed[s]:fed[s] + n]
            toks += chunk; pos += range(fed[s], fed[s] + len(chunk)); slots += [s + 1] * len(chunk)
            fed[s] += len(chunk)
            last = fed[s] == len(p)
            want += [False] * (len(chunk) - 1) + [last]
            if last:
                who.append(s)
        for s in range(3):  # decode rows of sequences whose prompt is in
            if fed[s] == len(prompts[s]) and s not in [w for w, _ in plan] and step[s] < len(replies[s]):
                toks.append(replies[s][step[s]]); pos.append(fed[s] + step[s]); slots.append(s + 1)
                want.append(True); who.append(s)
                step[s] += 1
        if not toks:
            continue
        order = np.argsort([slots.index(sl) for sl in slots], kind="stable")  # rows of a slot together
        logits = model.batch(cache, [toks[i] for i in order], [pos[i] for i in order],
                             [slots[i] for i in order], [want[i] for i in order])
        rows_of = sorted(who, key=lambda s: slots.index(s + 1))
        for row, s in zip(logits, rows_of):
            got[s].append(row)
    for s in range(3):
        assert len(got[s]) == len(ref[s])
        for i, (a, b) in enumerate(zip(got[s], ref[s])):
            assert np.array_equal(a, b), f"sequence {s}, step {i}: max diff {np.abs(a - b).max()}"


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_chunking_does_not_change_a_bit(path):
    """A prompt fed whole, in chunks of 7, or one token at a time: the same keys, values and
    logits, bit for bit (attention per query row, matmuls per activation row)."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = TINY_QWEN2  # biases on q/k/v
    model = model_for(args, Q.Q4_1, path)
    prompt = ids(45, 7, args.vocab_size)
    whole = model.forward(prompt, 0, last_only=False)
    keys = model.k[1][:, :45].copy()
    model.reset()
    chunked = np.concatenate([model.forward(prompt[i:i + 7], i, last_only=False) for i in range(0, 45, 7)])
    assert np.array_equal(model.k[1][:, :45], keys)
    single = np.stack([model.decode(t, i).copy() for i, t in enumerate(prompt)])
    assert np.array_equal(whole, chunked) and np.array_equal(whole, single)




@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_rows_without_an_output_stop_at_the_last_attention(path):
    """Past the last layer's attention only the rows that give an output go on (network.h tail):
    a chunk that wants no output, scattered output rows, only the last row, and a decode after
    them: the wanted rows' logits and every layer's keys and values as the whole prompt's with
    every output, bit for bit."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    args = dataclasses.replace(TINY_QWEN2, num_attention_heads=4, num_key_value_heads=2)
    model = model_for(args, Q.Q4_1, path)
    prompt = ids(61, 9, args.vocab_size)
    whole = model.forward(prompt + [5], 0, last_only=False)
    kv = [(model.k[l][:, :62].copy(), model.v[l][:, :62].copy()) for l in range(args.num_hidden_layers)]
    model.reset()
    n = len(prompt)
    assert model.batch(None, prompt[:40], range(40), [0] * 40, want=[False] * 40) is None
    want = [i in (41, 47, 59) for i in range(40, n)]
    np.testing.assert_array_equal(model.batch(None, prompt[40:], range(40, n), [0] * (n - 40), want=want),
                                  whole[[41, 47, 59]])
    np.testing.assert_array_equal(model.decode(5, n), whole[n])
    for l, (k, v) in enumerate(kv):
        assert np.array_equal(model.k[l][:, :62], k) and np.array_equal(model.v[l][:, :62], v)
    model.reset()
    np.testing.assert_array_equal(model.forward(prompt, 0)[-1], whole[n - 1])

# a decode row (a chunk of one query) takes its own attention kernel on AVX512: several key tiles
# (64 keys each), sliding windows across tile bounds, 1 to 8 query heads a kv head, head_dim 32
LONG = [dataclasses.replace(TINY_LLAMA, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256),
        dataclasses.replace(TINY_QWEN2, num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=256),
        dataclasses.replace(TINY_LLAMA, num_attention_heads=6, num_key_value_heads=2, sliding_window=70,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)]


@pytest.mark.parametrize("path,threads", [("scalar", 2), ("avx2", 2), ("avx512", 2), ("avx2", 1), ("avx512", 1)])
@pytest.mark.parametrize("args", LONG, ids=["mha-hd32", "gqa8", "window70"])
def test_decode_rows_equal_prompt_rows_over_many_key_tiles(path, threads, args):
    """150 positions (three key tiles) fed whole, in chunks of 33, or one token at a time: the
    same logits and keys bit for bit, with sliding windows and 1, 3 or 8 query heads a kv head;
    on threads a decode row's attention runs in two phases (scores, then heads), on one in one."""
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    model = NativeModel(args, quantized_tensors(args, Q.Q8_0), 160, path=path, threads=threads)
    prompt = ids(150, 11, args.vocab_size)
    whole = model.forward(prompt, 0, last_only=False)
    keys = model.k[1][:, :150].copy()
    model.reset()
    chunked = np.concatenate([model.forward(prompt[i:i + 33], i, last_only=False) for i in range(0, 150, 33)])
    model.reset()
    single = np.stack([model.decode(t, i).copy() for i, t in enumerate(prompt)])
    assert np.array_equal(model.k[1][:, :150], keys)
    for name, got in (("chunks of 33", chunked), ("one at a time", single)):
        bad = np.flatnonzero(~np.all(got == whole, axis=1))
        assert bad.size == 0, f"{name}: positions {bad[:5].tolist()} differ, max {np.abs(got - whole).max()}"

def test_the_single_sequence_call_is_the_batch_call():
    """hl_forward on the model's own cache and hl_batch on slot 3 of a SlotCache: the same bits,
    with and without all rows' logits."""
    model = model_for(ARGS, Q.Q4_0, None)
    prompt = ids(30, 8, ARGS.vocab_size)
    own = model.forward(prompt, 0, last_only=False)
    cache = SlotCache(ARGS, 4, 96)
    batched = model.batch(cache, prompt, range(30), [3] * 30, [True] * 30)
    assert np.array_equal(own, batched)
    last = model.batch(cache, prompt[:12], range(12), [0] * 12)  # want=None: the last row
    assert last.shape == (1, ARGS.vocab_size) and np.array_equal(last[0], own[11])
    assert np.array_equal(cache.k[0][3, :, :30], model.k[0][:, :30])


def test_calls_at_once_on_one_model_equal_calls_one_by_one():
    """hl_batch keeps its buffers in the model from call to call (network.h batch_buffers) and a
    call made while another holds them takes its own: four threads batching their own caches on
    one model at once get, bit for bit, the logits of the same calls made one after another (and
    a small call after a large one computes in the large one's block)."""
    from concurrent.futures import ThreadPoolExecutor
    model = model_for(ARGS, Q.Q4_0, None)
    V = ARGS.vocab_size
    prompts = [ids(n, 10 + i, V) for i, n in enumerate((90, 3, 57, 1))]

    def run(p):
        cache = SlotCache(ARGS, 1, 96, "f16")
        return model.batch(cache, p, range(len(p)), [0] * len(p), want=[True] * len(p))

    ref = [run(p) for p in prompts]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(20):
            for got, want in zip(ex.map(run, prompts), ref):
                np.testing.assert_array_equal(got, want)


def test_fork_and_trim_share_a_prefix():
    """copy (fork: n > 1, regenerate) and trim (keep a shared prefix): continuing from a copied
    slot gives what continuing the original gives."""
    model = model_for(ARGS, Q.Q8_0, None)
    V = ARGS.vocab_size
    prompt, a, b = ids(25, 9, V), ids(5, 10, V), ids(5, 11, V)
    cache = SlotCache(ARGS, 3, 96)
    model.batch(cache, prompt, range(25), [0] * 25)
    cache.tokens[0] = list(prompt)
    cache.copy(0, 1)
    cache.copy(0, 2, 20)
    assert cache.tokens[1] == prompt and cache.tokens[2] == prompt[:20]
    both = model.batch(cache, a + b, list(range(25, 30)) * 2, [0] * 5 + [1] * 5, [True] * 10)
    ref_a = [x[-1] for x in [model.forward(prompt + a[:i + 1], 0) for i in range(5)]]
    model.reset()
    ref_b = [x[-1] for x in [model.forward(prompt + b[:i + 1], 0) for i in range(5)]]
    assert np.array_equal(both[:5], np.stack(ref_a)) and np.array_equal(both[5:], np.stack(ref_b))
    # slot 2 holds 20 shared positions: the rest of the prompt, then b, equal the same
    rest = model.batch(cache, prompt[20:] + b, range(20, 30), [2] * 10, [False] * 5 + [True] * 5)
    assert np.array_equal(rest, both[5:])
    cache.trim(1, 10)
    assert cache.tokens[1] == prompt[:10]


def test_bad_rows_are_refused():
    model = model_for(ARGS, Q.Q4_0, None)
    cache = SlotCache(ARGS, 2, 16)
    with pytest.raises(ValueError, match="out of range"):
        model.batch(cache, [1, 2], [0, 1], [0, 2])          # slot 2 of 2
    with pytest.raises(ValueError, match="out of range"):
        model.batch(cache, [1], [16], [0])                   # position 16 of 16
    with pytest.raises(ValueError, match="two chunks"):
        model.batch(cache, [1, 2, 3], [0, 1, 5], [0, 0, 0])  # slot 0 at 0-1 and again at 5
    with pytest.raises(ValueError, match="out of range"):
        model.batch(cache, [ARGS.vocab_size], [0], [0])


# -- the BatchEngine on the C runtime ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_fixtures import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", ARGS, "q4_1", seed=3)


def engine_requests(tokenizer):
    """Different lengths, n > 1 (one prompt, two seeds), stop ids, a JSON schema, logprobs."""
    from homellm.engine.batch import Request
    from homellm.engine.constrain import compile_response_format
    from homellm.engine.sampling import SamplingParams
    greedy, V = SamplingParams(temperature=0), ARGS.vocab_size
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    grammar = compile_response_format(tokenizer, schema)
    shared = ids(23, 20, V)
    return [
        Request(ids(41, 21, V), greedy, max_tokens=12, top_logprobs=3),
        Request(shared, SamplingParams(seed=7, **sampled), max_tokens=10, top_logprobs=2),
        Request(shared, SamplingParams(seed=8, **sampled), max_tokens=10),
        Request(ids(3, 22, V), greedy, max_tokens=14),  # stop ids: set from its free run
        Request(ids(17, 23, V), SamplingParams(seed=1, **sampled), max_tokens=24,
                constraint=grammar.start()),
        Request(ids(60, 24, V), greedy, max_tokens=6),  # arrives while the others decode
    ], grammar


def outputs(steps):
    return [(s.token, s.logprob, s.top_logprobs) for s in steps if s.token is not None], steps[-1].finish_reason


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_batch_engine_requests_together_equal_each_alone(tiny_gguf, path):
    """Every request of a mixed batch (lengths, arrivals mid-stream, n > 1 forks of one prompt,
    stop ids, a JSON schema, logprobs) gives exactly what it gives alone: tokens, logprobs and
    top alternatives bit for bit."""
    import queue

    from homellm.engine.batch import BatchConfig, BatchEngine
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")
    ckpt = open_checkpoint(tiny_gguf, as_numpy=True)
    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    model = NativeModel(ckpt.args, ckpt.tensors, 128, path=path, threads=2)
    reqs, grammar = engine_requests(tokenizer)
    engine = BatchEngine(model, BatchConfig(max_batch=4, ctx=128, prefill_chunk_busy=9, prefix_cache_bytes=0))
    try:
        free = outputs(list(engine.generate(reqs[3])))[0]
        reqs[3].stop_ids = frozenset({free[5][0]})
        alone = [outputs(list(engine.generate(r))) for r in reqs]
        reqs[4].constraint = grammar.start()
        for s in range(4):
            engine.cache.tokens[s] = []
        sinks = [queue.SimpleQueue() for _ in reqs]
        with engine._cond:  # (reentrant) every request but the last queued before a step runs
            for r, q in zip(reqs[:-1], sinks):
                engine.submit(r, q.put)
        first = sinks[0].get(timeout=60)  # the others decode: now the last one arrives
        engine.submit(reqs[-1], sinks[-1].put)
        got = []
        for i, q in enumerate(sinks):
            steps = [first] if i == 0 else []
            while not steps or steps[-1].finish_reason is None:
                steps.append(q.get(timeout=120))
            got.append(outputs(steps))
        assert got == alone
        assert engine.forked > 0  # the second choice copied the shared prompt
        assert alone[1][0] != alone[2][0]
        assert alone[3] == (free[:[t for t, _, _ in free].index(free[5][0])], "stop")
        import json
        text = tokenizer.decode([t for t, _, _ in alone[4][0]])
        if alone[4][1] == "stop":
            assert isinstance(json.loads(text)["a"], int)
    finally:
        engine.close()
