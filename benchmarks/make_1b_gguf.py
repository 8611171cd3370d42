"""Write a 1B-parameter LLaMA with random weights as a GGUF file, with homellm's own exporter.

Issue 3's second benchmark model: at this size the weights, not the runtime, dominate time
and memory. The shape is TinyLlama-1.1B's (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP
5632) with the default model's tokenizer (vocabulary 49152, tied embeddings): 1.07e9 params.
Weights ~ N(0, 0.02), norms 1. llama.cpp loads the file too (benchmarks/bench_vs_llamacpp.py).

usage: python benchmarks/make_1b_gguf.py OUT.gguf [--type q4_0] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from homellm.catalog.pypi import cached_default_gguf
from homellm.model.config import ModelArgs
from homellm.model.formats.gguf import expected_shapes, read_gguf, write_gguf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--type", default="q4_0", help="out type (q4_0, q4_1, q8_0, f16, ...)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    base = read_gguf(cached_default_gguf(), as_numpy=True)
    model = ModelArgs(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=base.args.vocab_size, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    tensors = {}
    for name, shape in expected_shapes(model).items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    n = sum(t.size for t in tensors.values())
    print(f"{n / 1e9:.2f}e9 parameters drawn in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    write_gguf(args.out, model, tensors, out_type=args.type, tokenizer_fields=base.tokenizer.gguf_fields,
               chat_template=base.chat_template, metadata={"name": "random-1b"})
    print(f"wrote {args.out} ({args.type}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
