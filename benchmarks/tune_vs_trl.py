"""LoRA SFT speed and memory: `homellm tune sft` against Hugging Face PEFT + TRL's SFTTrainer.

Same model (the default model, SmolLM2-135M-Instruct, as a float32 Hugging Face folder: what
`homellm export -m smollm2:135m DIR --type float32` writes), same data (single-turn chats of
exactly --length tokens each after the chat template, loss on the reply only), same LoRA
settings (rank, alpha, dropout, all seven projections), same optimizer and schedule (AdamW,
warmup + cosine), same batch (--batch rows a step, no packing), float32 on both sides, same
threads, one epoch. Each side runs in its own process; tokens/s counts every token of every
example (prompt and reply) over the training loop's wall time, and peak memory is the
process's peak RSS (model load included).

The peer lives in a virtualenv outside the repository:

    python3 -m venv /root/peers/trl
    /root/peers/trl/bin/pip install torch==2.13.0 transformers peft trl

    python benchmarks/tune_vs_trl.py [--peer-python /root/peers/trl/bin/python] [--threads 2]

TRL's SFTConfig defaults to gradient checkpointing and bf16 autocast; both are set the same
on the two sides here: --grad-checkpointing for both, and float32 unless --bf16 (TRL: bf16
autocast over float32 weights; ours: a bfloat16 frozen base, LoRA and norms in float32). Prints one JSON object
with both sides and the ratios ours / theirs. `--device cuda` runs the same on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_ENV = dict(os.environ)  # what both sides get, before any import could change it

WORDS = ("the a of to and in is it you that he was for on are with as his they at be this have "
         "from or one had by word but not what all were we when your can said there use an each "
         "which she do how their if will up other about out many then them these so some her would "
         "make like him into time has look two more write go see number no way could people my "
         "than first water been call who oil its now find long down day did get come made may part").split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: Path, hf_dir: Path, n: int, length: int, seed: int) -> None:
    """n prompt/response pairs whose chat rendering is exactly `length` tokens."""
    from homellm.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_hf_folder(hf_dir)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = "Tell me something about " + " ".join(rng.choice(WORDS) for _ in range(6)) + "."
            words = []

            def size(ws):
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": " ".join(ws)}]
                return len(tokenizer.encode_chat(messages)[0])
            while size(words) < length:
                words.append(rng.choice(WORDS))
            while size(words) > length:  # a word that merged: swap the last one until it fits
                words[-1] = rng.choice(WORDS)
                if size(words) > length:
                    words.pop()
            assert size(words) == length or size(words) == length - 1
            f.write(json.dumps({"prompt": prompt, "response": " ".join(words)}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_ours(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from homellm.train import sft
    from homellm.train.config import LoraConfig, TuneConfig
    config = TuneConfig(model=a.model, data=a.data, out=a.out, device=a.device,
                        lora=LoraConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout),
                        lr=a.lr, warmup_steps=a.warmup, epochs=1, batch_tokens=a.batch * a.length,
                        max_length=a.length, grad_checkpointing=a.grad_checkpointing, seed=a.seed,
                        threads=a.threads, dtype="bfloat16" if a.bf16 else "float32")
    result = sft.train(config)
    return {"tokens": result.tokens, "steps": result.steps, "train_s": result.seconds,
            "tokens_per_s": result.tokens_per_s, "first_loss": result.losses[0],
            "last_loss": result.losses[-1], "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None}


def child_trl(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    rows = [json.loads(line) for line in open(a.data)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                     num_train_epochs=1, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=a.bf16, fp16=False,
                     gradient_checkpointing=a.grad_checkpointing, max_length=a.length, seed=a.seed,
                     dataloader_num_workers=0, use_cpu=a.device == "cpu", completion_only_loss=True,
                     max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "steps": out.global_step, "train_s": seconds, "tokens_per_s": tokens / seconds,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None}


def run_child(python: str, side: str, a, model: Path, data: Path, work: Path) -> dict:
    argv = [python, __file__, "--child", side, "--model", str(model), "--data", str(data),
            "--out", str(work / f"out-{side}"), "--threads", str(a.threads), "--batch", str(a.batch),
            "--length", str(a.length), "--rank", str(a.rank), "--alpha", str(a.alpha),
            "--dropout", str(a.dropout), "--lr", str(a.lr), "--warmup", str(a.warmup),
            "--seed", str(a.seed), "--device", a.device]
    if a.grad_checkpointing:
        argv.append("--grad-checkpointing")
    if a.bf16:
        argv.append("--bf16")
    env = {**START_ENV, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--peer-python", default=os.environ.get("HOMELLM_TRL_PYTHON", "/root/peers/trl/bin/python"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--length", type=int, default=128, help="tokens per example")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 matmuls: TRL's default autocast, our bfloat16 frozen base")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/theirs this many times; best of each")
    p.add_argument("--work", default=None, help="folder for the model, data and outputs (default: a temp dir)")
    a = p.parse_args()
    if a.child:
        result = child_ours(a) if a.child == "ours" else child_trl(a)
        print(json.dumps(result))
        return

    from homellm.catalog.export import export
    from homellm.catalog.pypi import cached_default_gguf
    work = Path(a.work or tempfile.mkdtemp(prefix="tune-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2-135m-f32"
    if not (model / "config.json").exists():
        export(cached_default_gguf(), model, "hf", "float32")
    data = work / f"data-{a.examples}x{a.length}.jsonl"
    if not data.exists():
        make_data(data, model, a.examples, a.length, a.seed)
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(run_child(sys.executable, "ours", a, model, data, work))
        theirs.append(run_child(a.peer_python, "trl", a, model, data, work))
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_theirs = max(theirs, key=lambda r: r["tokens_per_s"])
    ratios = {"tokens_per_s": best_ours["tokens_per_s"] / best_theirs["tokens_per_s"],
              "peak_rss": best_ours["peak_rss_mb"] / best_theirs["peak_rss_mb"]}
    if a.device == "cuda":
        ratios["peak_gpu"] = best_ours["peak_gpu_mb"] / best_theirs["peak_gpu_mb"]
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct float32", "device": a.device, "threads": a.threads,
        "examples": a.examples, "tokens_per_example": a.length, "batch_rows": a.batch,
        "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "targets": TARGETS},
        "grad_checkpointing": a.grad_checkpointing, "bf16": a.bf16, "load_avg_1m": os.getloadavg()[0],
        "omp_wait_policy": START_ENV.get("OMP_WAIT_POLICY", "default"),
        "homellm": best_ours, "trl": best_theirs, "ratios": ratios,
        "targets": {"tokens_per_s >= 1.5x": ratios["tokens_per_s"] >= 1.5,
                    "peak_rss <= 0.7x": ratios["peak_rss"] <= 0.7},
        "rounds": {"homellm": ours, "trl": theirs}}, indent=2))


if __name__ == "__main__":
    main()
