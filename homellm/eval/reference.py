"""The reference that `homellm eval ppl --save-logits FILE` keeps and `--kl-divergence FILE`
compares against: a numpy .npz archive.

Full logits are vocab_size floats a token (49152 x 4 bytes for SmolLM2: 1.5 GB for 8k scored
tokens), so a reference keeps, for every scored position, the top-k of the reference model's
distribution and one bucket for the rest (k = 32 by default; 8k + 8 bytes a token):

    meta         JSON text: format, model, model_hash, data, data_sha256, ctx, top_k,
                 vocab_size, tokenizer (a fingerprint of the vocabulary), text_tokens
    tokens       (n_chunks, ctx) int32    each chunk exactly as the model saw it (BOS in front
                                          when the model adds one)
    scored_bytes (n_chunks,) int64        UTF-8 bytes of each chunk's scored tokens
    top_ids      (N, k) int32             the k most likely next tokens, most likely first
    top_logp     (N, k) float32           their log-probabilities (natural log)
    tail_logp    (N,) float32             log of the probability of every other token together
    target_logp  (N,) float32             log-probability of the token that came next

N = n_chunks x (ctx - 1 - ctx // 2): the scored positions, chunk by chunk. The file is written
to a temporary name in the target folder and renamed when complete.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homellm.errors import HomellmError

FORMAT = "homellm-ppl-reference"
VERSION = 1
ARRAYS = ("tokens", "scored_bytes", "top_ids", "top_logp", "tail_logp", "target_logp")


@dataclass
class Reference:
    meta: dict
    tokens: np.ndarray        # (n_chunks, ctx) int32
    scored_bytes: np.ndarray  # (n_chunks,) int64
    top_ids: np.ndarray       # (N, k) int32
    top_logp: np.ndarray      # (N, k) float32
    tail_logp: np.ndarray     # (N,) float32
    target_logp: np.ndarray   # (N,) float32

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])


def check_writable(path: Path) -> None:
    """Fail now, not after the whole run, when `path` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise HomellmError(f"--save-logits {path}: is a folder; expected a file name (e.g. ref.npz)")
    if not folder.is_dir():
        raise HomellmError(f"--save-logits {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise HomellmError(f"--save-logits {path}: folder {folder} is not writable")


def save(path: str | os.PathLike, ref: Reference) -> Path:
    """Write the reference whole (temp file + rename): an interrupted run leaves nothing."""
    path = Path(path)
    meta = dict(ref.meta, format=FORMAT, version=VERSION)
    arrays = {name: getattr(ref, name) for name in ARRAYS}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                   prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez_compressed(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> Reference:
    """Read and check a reference; every problem is a HomellmError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HomellmError(f"--kl-divergence {path}: no such file "
                           f"(make one with `homellm eval ppl --save-logits {path}`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("meta",) + ARRAYS if k not in z.files]
            if missing:
                raise HomellmError(f"{path}: not a homellm logits reference (no {', '.join(missing)}; "
                                   f"expected a file written by `homellm eval ppl --save-logits`)")
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ARRAYS}
    except HomellmError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise HomellmError(f"{path}: not a homellm logits reference ({e}); expected a file "
                           f"written by `homellm eval ppl --save-logits`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HomellmError(f"{path}: not a homellm logits reference (format "
                           f"{meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise HomellmError(f"{path}: reference version {meta.get('version')}; this homellm reads "
                           f"version {VERSION}: make it again with --save-logits")
    ref = Reference(meta=meta, **arrays)
    _check_shapes(path, ref)
    return ref


def _check_shapes(path: Path, ref: Reference) -> None:
    def bad(what: str):
        return HomellmError(f"{path}: damaged reference: {what}")
    if ref.tokens.ndim != 2 or ref.tokens.shape[1] < 4 or ref.tokens.shape[0] < 1:
        raise bad(f"tokens has shape {ref.tokens.shape}, expected (chunks, ctx >= 4)")
    n_chunks, ctx = ref.tokens.shape
    n = n_chunks * (ctx - 1 - ctx // 2)
    if ref.top_ids.ndim != 2 or ref.top_ids.shape[0] != n or ref.top_ids.shape[1] < 1:
        raise bad(f"top_ids has shape {ref.top_ids.shape}, expected ({n}, k)")
    k = ref.top_ids.shape[1]
    for name, shape in (("top_logp", (n, k)), ("tail_logp", (n,)), ("target_logp", (n,)),
                        ("scored_bytes", (n_chunks,))):
        if getattr(ref, name).shape != shape:
            raise bad(f"{name} has shape {getattr(ref, name).shape}, expected {shape}")
    if int(ref.meta.get("ctx", -1)) != ctx:
        raise bad(f"meta ctx {ref.meta.get('ctx')} but chunks of {ctx} tokens")
