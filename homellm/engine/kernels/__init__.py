"""Our own C kernels for the CPU: matmul on raw GGUF blocks, the whole network's prefill and
single-token decode, and causal attention.

`available()` says whether the library built and loaded (it needs a C compiler; without one,
or with HOMELLM_NO_KERNELS=1, everything stays on the PyTorch path). The code is in
ggml_cpu.c (the network over a batch of rows of several sequences in network.h, its thread
pool in thread_pool.h; threads.py sets and reports it); build.py
compiles and caches it; native.py runs a model on it without PyTorch;
ggml_linear.py, fast_decode.py and attention.py wrap it as PyTorch modules (imported on first
use, so `kernels.native` never imports torch).
"""
from __future__ import annotations

from homellm.engine.kernels.build import load, status

# the kernel paths (ggml_cpu.c P_*): x86-64 AVX2, AVX512-VNNI, AVX2 with AVX-VNNI; ARM64 NEON with
# the dot-product instructions, and with i8mm; the portable scalar code everywhere
PATHS = {"scalar": 0, "avx2": 1, "avx512": 2, "avxvnni": 3, "neon": 4, "i8mm": 5}
SUPPORTED_TYPES = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14)  # ggml types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1,
#                                                   Q8_0, Q4_K, Q5_K, Q6_K

_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", None,
             "avx512dq", "avxvnni", "dotprod", "i8mm")


def available() -> bool:
    return load() is not None


def cpu_features() -> dict:
    """{"avx2": bool, ..., "path": the best path, "paths": every path this CPU runs (any of them
    can be forced: HOMELLM_KERNEL_PATH)}; {} when the kernels are off."""
    lib = load()
    if lib is None:
        return {}
    bits = lib.hl_cpu_features()
    out = {name: bool(bits >> i & 1) for i, name in enumerate(_FEATURES) if name}
    out["path"] = {v: k for k, v in PATHS.items()}[lib.hl_best_path()]
    out["paths"] = [name for name, i in PATHS.items() if lib.hl_path_ok(i)]
    return out


def path_id(path: str | None) -> int:
    """A path's name (PATHS) -> the C enum; None or "auto" -> -1 (best this CPU has)."""
    if path in (None, "auto"):
        return -1
    if path not in PATHS:
        raise ValueError(f"kernel path {path!r}: expected one of {sorted(PATHS)} or 'auto'")
    return PATHS[path]


_LAZY = {"FusedProjection": "ggml_linear", "GGMLLinear": "ggml_linear", "matmul": "ggml_linear",
         "matmul_packed": "ggml_linear", "matmul_packed_multi": "ggml_linear", "repack_q4": "ggml_linear",
         "FastDecoder": "fast_decode", "CausalAttention": "attention", "attention_causal": "attention",
         "NativeModel": "native"}


def __getattr__(name: str):
    """The PyTorch-facing wrappers, imported when first asked for (they import torch)."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"homellm.engine.kernels.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'homellm.engine.kernels' has no attribute {name!r}")


__all__ = ["available", "cpu_features", "status", "FusedProjection", "GGMLLinear", "matmul",
           "matmul_packed", "matmul_packed_multi", "repack_q4", "FastDecoder",
           "CausalAttention", "attention_causal", "NativeModel"]
