"""The local model library: `$HOMELLM_HOME/models/<name>/`, one readable folder per model.

Each folder holds the model's own files (a .gguf, or a Hugging Face folder's config.json,
safetensors and tokenizer files) and a manifest.json; never hashed blobs, so llama.cpp,
transformers and our trainer open the same files. Nothing here imports torch.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from homellm.catalog.manifest import MANIFEST, ModelEntry, read_manifest, write_manifest
from homellm.errors import HomellmError, ModelFileError, ModelNotFoundError

DEFAULT_NAME = "smollm2:135m"
# names that always mean a model we know how to fetch: name -> the source string for pull()
KNOWN = {DEFAULT_NAME: "default"}
ALIASES = {"default": DEFAULT_NAME, "smollm2": DEFAULT_NAME}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?")
STAGING_PREFIX = ".pull-"


def home() -> Path:
    """$HOMELLM_HOME, default ~/.homellm (not created here)."""
    return Path(os.environ.get("HOMELLM_HOME") or Path.home() / ".homellm").expanduser()


def models_dir() -> Path:
    return home() / "models"


def check_name(name: str) -> str:
    """`name` if it is a valid catalog name (Ollama style: `family:tag`), else HomellmError."""
    if not isinstance(name, str) or len(name) > 128 or not _NAME.fullmatch(name):
        raise HomellmError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and "
                           "at most one ':' before a tag, e.g. 'smollm2:135m'")
    return name


def name_from(text: str) -> str:
    """A catalog name made from a file or folder name: lower case, odd characters to '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name[:128] or "model"


def list_models() -> list[ModelEntry]:
    """Every model in the catalog, sorted by name (folders without a valid manifest are skipped)."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue
        try:
            entries.append(read_manifest(folder))
        except ModelFileError:
            continue
    return entries


def find(name: str) -> ModelEntry | None:
    """The entry for a name or alias (`smollm2` -> `smollm2:135m`, or the one `smollm2:*`), or None."""
    name = ALIASES.get(name, name)
    if not _NAME.fullmatch(name):
        return None
    folder = models_dir() / name
    if (folder / MANIFEST).is_file():
        return read_manifest(folder)
    if ":" not in name:  # a family name: the single model of that family
        family = [e for e in list_models() if e.name.split(":")[0] == name]
        if len(family) == 1:
            return family[0]
    return None


def not_found(name: str) -> ModelNotFoundError:
    names = [e.name for e in list_models()]
    have = f"available: {', '.join(names)}" if names else "the catalog is empty"
    return ModelNotFoundError(f"no model named {name!r} in {models_dir()} ({have}); "
                              f"add one with `homellm pull SOURCE` (a .gguf file, a Hugging Face "
                              f"folder, hf:owner/repo, or nothing for the default {DEFAULT_NAME})")


def get(name: str) -> ModelEntry:
    """The catalog entry called `name` (or an alias of it); ModelNotFoundError lists the others."""
    entry = find(name)
    if entry is None:
        raise not_found(name)
    return entry


def rm(name: str) -> ModelEntry:
    """Delete a model's folder; returns the entry that was removed."""
    entry = get(name)
    trash = Path(tempfile.mkdtemp(dir=models_dir(), prefix=".rm-"))
    os.replace(entry.folder, trash / "model")  # one rename: the name is gone at once
    shutil.rmtree(trash, ignore_errors=True)
    return entry


def resolve(name_or_path: str | os.PathLike | None = None, progress=None) -> Path:
    """What `open_checkpoint` should read for a catalog name, a path, or None (the default model).

    A known name that is not pulled yet (None, "default", "smollm2", hf:owner/repo) is pulled
    first. A path to a .gguf file or a Hugging Face folder is returned as it is.
    """
    from homellm.catalog.pull import source_name

    if name_or_path is None:
        name_or_path = "default"
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such file or folder")
        return path
    text = str(name_or_path)
    if text.startswith("hf:"):
        entry = find(source_name(text))
        if entry is None or entry.source.get("spec") != text:
            entry = _auto_pull(text, None, progress)
        return entry.path
    entry = find(text)
    if entry is not None:
        return entry.path
    path = Path(text).expanduser()
    if path.exists():
        return path
    canonical = ALIASES.get(text, text)
    if canonical in KNOWN:
        return _auto_pull(KNOWN[canonical], canonical, progress).path
    if "/" in text or os.sep in text or text.endswith(".gguf"):
        raise ModelNotFoundError(f"{path}: no such file or folder")
    raise not_found(text)


def _auto_pull(source: str, name: str | None, progress) -> ModelEntry:
    """pull() for resolve(): with a byte bar on stderr unless the caller passed a callback."""
    from homellm.catalog.progress import ByteBar
    from homellm.catalog.pull import pull

    bar = ByteBar(f"pulling {name or source}") if progress is None else None
    try:
        return pull(source, name=name, progress=progress or bar)
    finally:
        if bar is not None:
            bar.close()


# -- adding a folder to the catalog, all or nothing ------------------------------------------

def new_staging() -> Path:
    """An empty hidden folder inside models/ (same file system, so the final rename is atomic)."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    stale = time.time() - 24 * 3600  # left by a pull or rm that was killed: a day is long enough
    for old in root.glob(".*-*"):
        if old.name.startswith((STAGING_PREFIX, ".rm-")) and old.stat().st_mtime < stale:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=STAGING_PREFIX))


def commit(staging: Path, entry: ModelEntry, force: bool = False) -> ModelEntry:
    """Write the manifest and rename the staging folder to models/<name>."""
    target = models_dir() / entry.name
    write_manifest(entry, staging)
    old = None
    if target.exists():
        if not force:
            raise name_taken(entry.name)
        old = Path(tempfile.mkdtemp(dir=models_dir(), prefix=".rm-"))
        os.replace(target, old / "model")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    entry.folder = target
    return entry


def name_taken(name: str) -> HomellmError:
    return HomellmError(f"a model named {name!r} is already in the catalog ({models_dir() / name}); "
                        f"pick another name with --name, replace it with --force, "
                        f"or remove it first with `homellm rm {name}`")
