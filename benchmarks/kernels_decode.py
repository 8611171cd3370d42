"""Speed of homellm's C kernels on the default model; prints one JSON object.

- decode: FastDecoder tokens/s, 128 tokens after a 512-token context (best of `--repeat` runs),
  with two-level ("hi", the default) and one-level int8 activations;
- matmul: us per call, GB/s of weight bytes and GFLOP/s for each of the model's shapes at M=1
  and M=512: our kernel on the GGUF blocks vs torch int4 (_weight_int4pack_mm_for_cpu, bf16
  activations, group 32) and float32 F.linear.

    python benchmarks/kernels_decode.py [--threads 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from homellm.catalog.pypi import cached_default_gguf
from homellm.engine import kernels
from homellm.engine.kernels import FastDecoder, matmul
from homellm.engine.kernels.ggml_linear import blocks_tensor
from homellm.model.formats.gguf import read_gguf


def best_us(fn, seconds: float = 0.3, min_calls: int = 3) -> float:
    fn()
    best, t_end, n = float("inf"), time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end or n < min_calls:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best * 1e6


def decode_tps(ckpt, hi: bool, threads: int, repeat: int, ctx: int = 512, n: int = 128) -> float:
    dec = FastDecoder.from_checkpoint(ckpt, max_seq_len=ctx + n, threads=threads, hi=hi)
    for p in range(ctx):  # fill the cache (and fault in the memory map)
        dec.decode(100 + p % 1000, p)
    out = torch.empty(ckpt.args.vocab_size)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in range(ctx, ctx + n):
            dec.decode(100 + p % 1000, p, out)
        best = max(best, n / (time.perf_counter() - t0))
    return round(best, 1)


def int4_operands(N: int, K: int):
    q = torch.randint(0, 16, (N, K), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(K // 32, N, 2, dtype=torch.bfloat16)
    return packed, sz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        print(json.dumps({"error": f"kernels unavailable: {kernels.status()}"}))
        return
    ckpt = read_gguf(cached_default_gguf())
    result = {"threads": a.threads, "cpu": kernels.cpu_features(),
              "decode_tps_hi": decode_tps(ckpt, True, a.threads, a.repeat),
              "decode_tps_int8": decode_tps(ckpt, False, a.threads, a.repeat), "matmul": []}
    shapes = {"q_proj/o_proj": "model.layers.0.self_attn.q_proj.weight",
              "k_proj/v_proj": "model.layers.0.self_attn.k_proj.weight",
              "gate_proj/up_proj": "model.layers.0.mlp.gate_proj.weight",
              "down_proj": "model.layers.0.mlp.down_proj.weight",
              "lm_head (Q8_0)": "model.embed_tokens.weight"}
    for label, name in shapes.items():
        t = ckpt.tensors[name]
        N, K = t.shape
        data = blocks_tensor(t)
        w32 = t.dequantize()
        packed, sz = int4_operands(N, K)
        for M in (1, 512):
            if M > 1 and "lm_head" in label:
                continue
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            flop = 2 * M * N * K
            row = {"shape": label, "N": N, "K": K, "M": M, "type": t.type_name}
            for key, fn in (
                    ("ours_int8", lambda: matmul(x, data, t.ggml_type, N, threads=a.threads)),
                    ("ours_hi", lambda: matmul(x, data, t.ggml_type, N, threads=a.threads, hi=True)),
                    ("torch_int4", lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz)),
                    ("f32_linear", lambda: F.linear(x, w32))):
                us = best_us(fn)
                wbytes = t.nbytes if key.startswith("ours") else (
                    packed.numel() + sz.numel() * 2 if key == "torch_int4" else w32.numel() * 4)
                row[key] = {"us": round(us, 1), "GB/s": round(wbytes / us / 1e3, 2),
                            "GFLOP/s": round(flop / us / 1e3, 1)}
            result["matmul"].append(row)
    # prefill estimate from the kernel alone: the seven matmuls of a layer at M=512, x30 layers
    per_layer = sum(r["ours_int8"]["us"] * (2 if r["shape"] in ("q_proj/o_proj", "k_proj/v_proj",
                                                                 "gate_proj/up_proj") else 1)
                    for r in result["matmul"] if r["M"] == 512)
    result["prefill_matmul_only_tps_int8"] = round(512 / (per_layer * ckpt.args.num_hidden_layers / 1e6), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
