"""Our own C kernels for the CPU: matmul on raw GGUF blocks, a fused single-token decode and
causal attention for prefill.

`available()` says whether the library built and loaded (it needs a C compiler; without one,
or with HOMELLM_NO_KERNELS=1, everything stays on the PyTorch path). The code is in
ggml_cpu.c; build.py compiles and caches it; ggml_linear.py, fast_decode.py and attention.py
wrap it.
"""
from __future__ import annotations

from homellm.engine.kernels.build import load, status

PATHS = {"scalar": 0, "avx2": 1, "avx512": 2}
SUPPORTED_TYPES = (0, 1, 2, 3, 8)  # ggml types: F32, F16, Q4_0, Q4_1, Q8_0

_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", None,
             "avx512dq")


def available() -> bool:
    return load() is not None


def cpu_features() -> dict:
    """{"avx2": bool, ..., "path": "avx512" | "avx2" | "scalar"}; {} when the kernels are off."""
    lib = load()
    if lib is None:
        return {}
    bits = lib.hl_cpu_features()
    out = {name: bool(bits >> i & 1) for i, name in enumerate(_FEATURES) if name}
    out["path"] = {v: k for k, v in PATHS.items()}[lib.hl_best_path()]
    return out


def path_id(path: str | None) -> int:
    """"scalar" / "avx2" / "avx512" -> the C enum; None or "auto" -> -1 (best this CPU has)."""
    if path in (None, "auto"):
        return -1
    if path not in PATHS:
        raise ValueError(f"kernel path {path!r}: expected one of {sorted(PATHS)} or 'auto'")
    return PATHS[path]


from homellm.engine.kernels.ggml_linear import (FusedProjection, GGMLLinear, matmul, matmul_packed,  # noqa: E402
                                                matmul_packed_multi, repack_q4)
from homellm.engine.kernels.fast_decode import FastDecoder  # noqa: E402
from homellm.engine.kernels.attention import CausalAttention, attention_causal  # noqa: E402

__all__ = ["available", "cpu_features", "status", "FusedProjection", "GGMLLinear", "matmul",
           "matmul_packed", "matmul_packed_multi", "repack_q4", "FastDecoder",
           "CausalAttention", "attention_causal"]
