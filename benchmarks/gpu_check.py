"""The GPU checks of issues 2 and 3 in one short run; prints one JSON object.

For a session that is lent a CUDA machine (CI never runs this). Nothing is downloaded: the
models are random, written here by homellm's own exporter in the shapes that matter (the
default model's, SmolLM2-135M, as Q4_1; the 1B config of benchmarks/make_1b_gguf.py as Q4_0),
with a byte-level vocabulary padded to 49152 tokens. For each model:
- `homellm.load(path)` with no device must choose the GPU by itself;
- teacher-forced logits over --tokens positions against the float32 model on the CPU (every
  weight dequantized): top-1 agreement and the largest difference;
- greedy decoding on the GPU against the CPU's C runtime on the same file: the tokens equal;
- decode tokens/s, and the fraction of the memory-bandwidth limit they reach: the bytes of
  weights a step reads on the GPU (its own tensors' sizes) x tokens/s / the bandwidth measured
  here (a read of a large tensor) and the H200's nominal 4.8 TB/s;
then a few LoRA SFT steps on the GPU (the default shape, ChatML-rendered pairs): it trains
(the loss falls) and its tokens/s.

The `gguf` package is the one thing the device image lacks: carry its wheel
(pip download --no-deps gguf==VERSION -d .whl; see /work/.library/device/README.md) and run
    PYTHONPATH=. python3 benchmarks/gpu_check.py [--device cuda] [--tokens 256] [--skip-1b]
`--small` makes tiny models instead (a dry run of the script itself, on any machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gguf_fixtures import byte_tokenizer_fields, tiny_llama_state  # noqa: E402

import homellm  # noqa: E402
from homellm.engine.loader import build_model  # noqa: E402
from homellm.engine.sampling import SamplingParams  # noqa: E402
from homellm.model.config import ModelArgs  # noqa: E402
from homellm.model.formats.gguf import expected_shapes, read_gguf, write_gguf  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOL = ModelArgs(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                 max_position_embeddings=8192, tie_word_embeddings=True)
ONE_B = ModelArgs(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=True)
TINY = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=1024, tie_word_embeddings=True)
H200_TBPS = 4.8


def random_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 0.02), norms 1 (as make_1b_gguf.py); float32, made in numpy (fast)."""
    rng = np.random.default_rng(seed)
    return {name: torch.ones(shape) if len(shape) == 1 else
            torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
            for name, shape in expected_shapes(args).items()}


def make_model(folder: Path, name: str, args: ModelArgs, out_type: str, small: bool) -> Path:
    state = tiny_llama_state(args) if small else random_state(args, seed=len(name))
    return write_gguf(folder / f"{name}.gguf", args, state, out_type=out_type,
                      tokenizer_fields=byte_tokenizer_fields(args.vocab_size), chat_template=CHATML,
                      metadata={"name": name})


def read_bandwidth_tbps(device: str) -> float:
    """Bytes read per second by a reduction over a 4 GiB (CPU: 256 MiB) tensor, best of 5."""
    n = (4 << 30 if device.startswith("cuda") else 256 << 20) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best / 1e12


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_weight_bytes(model) -> int:
    """What a decode step reads on the device: every parameter and buffer of the network once
    (the shapes here tie the embedding table to the head, which reads it whole each step)."""
    net = model.engine.model
    seen, total = set(), 0
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.data_ptr() in seen or "inv_freq" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def check_model(path: Path, args: ModelArgs, device: str, tokens: int, gen: int) -> dict:
    out: dict = {"model": path.name, "params": sum(int(np.prod(s)) for s in expected_shapes(args).values())}
    t0 = time.perf_counter()
    model = homellm.load(path, device=None if device == "auto" else device, ctx=tokens + gen + 8)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["device"] = str(model.device)
    out["runtime"] = model.runtime
    ids = np.random.default_rng(0).integers(3, args.vocab_size, tokens).tolist()
    with torch.inference_mode():
        ours = torch.as_tensor(model.logits(ids)).float().cpu()
        ckpt = read_gguf(path)
        ref = build_model(ckpt, "cpu", dtype=torch.float32, quant="none")(torch.tensor([ids]))[0].float()
    out["top1_vs_cpu_float"] = round(float((ours.argmax(-1) == ref.argmax(-1)).float().mean()), 4)
    out["max_abs_diff"] = round(float((ours - ref).abs().max()), 4)
    out["logit_scale"] = round(float(ref.abs().max()), 3)
    greedy = SamplingParams(temperature=0)
    prompt = ids[:32]
    steps = list(model.engine.generate(prompt, greedy, max_tokens=gen))
    got = [s.token for s in steps if s.token is not None]
    cpu = homellm.load(path, device="cpu", ctx=tokens + gen + 8)
    want = [s.token for s in cpu.engine.generate(prompt, greedy, max_tokens=gen) if s.token is not None]
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    out["greedy_tokens_equal_to_cpu"] = first_diff is None and len(got) == len(want)
    out["greedy_first_difference"] = first_diff
    best = None
    for _ in range(2):
        model.engine.reset()
        t = list(model.engine.generate(ids[:128], greedy, max_tokens=gen))[-1].timings
        best = t if best is None or t.decode_tps > best.decode_tps else best
    out["prefill_tps"] = round(best.prefill_tps, 1)
    out["decode_tps"] = round(best.decode_tps, 1)
    wb = gpu_weight_bytes(model) if model.runtime == "torch" else model.weight_bytes_per_token
    out["weight_bytes_per_token"] = wb
    out["weight_tbps"] = round(wb * best.decode_tps / 1e12, 4)
    return out


def check_tune(path: Path, device: str, steps: int) -> dict:
    from homellm.train import sft
    from homellm.train.config import TuneConfig
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.jsonl"
        with open(data, "w") as f:
            for i in range(64):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Count to {i % 9 + 1}."},
                                                 {"role": "assistant", "content": " ".join(
                                                     str(k) for k in range(1, i % 9 + 2))}]}) + "\n")
        cfg = TuneConfig(method="sft", model=str(path), data=str(data), out=str(Path(tmp) / "out"),
                         device=device, max_steps=steps, batch_tokens=2048, warmup_steps=2, lr=1e-3,
                         dtype="bfloat16" if device.startswith("cuda") else "float32")
        t0 = time.perf_counter()
        result = sft.train(cfg)
        wall = time.perf_counter() - t0
    losses = [float(x) for x in getattr(result, "losses", [])]
    return {"steps": len(losses), "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(losses[-1], 4) if losses else None, "wall_s": round(wall, 1),
            "loss_fell": bool(losses) and losses[-1] < losses[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (what load() chooses), cuda or cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--tune-steps", type=int, default=8)
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny models: a dry run of this script")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = ("cuda" if cuda else "cpu") if a.device == "auto" else a.device
    result: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None}
    result["read_tbps_measured"] = round(read_bandwidth_tbps(dev), 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plan = [("smollm2-shape.q4_1", TINY if a.small else SMOL, "q4_1")]
        if not a.skip_1b:
            plan.append(("random-1b.q4_0", TINY if a.small else ONE_B, "q4_0"))
        result["models"] = []
        for name, args, out_type in plan:
            t0 = time.perf_counter()
            path = make_model(folder, name, args, out_type, a.small)
            row = {"write_s": round(time.perf_counter() - t0, 1)}
            row.update(check_model(path, args, a.device, a.tokens, a.gen))
            for what, tbps in (("measured", result["read_tbps_measured"]), ("h200_nominal", H200_TBPS)):
                row[f"bandwidth_fraction_{what}"] = round(row["weight_tbps"] / tbps, 3)
            result["models"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        result["tune"] = check_tune(folder / f"{plan[0][0]}.gguf", dev, a.tune_steps)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
