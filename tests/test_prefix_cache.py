"""The prefix cache (engine/prefix_cache.py): longest-prefix lookup, byte bound, LRU eviction,
covered entries, and reused keys/values that give the same logits as computing them."""
import torch

from homellm.engine.kv_cache import BatchKVCache
from homellm.engine.prefix_cache import PrefixCache, common_prefix
from homellm.model.llama import Llama, ModelArgs, rope_inv_freq

ARGS = ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=50, max_position_embeddings=128)


def kv(n, fill=0.0):
    """Keys and values for n positions: (layers, n_kv_heads, n, head_dim) each; 2 KiB per position."""
    t = torch.full((2, 2, n, 64), fill)
    return t, t.clone()


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix((9,), [1]) == 0


def test_lookup_finds_the_longest_shared_prefix():
    cache = PrefixCache(1 << 20, min_tokens=2)
    cache.store(list(range(10)), *kv(10, 1.0))
    cache.store([0, 1, 2, 7, 7, 7], *kv(6, 2.0))
    entry, n = cache.lookup([0, 1, 2, 3, 4, 99])
    assert n == 5 and entry.keys[0, 0, 0, 0] == 1.0
    entry, n = cache.lookup([0, 1, 2, 7, 7])
    assert n == 5 and entry.keys[0, 0, 0, 0] == 2.0
    assert cache.lookup([5, 5]) == (None, 0)
    assert cache.hits == 2 and cache.misses == 1


def test_bounded_in_bytes_with_lru_eviction():
    per_entry = sum(t.nbytes for t in kv(10))  # 40 KiB
    cache = PrefixCache(3 * per_entry, min_tokens=2)
    for i in range(3):
        assert cache.store([100 * i + j for j in range(10)], *kv(10))
    cache.lookup([0, 1, 2])  # entry 0 is now the most recently used
    cache.store([300 + j for j in range(10)], *kv(10))
    assert cache.nbytes <= cache.capacity_bytes and len(cache) == 3
    assert cache.lookup([100, 101])[1] == 0  # entry 1 was the least recently used: gone
    assert cache.lookup([0, 1])[1] == 2 and cache.lookup([300])[1] == 1
    assert cache.evictions == 1
    assert not cache.store(list(range(100)), *kv(100))  # larger than the whole cache
    assert not cache.store([1], *kv(1))  # shorter than min_tokens


def test_an_entry_that_extends_another_replaces_it():
    cache = PrefixCache(1 << 20, min_tokens=2)
    cache.store([1, 2, 3], *kv(3))
    cache.store([1, 2, 3, 4, 5], *kv(5))
    assert len(cache) == 1 and cache.nbytes == sum(t.nbytes for t in kv(5))
    assert not cache.store([1, 2, 3, 4], *kv(4))  # already covered
    assert len(cache) == 1


def test_reused_keys_and_values_give_the_same_logits():
    torch.manual_seed(0)
    model = Llama(ARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.inv_freq.copy_(rope_inv_freq(ARGS))
    model.eval()
    ids = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32]
    slots = BatchKVCache(ARGS, 64, slots=2)
    prefix = PrefixCache(1 << 20, min_tokens=2)
    with torch.inference_mode():
        full = model(torch.tensor([ids]), 0, slots.slot(0))[0]
        n = 8
        prefix.store(ids[:n], torch.stack([k[0, :, :n] for k in slots.k]),
                     torch.stack([v[0, :, :n] for v in slots.v]))
        entry, hit = prefix.lookup(ids)
        assert hit == n
        for layer in range(ARGS.num_hidden_layers):  # into the other slot, as the engine does
            slots.k[layer][1, :, :n] = entry.keys[layer]
            slots.v[layer][1, :, :n] = entry.values[layer]
        rest = model(torch.tensor([ids[n:]]), n, slots.slot(1))[0]
    torch.testing.assert_close(rest, full[n:], rtol=1e-5, atol=1e-5)
