"""Keys and values of earlier sequences, kept by their token prefix, so a conversation's
next turn does not prefill its earlier turns again.

An entry holds the ids of one sequence and a copy of their keys and values, (n_layers,
n_kv_heads, n, head_dim) for each. A lookup finds the entry sharing the longest prefix with
a new prompt: those positions' keys and values are copied into the new sequence's slot
instead of being computed. The store is bounded in bytes; the least recently used entries
go first. An entry whose ids are a prefix of a new entry's is dropped (the new one covers it).
Entries live in namespaces (e.g. the LoRA adapter whose rows computed them): a lookup sees only
its own namespace's. An entry may carry a tag (a conversation's cache key): `on_drop(entry)` is
called for a tagged entry leaving the store (evicted, or covered by another conversation's),
which is where a conversation's keys go to disk (engine/kv_persist.py).
Keys and values are arrays of the engine's cache (numpy for the C runtime, torch tensors for
the PyTorch network): the store only counts their bytes.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from homellm.engine.tokens import common_prefix


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    keys: object    # (n_layers, n_kv_heads, n, head_dim)
    values: object  # (n_layers, n_kv_heads, n, head_dim)
    namespace: object = None
    tag: str | None = None

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def key(self) -> tuple:
        return (self.namespace, self.tokens)


class PrefixCache:
    """Entries keyed by their namespace and token ids, at most `capacity_bytes` of keys and
    values in all.

    Thread-safe. `min_tokens`: shorter sequences are not worth an entry.
    """

    def __init__(self, capacity_bytes: int, min_tokens: int = 8, on_drop=None):
        self.capacity_bytes = int(capacity_bytes)
        self.min_tokens = min_tokens
        self.on_drop = on_drop
        self.entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()  # LRU first
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, ids: list[int], namespace=None) -> tuple[PrefixEntry | None, int]:
        """The entry of `namespace` sharing the longest prefix with `ids`, and that length
        (None, 0 if none)."""
        with self._lock:
            best, best_n = None, 0
            for entry in self.entries.values():
                if entry.namespace != namespace:
                    continue
                n = common_prefix(entry.tokens, ids)
                if n > best_n:
                    best, best_n = entry, n
            if best is None:
                self.misses += 1
                return None, 0
            self.hits += 1
            self.entries.move_to_end(best.key)
            return best, best_n

    def store(self, tokens: list[int], keys, values, namespace=None, tag: str | None = None) -> bool:
        """Keep `tokens` with their keys and values (n_layers, n_kv_heads, n, head_dim), which
        the cache owns from now on (pass copies). Returns whether it was kept (a tagged entry
        that is not goes to on_drop)."""
        entry = PrefixEntry(tuple(tokens), keys, values, namespace, tag)
        tokens = entry.tokens
        if len(tokens) < self.min_tokens or entry.nbytes > self.capacity_bytes:
            self._dropped(entry)
            return False
        with self._lock:
            for other in list(self.entries.values()):  # entries the new one covers
                if other.namespace != namespace:
                    continue
                if len(other.tokens) <= len(tokens) and tokens[:len(other.tokens)] == other.tokens:
                    self._drop(other.key, other.tag != tag)
                elif len(other.tokens) > len(tokens) and other.tokens[:len(tokens)] == tokens \
                        and other.tag == tag:
                    self.entries.move_to_end(other.key)  # already covered by a longer one
                    return False
            while self.entries and self.nbytes + entry.nbytes > self.capacity_bytes:
                self._drop(next(iter(self.entries)), True)
                self.evictions += 1
            self.entries[entry.key] = entry
            self.nbytes += entry.nbytes
            return True

    def clear(self):
        with self._lock:
            self.entries.clear()
            self.nbytes = 0

    def _drop(self, key: tuple, persist: bool = False):
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        if persist:
            self._dropped(entry)

    def _dropped(self, entry: PrefixEntry):
        if entry.tag is not None and self.on_drop is not None:
            self.on_drop(entry)

    def pop_tag(self, tag: str) -> list[PrefixEntry]:
        """Remove and return the entries of a tag (a conversation deleted, or a shutdown)."""
        with self._lock:
            out = [e for e in self.entries.values() if e.tag == tag]
            for e in out:
                self._drop(e.key)
            return out

    def tagged(self) -> list[PrefixEntry]:
        with self._lock:
            return [e for e in self.entries.values() if e.tag is not None]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes,
                "capacity_bytes": self.capacity_bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
