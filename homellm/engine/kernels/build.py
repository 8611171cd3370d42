"""Compile ggml_cpu.c with the system C compiler, cache the shared library, load it with ctypes.

The library lands in `$HOMELLM_HOME/kernels/` (default `~/.cache/homellm/kernels/`) under a
name keyed by a hash of the source, the compiler's version and the flags, so an edit or a new
compiler builds afresh and concurrent processes never see a half-written file (compile to a
temporary name, then rename). One build runs on any x86-64, and one on any ARM64: no -march;
the vector paths carry their own target attributes and are chosen at run time.

Nothing is printed. `load()` returns the library, or None when there is no compiler, the build
fails, or HOMELLM_NO_KERNELS=1 — callers then keep the PyTorch path; `status()` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("ggml_cpu.c")
# included by SOURCE: its own thread pool, the network over a batch of rows (hl_batch), each
# path's kernels (kernels_avx2.h, kernels_neon.h, ...)
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-pthread", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math"]
# ARM64 has FMA in every CPU: without this the compiler fuses the scalar code's products into
# its sums, which then round otherwise than on x86-64 (where the plain build has no FMA); the
# NEON kernels write their fused multiply-adds out (kernels_neon.h)
ARM64_FLAGS = ["-ffp-contract=off"]


def flags(machine: str | None = None) -> list[str]:
    """The compiler flags for a CPU architecture (platform.machine() names; None: this one)."""
    import platform
    machine = (machine or platform.machine()).lower()
    return FLAGS + (ARM64_FLAGS if machine in ("aarch64", "arm64") else [])

_state: dict = {"lib": None, "tried": False, "status": "not built"}


def cache_dir() -> Path:
    """A build cache, not user data: $HOMELLM_CACHE/kernels (default ~/.cache/homellm)."""
    base = os.environ.get("HOMELLM_CACHE") or Path.home() / ".cache" / "homellm"
    return Path(base) / "kernels"


def compiler() -> str | None:
    """The C compiler: $HOMELLM_CC, else $CC, else cc / gcc on PATH."""
    for cand in (os.environ.get("HOMELLM_CC"), os.environ.get("CC"), "cc", "gcc"):
        if cand:
            path = shutil.which(cand)
            if path:
                return path
    return None


def _version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def _library_path(compiler_version: str) -> Path:
    src = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(src + compiler_version.encode() + " ".join(flags()).encode()).hexdigest()[:16]
    return cache_dir() / f"ggml_cpu-{key}.so"


def is_built() -> bool:
    """Whether a library for this source, compiler and flags is already cached (or the
    kernels are switched off): when False, the first load compiles (a few seconds)."""
    if os.environ.get("HOMELLM_NO_KERNELS") == "1" or _state["lib"] is not None:
        return True
    cc = compiler()
    try:
        return cc is None or _library_path(_version(cc)).exists()
    except (OSError, subprocess.SubprocessError):
        return True


def build(force: bool = False) -> Path | None:
    """Path of the compiled library (building it if needed), or None; sets `status()`."""
    cc = compiler()
    if cc is None:
        _state["status"] = "no C compiler (cc/gcc) found"
        return None
    try:
        version = _version(cc)
    except (OSError, subprocess.SubprocessError) as e:
        _state["status"] = f"{cc} --version failed: {e}"
        return None
    out = _library_path(version)
    if out.exists() and not force:
        _state["status"] = f"cached {out}"
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags(), "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0:
            _state["status"] = f"{cc} failed on {SOURCE.name}: {res.stderr.strip()[-2000:]}"
            return None
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        _state["status"] = f"{cc} failed on {SOURCE.name}: {e}"
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _state["status"] = f"built {out}"
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    c_int, c_float, c_void, c_i64 = ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64
    sigs = {
        "hl_cpu_features": (c_int, []),
        "hl_best_path": (c_int, []),
        "hl_path_ok": (c_int, [c_int]),
        "hl_pack_rows": (c_int, [c_int]),
        "hl_matmul": (c_int, [c_void, c_int, c_int, c_void, c_i64, c_int, c_int, c_void, c_int, c_int,
                               c_int]),
        "hl_pack_kind": (c_int, [c_int]),
        "hl_packed_bytes": (c_i64, [c_int, c_int, c_int, c_int]),
        "hl_repack": (c_int, [c_int, c_void, c_i64, c_int, c_int, c_void, c_int]),
        "hl_matmul_packed": (c_int, [c_void, c_int, c_int, c_void, c_int, c_void, c_int, c_int, c_int, c_int]),
        "hl_matmul_packed_multi": (c_int, [c_void, c_int, c_int, c_int, c_void, c_void, c_void, c_int, c_int,
                                           c_int, c_void, c_int]),
        "hl_quantize_rows": (None, [c_void, c_int, c_int, c_void, c_void, c_void, c_void]),
        "hl_quantize_row_path": (c_int, [c_void, c_int, c_int, c_void, c_void, c_void, c_void]),
        "hl_dequant_rows": (None, [c_int, c_void, c_i64, c_int, c_int, c_void]),
        "hl_model_new": (c_void, [c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_float, c_void]),
        "hl_model_free": (None, [c_void]),
        "hl_model_set_mat": (c_int, [c_void, c_int, c_int, c_int, c_int, c_int, c_void, c_i64]),
        "hl_model_set_packed": (c_int, [c_void, c_int, c_int, c_void, c_int]),
        "hl_model_set_vec": (None, [c_void, c_int, c_int, c_void]),
        "hl_model_set_arch": (c_int, [c_void, c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_void, c_void,
                                      c_float, c_float, c_float, c_int, c_void]),
        "hl_model_set_kv": (None, [c_void, c_int, c_void, c_void, c_int, c_int]),
        "hl_model_set_threads": (c_int, [c_void, c_int, c_int, c_int]),
        "hl_decode": (c_int, [c_void, c_int, c_int, c_void]),
        "hl_forward": (c_int, [c_void, c_void, c_int, c_int, c_void, c_int]),
        "hl_batch": (c_int, [c_void, c_void, c_int, c_void, c_void, c_void, c_void, c_void, c_void, c_void]),
        "hl_kv_new": (c_void, [c_int, c_int, c_int, c_int]),
        "hl_kv_set": (None, [c_void, c_int, c_void, c_void]),
        "hl_kv_free": (None, [c_void]),
        "hl_lora_new": (c_void, [c_int]),
        "hl_lora_set": (c_int, [c_void, c_int, c_int, c_int, c_float, c_void, c_void]),
        "hl_lora_free": (None, [c_void]),
        "hl_attention_causal": (c_int, [c_void, c_i64, c_i64, c_void, c_i64, c_i64, c_void, c_i64, c_i64,
                                        c_int, c_int, c_int, c_int, c_int, c_float, c_void, c_int, c_int]),
        "hl_pool_default_threads": (c_int, []),
        "hl_pool_tune": (None, [ctypes.c_double] * 8),
        "hl_pool_stats": (c_int, [c_void, c_int]),
        "hl_pool_reset": (None, []),
        "hl_pool_debug_stall": (None, [c_int, c_int]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel library, built and loaded once per process; None means: use PyTorch."""
    if os.environ.get("HOMELLM_NO_KERNELS", "") not in ("", "0"):
        _state["status"] = "disabled by HOMELLM_NO_KERNELS"
        return None
    if _state["tried"]:
        return _state["lib"]
    _state["tried"] = True
    path = build()
    if path is None:
        return None
    _unpin()
    try:
        _state["lib"] = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        _state["status"] = f"loading {path} failed: {e}"
        return None
    return _state["lib"]


def _unpin():
    """Give this thread back the CPUs the process started with, where OpenMP binding is asked
    for (OMP_PROC_BIND / OMP_PLACES) and an OpenMP runtime took them away: sentencepiece's, which
    `gguf` imports, pins the importing thread to one CPU, and the kernels' pool threads start with
    the CPUs of the thread that starts them (else every one lands on that one CPU: half the
    speed on 2 cores)."""
    import homellm
    start = homellm.START_AFFINITY
    if not start or not (os.environ.get("OMP_PROC_BIND") or os.environ.get("OMP_PLACES")):
        return
    try:
        if set(os.sched_getaffinity(0)) < start:
            os.sched_setaffinity(0, start)
    except OSError:
        pass


def reset():
    """Forget the loaded library (tests that change the compiler or the environment)."""
    _state.update(lib=None, tried=False, status="not built")


def status() -> str:
    return _state["status"]
