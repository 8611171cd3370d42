"""`homellm merge -m BASE --adapter PATH --name NAME`: fold a LoRA adapter into a full model."""
from __future__ import annotations

import argparse
import sys

HELP = "merge a LoRA adapter into its base: a new catalog model (HF folder), optionally GGUF"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None,
                   help="the base model the adapter was trained on (default: the default model)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--name", required=True, help="catalog name of the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights of the catalog's Hugging Face folder (default float32)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="also write the merged model as GGUF (for llama.cpp and Ollama)")
    p.add_argument("--gguf-type", default="q8_0",
                   help="GGUF weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (default q8_0)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name / the GGUF file")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from homellm.train.merge import merge
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc="writing", unit="tensor", file=sys.stderr, leave=False,
                       disable=None)
        bar.n = done
        bar.refresh()

    entry, gguf, seconds = merge(args.model, args.adapter, args.name, gguf=args.gguf,
                                 gguf_type=args.gguf_type, dtype=args.dtype, force=args.force,
                                 progress=progress)
    if bar is not None:
        bar.close()
    mb = entry.size / 1e6
    print(f"merged into {entry.name} ({entry.folder}, {mb:.0f} MB) in {seconds:.1f} s "
          f"({mb / max(seconds, 1e-9):.0f} MB/s)", file=sys.stderr)
    if gguf is not None:
        print(f"GGUF: {gguf}", file=sys.stderr)
    print(f"run it: homellm run -m {entry.name}", file=sys.stderr)
    return 0
