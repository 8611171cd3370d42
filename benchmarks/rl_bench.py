"""RL speed and memory: `homellm tune grpo` against TRL's GRPOTrainer, and `homellm tune rm`
against TRL's RewardTrainer, each with LoRA (PEFT on TRL's side), side by side in one run.

GRPO: the same model (the default model, SmolLM2-135M-Instruct: ours reads the GGUF file and
trains on its float32 weights, rollouts on the C runtime; TRL reads the float32 Hugging Face
folder `homellm export` writes from that file: the same numbers), the same prompts, group size,
completion length, reward function, LoRA (rank, alpha, all seven projections), learning rate,
KL coefficient (beta, the reference = the adapters off on both sides), loss (dapo), threads
and dtype; one rollout and one optimizer step a step on both sides (TRL:
per_device_train_batch_size = prompts x group, steps_per_generation 1). Steps/s is over the
training loop's wall time (model loading excluded); memory is the process's peak RSS.

Reward model: the same pairs (chosen / rejected conversations), max length, batch, steps and
LoRA; pairs/s over the training loop, peak RSS.

Each side runs in its own clean process; TRL in a virtualenv outside the repository:

    python3 -m venv /root/peers/trl
    /root/peers/trl/bin/pip install torch==2.13.0 transformers peft trl datasets

    python benchmarks/rl_bench.py [--peer-python /root/peers/trl/bin/python] [--threads 2]
        [--steps 4] [--prompts-per-step 4] [--group 4] [--completion 32] [--rounds 1]
        [--only grpo|rm]

Prints one JSON object: both sides, the ratios ours / theirs, and whether the targets (GRPO
>= 2x steps/s at <= 0.7x memory; reward model >= 1.5x) are met.
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

START_ENV = dict(os.environ)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPICS = ("the sea", "a river", "the moon", "bread", "a city", "winter", "music", "a garden",
          "the wind", "a library", "mountains", "coffee", "a bridge", "rain", "stars", "a forest")
REWARD_FILE = '''
def reward(prompt, completion):
    """Pays for short answers that mention the color blue (verifiable, cheap)."""
    text = completion.lower()
    return float("blue" in text) + 1.0 / (1 + len(text.split()))
'''


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts() -> list[str]:
    return [f"Write one sentence about {t}." for t in TOPICS]


def make_pairs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = "blue green sky sea calm bright clear dark loud soft warm cold good bad".split()
    with open(path, "w") as f:
        for _ in range(n):
            t = rng.choice(TOPICS)
            body = " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))
            chosen = f"{t.capitalize()} is blue and {body}."
            rejected = f"{t.capitalize()} is {body}."
            q = {"role": "user", "content": f"Describe {t}."}
            f.write(json.dumps({"chosen": [q, {"role": "assistant", "content": chosen}],
                                "rejected": [q, {"role": "assistant", "content": rejected}]}) + "\n")


# -- the children ------------------------------------------------------------------------------

def child_ours_grpo(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from homellm.train import grpo
    from homellm.train.config import LoraConfig
    from homellm.train.rl_config import RLConfig
    config = RLConfig(method="grpo", model=a.model, prompts=a.data, out=a.out, reward_fn=f"{a.reward}:reward",
                      lora=LoraConfig(rank=a.rank, alpha=a.alpha), dtype="bfloat16" if a.bf16 else "float32",
                      lr=a.lr, steps=a.steps, prompts_per_step=a.prompts_per_step, group_size=a.group,
                      max_new_tokens=a.completion, kl_coef=a.beta, loss_type="dapo", micro_batch=a.micro,
                      threads=a.threads, device=a.device, seed=a.seed, save_every=0)
    result = grpo.train(config)
    return {"steps": result.steps, "train_s": result.seconds, "steps_per_s": result.steps / result.seconds,
            "completion_tokens": result.tokens, "rollout": result.rollout,
            "mean_reward_first": result.logs[0]["reward"], "mean_reward_last": result.logs[-1]["reward"],
            "peak_rss_mb": peak_rss_mb()}


def child_trl_grpo(a) -> dict:
    import importlib.util

    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    spec = importlib.util.spec_from_file_location("bench_reward", a.reward)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def reward(prompts, completions, **kwargs):
        return [module.reward(p[-1]["content"], c[-1]["content"]) for p, c in zip(prompts, completions)]

    rows = [json.loads(line) for line in open(a.data)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    n = a.prompts_per_step * a.group
    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                      steps_per_generation=1, num_generations=a.group, max_completion_length=a.completion,
                      max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                      beta=a.beta, loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0,
                      top_k=0, bf16=a.bf16, fp16=False, gradient_checkpointing=False, use_cpu=a.device == "cpu",
                      logging_steps=1, save_strategy="no", report_to="none", seed=a.seed,
                      dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tokenizer, peft_config=lora)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"steps": out.global_step, "train_s": seconds, "steps_per_s": out.global_step / seconds,
            "mean_reward_first": rewards[0] if rewards else None,
            "mean_reward_last": rewards[-1] if rewards else None, "peak_rss_mb": peak_rss_mb()}


def child_ours_rm(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from homellm.train import reward
    from homellm.train.config import LoraConfig, TuneConfig
    config = TuneConfig(method="rm", model=a.model, data=a.data, out=a.out, device=a.device,
                        lora=LoraConfig(rank=a.rank, alpha=a.alpha), lr=a.lr, warmup=0, max_steps=a.steps,
                        batch_size=a.batch, batch_tokens=a.batch * 2 * a.length, max_length=a.length,
                        threads=a.threads, seed=a.seed, dtype="bfloat16" if a.bf16 else "float32")
    result = reward.train(config)
    pairs = result.steps * a.batch  # (the data holds at least steps x batch pairs: no short step)
    return {"steps": result.steps, "train_s": result.seconds, "pairs_per_s": pairs / result.seconds,
            "tokens_per_s": result.tokens_per_s, "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "peak_rss_mb": peak_rss_mb()}


def child_trl_rm(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    rows = [json.loads(line) for line in open(a.data)]
    ds = Dataset.from_list(rows)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="SEQ_CLS")
    args = RewardConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                        max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                        max_length=a.length, bf16=a.bf16, fp16=False, gradient_checkpointing=False,
                        use_cpu=a.device == "cpu", logging_steps=1, save_strategy="no", report_to="none",
                        seed=a.seed, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
                        weight_decay=0.0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                            peft_config=lora)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": out.global_step, "train_s": seconds, "pairs_per_s": out.global_step * a.batch / seconds,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"ours-grpo": child_ours_grpo, "trl-grpo": child_trl_grpo, "ours-rm": child_ours_rm,
            "trl-rm": child_trl_rm}


def run_child(python: str, side: str, a, model: Path, data: Path, work: Path) -> dict:
    argv = [python, __file__, "--child", side, "--model", str(model), "--data", str(data),
            "--out", str(work / f"out-{side}-{time.time_ns()}"), "--reward", str(work / "reward.py")]
    for k in ("threads", "steps", "prompts_per_step", "group", "completion", "rank", "alpha", "lr",
              "beta", "seed", "device", "batch", "length", "micro"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.bf16:
        argv.append("--bf16")
    env = {**START_ENV, "OMP_NUM_THREADS": str(a.threads), "HOMELLM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HOMELLM_HOME": str(work / "home")}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--reward", help=argparse.SUPPRESS)
    p.add_argument("--peer-python", default=os.environ.get("HOMELLM_TRL_PYTHON", "/root/peers/trl/bin/python"))
    p.add_argument("--only", choices=["grpo", "rm"], default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="GRPO steps (rollout + update) / reward-model steps")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="completions a prompt")
    p.add_argument("--completion", type=int, default=32, help="tokens a completion at most")
    p.add_argument("--micro", type=int, default=4, help="ours: sequences a forward/backward")
    p.add_argument("--batch", type=int, default=8, help="reward model: pairs a step")
    p.add_argument("--length", type=int, default=128, help="reward model: max tokens a conversation")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04, help="GRPO's KL coefficient (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 matmuls on both sides")
    p.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; best of each")
    p.add_argument("--work", default=None, help="folder for the models, data and outputs (default: a temp dir)")
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return

    from homellm.catalog.export import export
    from homellm.catalog.pypi import cached_default_gguf
    work = Path(a.work or tempfile.mkdtemp(prefix="rl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    gguf = cached_default_gguf()
    hf = work / "smollm2-135m-f32"
    if not (hf / "config.json").exists():
        export(gguf, hf, "hf", "float32")
    (work / "reward.py").write_text(REWARD_FILE)
    with open(work / "prompts.jsonl", "w") as f:
        for text in prompts():
            f.write(json.dumps({"prompt": text}) + "\n")
    make_pairs(work / "pairs.jsonl", max(64, a.steps * a.batch), a.seed)
    out = {"model": "SmolLM2-135M-Instruct (ours: the Q4_1 GGUF, trained on its float32 weights; TRL: "
                    "the same weights as a float32 HF folder)", "device": a.device, "threads": a.threads,
           "bf16": a.bf16, "lora": {"rank": a.rank, "alpha": a.alpha, "targets": TARGETS},
           "load_avg_1m": os.getloadavg()[0]}
    sides = {"grpo": (("ours-grpo", gguf, "prompts.jsonl"), ("trl-grpo", hf, "prompts.jsonl")),
             "rm": (("ours-rm", hf, "pairs.jsonl"), ("trl-rm", hf, "pairs.jsonl"))}
    for kind in ([a.only] if a.only else ["grpo", "rm"]):
        (ours_side, ours_model, data), (trl_side, trl_model, _) = sides[kind]
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours.append(run_child(sys.executable, ours_side, a, ours_model, work / data, work))
            theirs.append(run_child(a.peer_python, trl_side, a, trl_model, work / data, work))
        key = "steps_per_s" if kind == "grpo" else "pairs_per_s"
        best_ours, best_theirs = max(ours, key=lambda r: r[key]), max(theirs, key=lambda r: r[key])
        ratios = {key: best_ours[key] / best_theirs[key],
                  "peak_rss": best_ours["peak_rss_mb"] / best_theirs["peak_rss_mb"]}
        if kind == "grpo":
            settings = {"steps": a.steps, "prompts_per_step": a.prompts_per_step, "group": a.group,
                        "completion_tokens": a.completion, "beta": a.beta, "loss": "dapo", "lr": a.lr}
            targets = {"steps_per_s >= 2x": ratios[key] >= 2, "peak_rss <= 0.7x": ratios["peak_rss"] <= 0.7}
        else:
            settings = {"steps": a.steps, "pairs_per_step": a.batch, "max_length": a.length, "lr": a.lr}
            targets = {"pairs_per_s >= 1.5x": ratios[key] >= 1.5}
        out[kind] = {"settings": settings, "homellm": best_ours, "trl": best_theirs, "ratios": ratios,
                     "targets": targets, "rounds": {"homellm": ours, "trl": theirs}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
