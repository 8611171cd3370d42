"""Fold a LoRA adapter into its base model: W' = W + (alpha / r) B A, written as a full model.

Works on the checkpoint's tensors directly (no network is built): each adapted weight is
dequantized to float32 and updated; every other tensor goes out as the file stores it (a GGUF
export copies blocks of the requested type unchanged). The merged model is registered in the
catalog as a Hugging Face folder (so `homellm run -m NAME` and `serve` use it), and can also
be written as GGUF for llama.cpp and Ollama.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from homellm.errors import HomellmError
from homellm.model.formats.checkpoint import GGMLTensor


def merged_tensors(ckpt, adapter: Path) -> dict:
    """The checkpoint's tensors with the adapter folded into the weights it adapts."""
    from homellm.train.adapter import read_adapter
    lora, pairs = read_adapter(adapter)
    tensors = dict(ckpt.tensors)
    for module, (a, b) in pairs.items():
        name = f"{module}.weight"
        w = tensors.get(name)
        if w is None:
            raise HomellmError(f"{adapter}: the adapter changes {name}, which {ckpt.source} lacks")
        w = w.dequantize(torch.float32) if isinstance(w, GGMLTensor) else w.float()
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise HomellmError(f"{adapter}: {module}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} "
                               f"do not fit the base weight {tuple(w.shape)}")
        tensors[name] = w + (b.float() @ a.float()) * lora.scaling
    return tensors


def merge(base, adapter: str | Path, name: str, *, gguf: str | Path | None = None,
          gguf_type: str = "q8_0", dtype: str = "float32", force: bool = False, progress=None):
    """Merge, register as catalog model `name` (HF folder in `dtype`), optionally write GGUF.

    Returns (ModelEntry, GGUF path or None, seconds)."""
    from homellm.catalog.export import DESCRIPTIVE, HF_DTYPES
    from homellm.catalog.library import (check_name, commit, find, models_dir, name_taken,
                                         new_staging, resolve)
    from homellm.catalog.manifest import ModelEntry, files_of, summarize, utc_now
    from homellm.model.formats import open_checkpoint
    from homellm.model.formats.gguf import OUT_TYPES, write_gguf
    from homellm.model.formats.hf import write_hf
    from homellm.tokenizer import Tokenizer

    t0 = time.perf_counter()
    name = check_name(name)
    if dtype not in HF_DTYPES:
        raise HomellmError(f"dtype {dtype!r}: expected one of {', '.join(HF_DTYPES)}")
    if gguf is not None and gguf_type not in OUT_TYPES:
        raise HomellmError(f"GGUF type {gguf_type!r}: expected one of {', '.join(OUT_TYPES)}")
    if not force and (models_dir() / name).exists() and find(name) is not None:
        raise name_taken(name)
    if gguf is not None and Path(gguf).exists() and not force:
        raise HomellmError(f"{gguf}: already exists")
    base_path = resolve(base)
    ckpt = open_checkpoint(base_path)
    tensors = merged_tensors(ckpt, Path(adapter))
    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    tokenizer_json, tokenizer_config = tokenizer.to_hf_files()

    staging = new_staging()
    try:
        write_hf(staging, ckpt.args, tensors, dtype=getattr(torch, dtype), tokenizer_json=tokenizer_json,
                 tokenizer_config=tokenizer_config, chat_template=ckpt.chat_template, progress=progress)
        merged = open_checkpoint(staging)
        source = {"kind": "merge", "base": str(base_path), "adapter": str(Path(adapter).resolve())}
        files = files_of(staging)
        entry = ModelEntry(name=name, format=merged.format, files=files, source=source,
                           size=sum(f["size"] for f in files), created=utc_now(),
                           summary=summarize(merged, staging))
        del merged
        entry = commit(staging, entry, force=force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    gguf_path = None
    if gguf is not None:
        metadata = {k: v for k, v in ckpt.metadata.items() if k in DESCRIPTIVE and isinstance(v, str)}
        metadata["finetune"] = name
        gguf_path = write_gguf(Path(gguf), ckpt.args, tensors, out_type=gguf_type,
                               tokenizer_fields=tokenizer.to_gguf_fields(),
                               chat_template=ckpt.chat_template, metadata=metadata, progress=progress)
    return entry, gguf_path, time.perf_counter() - t0
