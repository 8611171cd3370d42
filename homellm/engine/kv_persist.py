"""Conversations' keys and values on disk, so a conversation reopened after its cache left memory
(or after a restart) continues without prefilling it again.

One file per conversation and namespace (the LoRA adapter that computed the keys, "" for the
base model), `<key digest>-<namespace or "base">.kv` under `root/<model identity>/` (the served
model file's hash: a file never meets another model; the key itself, a client's string, is
never a file name). A file is

    b"HLKV\\x01\\0\\0\\0"  u64 header length   header (JSON: model, namespace, key digest, tokens,
    layers, kv_heads, head_dim, dtype)   token ids int32 (n)   keys (L, n_kv, n, head_dim)
    values (L, n_kv, n, head_dim)   sha256 of everything before it (32 bytes)

written to a temporary name and renamed (never half-written). A file that is cut short, whose
checksum or header does not match, or that was made for another model, namespace, key or shape
is refused, logged and deleted: the request then prefills as if there were none. The folder is
kept under a byte budget, the least recently used files going first. Writes run on a thread of
their own (`flush` waits for them), reads on the caller's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from homellm.model.config import ModelArgs

MAGIC = b"HLKV\x01\x00\x00\x00"
SUFFIX = ".kv"
log = logging.getLogger("homellm.engine")


def key_digest(key: str) -> str:
    """The file name part of a conversation key (never the key itself: keys come from clients)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def file_name(key: str, namespace: str) -> str:
    """namespace: "" (the base model) or an adapter's identity (hex digits)."""
    return f"{key_digest(key)}-{namespace or 'base'}{SUFFIX}"


def remove_everywhere(root: str | Path, key: str) -> int:
    """Delete a conversation's files for every model and namespace under root; how many."""
    n = 0
    for p in Path(root).glob(f"*/{key_digest(key)}-*{SUFFIX}"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


class KVStore:
    """Files of (tokens, keys, values) by conversation key, for one model.

    model_id: the model file's identity (its hash); args: its shapes; dtype: numpy's float16 or
    float32 (the cache's); budget_bytes: the folder's size at most (0: nothing is kept)."""

    def __init__(self, root: str | Path, model_id: str, args: ModelArgs, dtype=np.float16,
                 budget_bytes: int = 2 << 30):
        self.dir = Path(root) / model_id
        self.model_id, self.args, self.dtype = model_id, args, np.dtype(dtype)
        self.budget_bytes = int(budget_bytes)
        self.saved = self.loaded = self.refused = self.evicted = 0
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    def path(self, key: str, namespace: str = "") -> Path:
        return self.dir / file_name(key, namespace)

    # -- writing ----------------------------------------------------------------------------

    def save(self, key: str, tokens: list[int], keys: np.ndarray, values: np.ndarray,
             namespace: str = ""):
        """Queue a write of a conversation's first len(tokens) positions: keys and values
        (n_layers, n_kv_heads, >= n, head_dim) arrays the store may keep (pass copies)."""
        if self.budget_bytes <= 0 or not tokens:
            return
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_forever, name="homellm-kv-writer",
                                                daemon=True)
                self._writer.start()
        self._queue.put((key, list(tokens), keys, values, namespace))

    def flush(self):
        """Wait until every queued write is on disk."""
        self._queue.join()

    def _write_forever(self):
        while True:
            item = self._queue.get()
            try:
                self._write(*item)
            except OSError as e:
                log.warning("kv cache: cannot write %s: %s", self.dir, e)
            finally:
                self._queue.task_done()

    def _write(self, key: str, tokens: list[int], keys: np.ndarray, values: np.ndarray, namespace: str):
        n = len(tokens)
        header = json.dumps({"model": self.model_id, "namespace": namespace,
                             "key": key_digest(key), "tokens": n,
                             "layers": self.args.num_hidden_layers,
                             "kv_heads": self.args.num_key_value_heads, "head_dim": self.args.head_dim,
                             "dtype": self.dtype.name, "created": round(time.time(), 3)}).encode()
        parts = [MAGIC, struct.pack("<Q", len(header)), header,
                 np.asarray(tokens, dtype="<i4").tobytes(),
                 np.ascontiguousarray(keys[:, :, :n], dtype=self.dtype).tobytes(),
                 np.ascontiguousarray(values[:, :, :n], dtype=self.dtype).tobytes()]
        digest = hashlib.sha256()
        for p in parts:
            digest.update(p)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                for p in parts:
                    f.write(p)
                f.write(digest.digest())
            os.replace(tmp, self.path(key, namespace))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.saved += 1
        self._evict()

    def _evict(self):
        """Delete the least recently used files until the folder fits the budget."""
        files = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.budget_bytes:
                break
            try:
                p.unlink()
                total -= size
                self.evicted += 1
            except OSError:
                pass

    # -- reading ------------------------------------------------------------------------------

    def load(self, key: str, namespace: str = "") -> tuple[list[int], np.ndarray, np.ndarray] | None:
        """(tokens, keys, values) of a conversation's file, or None: no file, or one that is
        refused (logged and deleted)."""
        path = self.path(key, namespace)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("kv cache: cannot read %s: %s", path, e)
            return None
        why = None
        try:
            out = self._parse(raw, key, namespace)
        except ValueError as e:
            out, why = None, str(e)
        if out is None:
            self.refused += 1
            log.warning("kv cache: %s refused (%s); the conversation is prefilled instead", path, why)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        self.loaded += 1
        return out

    def _parse(self, raw: bytes, key: str, namespace: str):
        if len(raw) < len(MAGIC) + 8 + 32 or raw[:len(MAGIC)] != MAGIC:
            raise ValueError("not a homellm KV cache file")
        if hashlib.sha256(memoryview(raw)[:-32]).digest() != raw[-32:]:  # (no copy)
            raise ValueError("its checksum does not match: cut short or changed")
        (size,) = struct.unpack("<Q", raw[len(MAGIC):len(MAGIC) + 8])
        start = len(MAGIC) + 8
        try:
            header = json.loads(raw[start:start + size])
        except ValueError:
            raise ValueError("its header is not JSON") from None
        a = self.args
        want = {"model": self.model_id, "namespace": namespace, "key": key_digest(key),
                "layers": a.num_hidden_layers, "kv_heads": a.num_key_value_heads, "head_dim": a.head_dim,
                "dtype": self.dtype.name}
        wrong = [k for k, v in want.items() if not isinstance(header, dict) or header.get(k) != v]
        if wrong:
            raise ValueError(f"made for another {', '.join(wrong)}")
        n = header.get("tokens")
        if not isinstance(n, int) or n < 1:
            raise ValueError("no token count")
        shape = (a.num_hidden_layers, a.num_key_value_heads, n, a.head_dim)
        body = start + size
        kv_bytes = int(np.prod(shape)) * self.dtype.itemsize
        if len(raw) != body + 4 * n + 2 * kv_bytes + 32:
            raise ValueError("its size does not match its header")
        tokens = np.frombuffer(raw, dtype="<i4", count=n, offset=body).tolist()
        if min(tokens) < 0 or max(tokens) >= a.vocab_size:
            raise ValueError("a token id outside the vocabulary")
        at = body + 4 * n
        keys = np.frombuffer(raw, dtype=self.dtype, count=kv_bytes // self.dtype.itemsize, offset=at).reshape(shape)
        values = np.frombuffer(raw, dtype=self.dtype, count=kv_bytes // self.dtype.itemsize,
                               offset=at + kv_bytes).reshape(shape)
        return tokens, keys, values

    def remove(self, key: str):
        """Delete a conversation's files (every namespace's), after the queued writes."""
        self.flush()
        for p in self.dir.glob(f"{key_digest(key)}-*{SUFFIX}"):
            try:
                p.unlink()
            except OSError:
                pass

    def stats(self) -> dict:
        files = list(self.dir.glob("*" + SUFFIX)) if self.dir.is_dir() else []
        return {"files": len(files), "bytes": sum(p.stat().st_size for p in files if p.exists()),
                "budget_bytes": self.budget_bytes, "saved": self.saved, "loaded": self.loaded,
                "refused": self.refused, "evicted": self.evicted}
