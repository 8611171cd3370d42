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
    python benchmarks/kernels_decode.py --types          # every block type on one big matrix
    python benchmarks/kernels_decode.py --gguf A.gguf B.gguf   # decode of whole files (C runtime)
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


TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def type_table(threads: int, N: int = 8192, K: int = 4096) -> list[dict]:
    """us per call and GB/s of weight bytes for each block type on one (N, K) matrix (32 MB of
    F32: beyond the caches, so M=1 shows whether the kernel keeps up with memory), M = 1 (the
    decode matvec) and M = 64 (prefill tile), hi and one-level activations; random blocks with
    finite scales (the kernels' speed does not depend on the values)."""
    import gguf
    import numpy as np
    rng = np.random.default_rng(0)
    rows = []
    for name in TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        qk, bs = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(N, K // qk, bs), dtype=np.uint8)
        half_at = {"Q6_K": (208,)}.get(name, (0, 2) if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else (0,))
        for off in half_at:
            raw[:, :, off:off + 2] = (rng.random((N, K // qk, 1)) * 1e-3).astype(np.float16).view(np.uint8)
        data = torch.from_numpy(raw.reshape(N, -1))
        row = {"type": name, "N": N, "K": K, "MB": round(data.numel() / 1e6, 2)}
        for M in (1, 64):
            x = torch.randn(M, K)
            for hi in (True, False):
                us = best_us(lambda: matmul(x, data, int(qtype), N, threads=threads, hi=hi), seconds=0.5)
                row[f"M={M}{'' if hi else ' int8'}"] = {"us": round(us, 1), "GB/s": round(data.numel() / us / 1e3, 2),
                                                        "GFLOP/s": round(2 * M * N * K / us / 1e3, 1)}
        rows.append(row)
    return rows


def gguf_decode_tps(path: str, threads: int, repeat: int, ctx: int = 256, n: int = 64) -> dict:
    """NativeModel (the C runtime load() picks) on any GGUF file: decode tokens/s after ctx
    tokens and the GB/s of weights that reads (every matrix once per token)."""
    from homellm.api import weight_bytes_per_token
    from homellm.engine.kernels.native import NativeModel
    from homellm.model.formats import open_checkpoint
    ckpt = open_checkpoint(path, as_numpy=True)
    model = NativeModel(ckpt.args, ckpt.tensors, ctx + n, threads=threads)
    model.forward([100 + p % 1000 for p in range(ctx)], 0)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in range(ctx, ctx + n):
            model.decode(100 + p % 1000, p)
        best = max(best, n / (time.perf_counter() - t0))
    wbytes = weight_bytes_per_token(ckpt)
    return {"path": path, "decode_tps": round(best, 1), "weight_MB_per_token": round(wbytes / 1e6, 1),
            "GB/s": round(best * wbytes / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", action="store_true",
                    help="only the per-type table (every block type the kernels take, M=1 and 64)")
    ap.add_argument("--gguf", nargs="*", default=[],
                    help="only decode tokens/s and GB/s of these GGUF files on the C runtime")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        print(json.dumps({"error": f"kernels unavailable: {kernels.status()}"}))
        return
    if a.types or a.gguf:
        out = {"threads": a.threads, "cpu": kernels.cpu_features().get("path")}
        if a.gguf:
            out["files"] = [gguf_decode_tps(p, a.threads, a.repeat) for p in a.gguf]
        if a.types:
            out["types"] = type_table(a.threads)
        print(json.dumps(out, indent=1))
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
