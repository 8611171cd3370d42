"""Kept eval results: one JSON file per run under `$HOMELLM_HOME/evals/`.

    run = record("ppl", model="smollm2:135m", model_hash=model_identity(path), task="wiki.txt",
                 settings={"ctx": 512}, metrics={"ppl": 18.2, "bpb": 0.93})
    runs = load_runs()            # every kept run, oldest first

A run records the model's name as the user gave it, the hash of the exact file(s) measured
(so a re-quantized or re-tuned file never shares results with the old one), the task, the
settings that change the numbers, and the metrics. Files are written whole (temp + rename),
so a killed run leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homellm.errors import HomellmError

HASH_CHUNK = 1 << 22


@dataclass
class EvalRun:
    id: str
    kind: str  # "ppl", "kld", "tasks", "judge"
    model: str  # as the user named it: "smollm2:135m", "smollm2:135m+./adapter"
    model_hash: str  # model_identity() of what was measured
    task: str  # a data file name, an lm-eval task, a question set
    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: float = 0.0  # seconds since the epoch

    def to_json(self) -> dict:
        return asdict(self)


def evals_dir() -> Path:
    from homellm.catalog.library import home
    return home() / "evals"


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)


def model_identity(path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    """sha256 (first 16 hex digits) over the model's weight and tokenizer files, and the
    adapter's. A .gguf file is hashed whole; a folder by its files in name order. Cached by
    (path, size, mtime) under evals/.hashes so a 1 GB file is read once."""
    parts = [Path(path)] + ([Path(adapter)] if adapter else [])
    h = hashlib.sha256()
    for part in parts:
        files = [part] if part.is_file() else sorted(
            p for p in part.rglob("*") if p.is_file() and p.name != "manifest.json")
        for f in files:
            h.update(f.name.encode() + b"\0")
            h.update(_cached_file_hash(f).encode())
    return h.hexdigest()[:16]


def _cached_file_hash(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = evals_dir() / ".hashes" / key
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    _hash_file(path, h)
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache, digest)
    except OSError:
        pass  # a read-only home still measures; it just hashes again next time
    return digest


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(kind: str, *, model: str, model_hash: str, task: str, settings: dict | None = None,
           metrics: dict | None = None) -> EvalRun:
    """Keep one run's results; returns the stored run."""
    run = EvalRun(id=time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6], kind=kind,
                  model=model, model_hash=model_hash, task=task, settings=dict(settings or {}),
                  metrics=dict(metrics or {}), created=time.time())
    folder = evals_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"{run.id}.json", json.dumps(run.to_json(), indent=1, sort_keys=True))
    except OSError as e:
        raise HomellmError(f"cannot keep the eval results in {folder}: {e.strerror or e}") from None
    return run


def load_runs(kind: str | None = None) -> list[EvalRun]:
    """Every kept run (of one kind), oldest first. Unreadable files are skipped."""
    folder = evals_dir()
    runs = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            run = EvalRun(**{k: d[k] for k in EvalRun.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if kind is None or run.kind == kind:
            runs.append(run)
    runs.sort(key=lambda r: (r.created, r.id))
    return runs
