"""Tokenized corpora: packed shards of token ids, read back as memory maps.

`<corpus>/shards/` holds `train-00000.bin`, ... and `val-00000.bin`: raw little-endian
uint16 ids when the vocabulary fits in 16 bits, else uint32, every document's tokens one
after the other, each document starting with the tokenizer's BOS (so BOS also marks where
the previous one ended). `shards.json` says the dtype, the vocabulary, each file's token
count, and each split's documents and UTF-8 bytes (bits per byte need them).

Tokenization runs the tokenizer's batch encoder (Rust, on every core; it releases the GIL)
while a thread reads and parses the next batch of JSON lines. Each shard is written under a
temporary name and renamed once complete; on an error (a full disk) the files of the run are
removed and `shards.json` is never written, so a corpus folder has either all its shards or
none.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homellm.errors import HomellmError

FOLDER, INDEX = "shards", "shards.json"
SPLITS = ("train", "val")
BATCH_DOCS = 512


def read_texts(path: Path, batch: int = BATCH_DOCS):
    """Batches of (text, utf-8 bytes) from a prepared JSONL file ({"text": ...} lines)."""
    texts = []
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise HomellmError(f"{path}:{n}: expected a JSON object with a 'text' string "
                                       f"(a file written by homellm data prepare)") from None
                if not isinstance(text, str):
                    raise HomellmError(f"{path}:{n}: 'text' is not a string")
                texts.append(text)
                if len(texts) == batch:
                    yield texts
                    texts = []
    except OSError as e:
        raise HomellmError(f"cannot read {path}: {e.strerror or e}") from None
    if texts:
        yield texts


def _prefetch(iterator, depth: int = 2):
    """The iterator's items, produced by a thread `depth` items ahead (its errors re-raised)."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def run():
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class SplitStats:
    files: list
    tokens: int = 0
    documents: int = 0
    bytes: int = 0


def _write_shard(path: Path, tokens: np.ndarray):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HomellmError(f"cannot write the shard {path}: {e.strerror or e}; nothing of this "
                           f"run is kept (free some space and run it again)") from None


def tokenize_corpus(corpus: Path, tokenizer, shard_tokens: int = 100_000_000, progress=None) -> dict:
    """Tokenize `corpus`/train.jsonl and val.jsonl into `corpus`/shards; returns the index.

    `tokenizer` is a homellm Tokenizer whose encoding starts each text with BOS."""
    corpus = Path(corpus)
    if tokenizer.bos_id is None:
        raise HomellmError("the tokenizer has no BOS token to mark where documents start")
    folder = corpus / FOLDER
    folder.mkdir(exist_ok=True)
    for old in list(folder.glob("*.bin")) + [folder / INDEX]:
        old.unlink(missing_ok=True)  # a previous run's shards: replaced as a whole
    dtype = dtype_for(tokenizer.vocab_size)
    backend = tokenizer.backend
    adds_bos = tokenizer.add_bos
    index = {"format": 1, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
             "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "splits": {}}
    written: list[Path] = []
    t0 = time.perf_counter()
    try:
        for split in SPLITS:
            source = corpus / f"{split}.jsonl"
            if not source.is_file():
                if split == "train":
                    raise HomellmError(f"{corpus}: no train.jsonl (run homellm data prepare first)")
                continue
            stats = SplitStats(files=[])
            pending: list[np.ndarray] = []
            pending_n = 0

            def flush():
                nonlocal pending, pending_n
                if not pending_n:
                    return
                name = f"{split}-{len(stats.files):05d}.bin"
                _write_shard(folder / name, np.concatenate(pending))
                written.append(folder / name)
                stats.files.append({"name": name, "tokens": pending_n})
                pending, pending_n = [], 0

            for texts in _prefetch(read_texts(source)):
                encodings = backend.encode_batch_fast(texts, add_special_tokens=True)
                for text, enc in zip(texts, encodings):
                    ids = enc.ids
                    if not adds_bos:
                        ids = [tokenizer.bos_id] + ids
                    arr = np.asarray(ids, dtype=dtype)
                    pending.append(arr)
                    pending_n += len(arr)
                    stats.tokens += len(arr)
                    stats.documents += 1
                    nbytes = len(text.encode("utf-8"))
                    stats.bytes += nbytes
                    if progress is not None:
                        progress({"split": split, "bytes": nbytes, "tokens": len(arr)})
                    if pending_n >= shard_tokens:
                        flush()
            flush()
            if split == "train" and stats.tokens == 0:
                raise HomellmError(f"{source}: no documents (the corpus is empty)")
            index["splits"][split] = {"files": stats.files, "tokens": stats.tokens,
                                      "documents": stats.documents, "bytes": stats.bytes}
        index["seconds"] = time.perf_counter() - t0
        tmp = folder / f".{INDEX}.tmp"
        try:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp, folder / INDEX)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HomellmError(f"cannot write {folder / INDEX}: {e.strerror or e}") from None
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    return index


@dataclass
class TokenData:
    """A tokenized corpus opened for training: each split's shards as read-only memory maps."""

    folder: Path
    index: dict
    train: list  # np.memmap per shard
    val: list

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def bytes_per_token(self, split: str = "val") -> float:
        s = self.index["splits"].get(split) or self.index["splits"]["train"]
        return s["bytes"] / max(s["tokens"], 1)


def open_tokens(corpus: Path) -> TokenData:
    """The shards of a corpus folder (made by `homellm tokenizer train`), memory-mapped."""
    corpus = Path(corpus)
    path = corpus / FOLDER / INDEX
    if not path.is_file():
        hint = "run homellm tokenizer train on it first" if (corpus / "train.jsonl").is_file() \
            else "make one with homellm data prepare, then homellm tokenizer train"
        raise HomellmError(f"{corpus}: no tokenized corpus ({path} is missing; {hint})")
    try:
        index = json.loads(path.read_text())
        dtype = np.dtype(index["dtype"])
        maps = {}
        for split in SPLITS:
            maps[split] = []
            for f in index["splits"].get(split, {}).get("files", []):
                file = corpus / FOLDER / f["name"]
                if file.stat().st_size != f["tokens"] * dtype.itemsize:
                    raise HomellmError(f"{file}: {file.stat().st_size} bytes, expected "
                                       f"{f['tokens'] * dtype.itemsize} ({f['tokens']} tokens); "
                                       f"tokenize the corpus again")
                maps[split].append(np.memmap(file, dtype=dtype, mode="r"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HomellmError(f"{path}: cannot open the tokenized corpus ({e})") from None
    return TokenData(corpus, index, maps["train"], maps["val"])
