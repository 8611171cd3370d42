"""`homellm export -m NAME OUT`: write a model as GGUF (llama.cpp, Ollama) or a HF folder."""
from __future__ import annotations

import argparse
import sys
import time

HELP = "export a model to GGUF or a Hugging Face folder"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("out", help="output: a .gguf file, or a folder for --format hf")
    p.add_argument("-m", "--model", default=None, help="catalog name or path (default: the default model)")
    p.add_argument("--format", choices=["gguf", "hf"], default=None,
                   help="default: gguf when OUT ends in .gguf, else hf")
    p.add_argument("--type", dest="out_type", default=None,
                   help="GGUF: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (default f16); "
                        "HF: bfloat16, float16, float32 (default bfloat16)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from homellm.catalog.export import export
    from homellm.errors import HomellmError
    fmt = args.format or ("gguf" if args.out.endswith(".gguf") else "hf")
    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise HomellmError(f"{out} already exists; choose another path or remove it")
    bar = tqdm(desc="exporting", unit="tensor", file=sys.stderr, leave=False, disable=None)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    path = export(args.model, out, fmt, args.out_type, progress)
    bar.close()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB in {seconds:.1f} s, {size / 1e6 / seconds:.1f} MB/s)",
          file=sys.stderr)
    return 0
