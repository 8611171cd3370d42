"""Other quantizations of the default model, for benchmarks: F16 and Q8_0 with our exporter,
Q4_K_M with llama.cpp's own quantizer; prints one JSON object.

    python benchmarks/make_variants.py OUT_DIR [--check] [--tokens 256]

OUT_DIR (made if missing; never inside the repository) receives
  smollm2-135m.f16.gguf     homellm export --type f16 (the default Q4_1 model's weights as floats)
  smollm2-135m.q8_0.gguf    homellm export --type q8_0
  smollm2-135m.q4_k_m.gguf  llama_cpp.llama_model_quantize(f16, out, LLAMA_FTYPE_MOSTLY_Q4_K_M),
                            run in the peer venv ($HOMELLM_PEER_PYTHON, default
                            /root/peers/llamacpp/bin/python; llama-cpp-python 0.3.x)
Files already there are kept (delete them to remake). SmolLM2-135M's rows of 576 values are not
whole K-quant super-blocks (256), so llama.cpp gives those tensors Q5_0 / Q5_1 / Q8_0 instead
(its fallback for Q4_K / Q5_K / Q6_K); the 1536-wide ffn_down rows stay Q4_K / Q6_K.

--check: for each variant, whether `homellm.load` picks the C runtime, and its teacher-forced
top-1 agreement over --tokens tokens of README.md with the F16 model (native, float weights, no
activation quantization: what the quantization loses) and with the PyTorch float network on
the variant's own dequantized weights (what our kernels lose).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = os.environ.get("HOMELLM_PEER_PYTHON", "/root/peers/llamacpp/bin/python")
NAME = "smollm2-135m"

QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def export(model: str, out: Path, out_type: str) -> None:
    cmd = [sys.executable, "-m", "homellm", "export", "-m", model, str(out), "--type", out_type]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def quantize_q4_k_m(f16: Path, out: Path) -> None:
    if not Path(PEER).exists():
        raise SystemExit(f"error: llama.cpp's quantizer needs the peer venv {PEER} (HOMELLM_PEER_PYTHON)")
    tmp = out.with_suffix(".tmp")
    res = subprocess.run([PEER, "-c", QUANTIZE, str(f16), str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: llama_model_quantize failed ({res.returncode}): {res.stderr[-2000:]}")
    os.replace(tmp, out)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds."""
    import gguf
    reader = gguf.GGUFReader(path)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def agreement(path: Path, f16_logits, ids: list[int]) -> dict:
    """The variant as `homellm.load` runs it, against the F16 model (what the quantization
    loses) and against the float network on its own dequantized weights (what the kernels'
    activation rounding loses)."""
    import homellm
    import numpy as np
    import torch
    model = homellm.load(str(path))
    t0 = time.perf_counter()
    logits = np.asarray(model.logits(ids))
    sec = time.perf_counter() - t0
    own = np.asarray(homellm.load(str(path), dtype=torch.float32, quant="none").logits(ids))
    top1 = logits.argmax(-1)
    return {"runtime": model.runtime, "prefill_tok_s": round(len(ids) / sec, 1),
            "top1_vs_f16": round(float((top1 == f16_logits.argmax(-1)).mean()), 4),
            "top1_vs_own_float": round(float((top1 == own.argmax(-1)).mean()), 4),
            "max_abs_logit_diff_vs_own_float": round(float(np.abs(logits - own).max()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="runtime and top-1 agreement with F16")
    parser.add_argument("--tokens", type=int, default=256, help="positions compared by --check")
    opts = parser.parse_args()
    out_dir = opts.out_dir.resolve()
    if out_dir == REPO or REPO in out_dir.parents:
        raise SystemExit(f"error: {out_dir} is inside the repository; give a folder outside it")
    out_dir.mkdir(parents=True, exist_ok=True)
    from homellm.catalog.pypi import cached_default_gguf
    source = str(cached_default_gguf())
    files = {kind: out_dir / f"{NAME}.{kind}.gguf" for kind in ("f16", "q8_0", "q4_k_m")}
    report = {"source": source, "out_dir": str(out_dir), "variants": {}}
    for kind, path in files.items():
        t0 = time.perf_counter()
        made = not path.exists()
        if made:
            if kind == "q4_k_m":
                quantize_q4_k_m(files["f16"], path)
            else:
                export(source, path, kind)
        report["variants"][kind] = {"path": str(path), "bytes": path.stat().st_size, "made": made,
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "tensor_types": tensor_types(path)}
    if opts.check:
        import homellm
        import numpy as np
        ref = homellm.load(str(files["f16"]))
        ids = ref.tokenizer.encode((REPO / "README.md").read_text())[: opts.tokens]
        ref_logits = np.asarray(ref.logits(ids))
        report["check"] = {"tokens": len(ids), "reference": "f16"}
        for kind in ("q8_0", "q4_k_m"):
            report["variants"][kind].update(agreement(files[kind], ref_logits, ids))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
