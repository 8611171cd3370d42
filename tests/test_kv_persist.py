"""Conversations whose keys and values outlive memory and restarts (engine/kv_persist.py, the
BatchEngine's cache_key, the server's prompt_cache_key and the web app's conversations).

A conversation continued after its engine closed (a restart) gives the same tokens as one that
never left memory, without prefilling its earlier turns; a file cut short, changed, or made for
another model, adapter or key is refused (logged, deleted) and the turn prefills instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import gguf
import numpy as np
import pytest

from homellm.engine import kernels
from homellm.engine.batch import BatchConfig, BatchEngine, Request
from homellm.engine.kernels.native import NativeModel
from homellm.engine.kv_persist import KVStore, file_name
from homellm.engine.sampling import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA  # noqa: E402
from test_kernels import quantized_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")
ARGS = dataclasses.replace(TINY_LLAMA, num_attention_heads=6, num_key_value_heads=2)
GREEDY = SamplingParams(temperature=0)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, ARGS.vocab_size, n).tolist()


@pytest.fixture(scope="module")
def model():
    return NativeModel(ARGS, quantized_tensors(ARGS, Q.Q4_1), 256)


def engine_for(model, root, budget=1 << 30, **config):
    store = KVStore(root, "model-a", ARGS, budget_bytes=budget)
    return BatchEngine(model, BatchConfig(max_batch=2, ctx=256, **config), kv_store=store), store


def turn(engine, prompt, key="conv-1", n=8):
    steps = list(engine.generate(Request(prompt, GREEDY, max_tokens=n, cache_key=key)))
    return [s.token for s in steps if s.token is not None], steps[-1].timings


def test_a_conversation_continues_after_a_restart_without_prefill(model, tmp_path):
    first = ids(60, 1)
    # never left memory: both turns on one engine
    engine, _ = engine_for(model, tmp_path / "mem")
    reply, _ = turn(engine, first)
    second = first + reply + ids(9, 2)
    kept, t_kept = turn(engine, second)
    engine.close()
    assert t_kept.cached_tokens == len(first) + len(reply) - 1
    # a restart between the turns: the engine closes (its conversations to disk), a new one opens
    engine, store = engine_for(model, tmp_path / "disk")
    assert turn(engine, first)[0] == reply
    engine.close()
    assert store.path("conv-1").is_file()
    engine, store = engine_for(model, tmp_path / "disk")
    try:
        again, t_again = turn(engine, second)
        assert again == kept                      # the same tokens as memory gave
        assert t_again.cached_tokens == len(first) + len(reply) - 1  # nothing but the new turn prefilled
        assert engine.prefilled == len(second) - t_again.cached_tokens
        assert store.loaded == 1
        # another key: not on disk for it (memory's slots reuse keys by their tokens alone)
        assert store.load("conv-2") is None
    finally:
        engine.close()


def test_evicted_from_memory_to_disk_and_back(model, tmp_path):
    """With a small prefix cache, conversations leave memory as others come: to disk, and a
    returning one is read back (before any restart)."""
    entry_bytes = 2 * ARGS.num_hidden_layers * ARGS.num_key_value_heads * ARGS.head_dim * 2 * 70
    engine, store = engine_for(model, tmp_path, prefix_cache_bytes=entry_bytes)
    try:
        convs = {f"c{i}": ids(60, 10 + i) for i in range(4)}
        replies = {k: turn(engine, p, k)[0] for k, p in convs.items()}  # 4 conversations, 2 slots
        store.flush()
        assert store.saved >= 1
        k = "c0"
        nxt = convs[k] + replies[k] + ids(5, 20)
        got, t = turn(engine, nxt, k)
        assert t.cached_tokens == len(convs[k]) + len(replies[k]) - 1 and store.loaded == 1
        fresh = BatchEngine(model, BatchConfig(max_batch=1, ctx=256))
        assert got == [s.token for s in fresh.generate(Request(nxt, GREEDY, max_tokens=8)) if s.token is not None]
        fresh.close()
    finally:
        engine.close()


@pytest.mark.parametrize("damage", ["truncated", "tampered", "foreign", "garbage"])
def test_a_damaged_file_is_refused_and_the_turn_prefills(model, tmp_path, damage, caplog):
    first = ids(50, 3)
    engine, store = engine_for(model, tmp_path)
    reply, _ = turn(engine, first)
    engine.close()
    path = store.path("conv-1")
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "tampered":  # one value of the keys flipped, the checksum left as it was
        pos = len(raw) - 32 - 1000
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0x40]) + raw[pos + 1:])
    elif damage == "foreign":  # another model's file under this model's name
        other = KVStore(tmp_path, "model-b", ARGS)
        keys = np.zeros((ARGS.num_hidden_layers, ARGS.num_key_value_heads, 10, ARGS.head_dim), np.float16)
        other.save("conv-1", first[:10], keys, keys)
        other.flush()
        path.write_bytes(other.path("conv-1").read_bytes())
    else:
        path.write_bytes(b"HLKV" + os.urandom(300))
    second = first + reply + ids(6, 4)
    engine, store = engine_for(model, tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="homellm.engine"):
            got, t = turn(engine, second)
        assert t.cached_tokens == 0 and store.refused == 1 and store.loaded == 0
        assert any("refused" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
        assert not path.exists() or damage == "foreign" and path.read_bytes() != raw
        fresh = BatchEngine(model, BatchConfig(max_batch=1, ctx=256))
        assert got == [s.token for s in fresh.generate(Request(second, GREEDY, max_tokens=8)) if s.token is not None]
        fresh.close()
    finally:
        engine.close()


def test_the_budget_evicts_the_least_recently_used_files(tmp_path):
    store = KVStore(tmp_path, "m", ARGS, budget_bytes=0)
    shape = (ARGS.num_hidden_layers, ARGS.num_key_value_heads, 40, ARGS.head_dim)
    kv = np.ones(shape, np.float16)
    store.save("x", ids(40, 5), kv, kv)
    store.flush()
    assert not store.dir.exists() or not list(store.dir.iterdir())  # budget 0: nothing kept
    one = None
    store = KVStore(tmp_path, "m", ARGS, budget_bytes=1 << 30)
    for i, key in enumerate(["a", "b", "c"]):
        store.save(key, ids(40, i), kv, kv)
        store.flush()
        one = store.path(key).stat().st_size
        os.utime(store.path(key), (time.time() - 100 + i, time.time() - 100 + i))
    assert store.load("a") is not None  # read: now the most recent
    store.budget_bytes = 2 * one + 10
    store.save("d", ids(40, 9), kv, kv)
    store.flush()
    left = sorted(p.name for p in store.dir.iterdir())
    assert left == sorted(file_name(k, "") for k in ("a", "d")) and store.evicted == 2


def test_served_conversations_survive_a_restart_and_go_with_their_deletion(default_gguf, tmp_path, monkeypatch):
    """The web app's conversation and an API request's prompt_cache_key: turn 2 after the
    server restarts reads turn 1's keys and values back (cached_tokens), the same reply as a
    server that stayed up; deleting the conversation deletes its files."""
    import asyncio

    from homellm.serve import GenerationSettings, ModelRegistry, ServeConfig, start_chat
    monkeypatch.setenv("HOMELLM_HOME", str(tmp_path / "home"))

    def registry():
        return ModelRegistry({"smollm2": default_gguf}, ServeConfig(ctx=512, max_batch=2, threads=2,
                                                                    keep_alive_s=-1))

    async def chat(reg, messages, key):
        s = await start_chat(reg, "smollm2", messages, GenerationSettings(
            max_tokens=12, temperature=0, prompt_cache_key=key))
        text, _ = await s.collect()
        return text, s.result

    convo = [{"role": "user", "content": "Tell me about the moon in three sentences."}]
    up = registry()  # never restarted
    first, _ = asyncio.run(chat(up, convo, "conversation:abc"))
    convo2 = convo + [{"role": "assistant", "content": first}, {"role": "user", "content": "And the sun?"}]
    stayed, r_stayed = asyncio.run(chat(up, convo2, "conversation:abc"))
    up.close()
    for f in (tmp_path / "home" / "kvcache").glob("*/*.kv"):
        f.unlink()
    before = registry()  # turn 1, then a restart
    assert asyncio.run(chat(before, convo, "conversation:abc"))[0] == first
    before.close()
    files = list((tmp_path / "home" / "kvcache").glob("*/*.kv"))
    assert len(files) == 1
    reg = registry()
    try:
        again, r_again = asyncio.run(chat(reg, convo2, "conversation:abc"))
        assert again == stayed and r_again.cached_tokens == r_stayed.cached_tokens > r_again.prompt_tokens // 2
        reg.forget_cache("conversation:abc")
        assert not list((tmp_path / "home" / "kvcache").glob("*/*.kv"))
    finally:
        reg.close()
    assert not list((tmp_path / "home" / "kvcache").glob("*/*.kv"))  # (not written back at close)
