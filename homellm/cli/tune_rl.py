"""`homellm tune ppo|grpo`: reinforcement learning of a LoRA policy against a reward.

    homellm tune ppo -m NAME --reward RM --prompts prompts.jsonl [--val-prompts held-out.jsonl]
    homellm tune grpo -m NAME --prompts prompts.jsonl --reward-fn check.py:reward

The flags are RLConfig's fields (homellm/train/rl_config.py). Each step prints a progress bar
with the mean reward, KL to the reference and tokens/s; every step's whole log (entropy, clip
fraction, value loss, ...) goes to OUT/metrics.jsonl. Ctrl-C keeps a checkpoint: the same
command with --resume continues exactly.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub):
    for method, text in (("ppo", "PPO against a reward model (InstructGPT / StableVicuna recipe: "
                                 "value head, GAE, clipped objective, KL penalty to the base)"),
                         ("grpo", "GRPO: group-relative advantages, no value head; a reward model or "
                                  "a Python reward function (verifiable rewards)")):
        _arguments(sub.add_parser(method, help=text.split(" (")[0].split(":")[0], description=text), method)


def _arguments(p: argparse.ArgumentParser, method: str):
    from homellm.train.config import TARGETS, LoraConfig
    from homellm.train.rl_config import METHOD_DEFAULTS, RLConfig
    c, lo = RLConfig(method=method, reward_fn="x:y"), LoraConfig()
    group, epochs, kl = METHOD_DEFAULTS[method]
    p.add_argument("-m", "--model", default=None,
                   help="the policy: catalog name, .gguf file or Hugging Face folder (default: the default model)")
    p.add_argument("--prompts", required=True,
                   help="prompts JSONL ({\"prompt\": ...}, {\"messages\": [...]}, DPO pairs) or a .txt, one a line")
    p.add_argument("--val-prompts", default=None,
                   help="held-out prompts: mean reward and KL of the base and of the policy as it trains")
    r = p.add_mutually_exclusive_group(required=True)
    r.add_argument("--reward", default=None, metavar="RM",
                   help="a reward model (homellm tune rm): a folder or a name under $HOMELLM_HOME/rewards")
    r.add_argument("--reward-fn", default=None, metavar="FILE.py:FUNCTION",
                   help="a Python function f(prompt, completion) -> float (it may also take extra=, "
                        "the prompt line's other fields)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: $HOMELLM_HOME/adapters/{method}-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=lo.rank, help=f"adapter rank (default {lo.rank})")
    g.add_argument("--alpha", type=float, default=lo.alpha, help=f"scale alpha / rank (default alpha {lo.alpha:g})")
    g.add_argument("--targets", default=",".join(lo.targets),
                   help=f"projections to adapt, comma-separated from {','.join(TARGETS)} (default all)")
    g.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="frozen base weights for training: none (float), int8 or int4")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="a float base's training weights (default auto, as `tune sft`)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=int, default=c.steps, help=f"rollouts (default {c.steps})")
    g.add_argument("--prompts-per-step", type=int, default=c.prompts_per_step,
                   help=f"prompts a rollout (default {c.prompts_per_step})")
    g.add_argument("--group-size", type=int, default=group,
                   help=f"completions a prompt (default {group})")
    g.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens,
                   help=f"tokens a completion at most (default {c.max_new_tokens})")
    g.add_argument("--max-prompt-length", type=int, default=c.max_prompt_length,
                   help=f"longer prompts are skipped (default {c.max_prompt_length})")
    g.add_argument("--temperature", type=float, default=c.temperature, help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=c.top_k, help="0: no cut (default 0)")
    g.add_argument("--top-p", type=float, default=c.top_p, help="1: no cut (default 1)")
    g.add_argument("--rollout", choices=["auto", "native", "engine", "policy"], default=c.rollout,
                   help="what generates: the C runtime on a GGUF with the training adapters shared "
                        "(native), the engine's PyTorch network of it (engine), or the training "
                        "network (policy); default auto: the first that applies")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=c.lr, help=f"AdamW learning rate (default {c.lr:g})")
    g.add_argument("--warmup", type=int, default=0, help="optimizer steps of linear warmup (default 0)")
    g.add_argument("--epochs", type=int, default=epochs, help=f"passes over each rollout (default {epochs})")
    g.add_argument("--micro-batch", type=int, default=c.micro_batch,
                   help=f"sequences a forward/backward (default {c.micro_batch})")
    g.add_argument("--cliprange", type=float, default=c.cliprange, help="ratio clip epsilon (default 0.2)")
    g.add_argument("--kl-coef", type=float, default=kl,
                   help=f"KL penalty to the reference (default {kl:g})")
    g.add_argument("--target-kl", type=float, default=None,
                   help="nats a completion: adapt the KL coefficient toward it (default: fixed)")
    g.add_argument("--kl-horizon", type=int, default=c.kl_horizon,
                   help=f"the adaptive coefficient's horizon (default {c.kl_horizon})")
    if method == "ppo":
        g.add_argument("--minibatches", type=int, default=c.minibatches,
                       help="optimizer steps a pass (default 1)")
        g.add_argument("--vf-coef", type=float, default=c.vf_coef, help=f"value loss weight (default {c.vf_coef:g})")
        g.add_argument("--cliprange-value", type=float, default=c.cliprange_value,
                       help="value clip (default 0.2)")
        g.add_argument("--gamma", type=float, default=c.gamma, help="discount (default 1)")
        g.add_argument("--lam", type=float, default=c.lam, help="GAE lambda (default 0.95)")
        g.add_argument("--reward-norm", choices=["running", "batch", "none"], default=c.reward_norm,
                       help="reward whitening (default running moments)")
    else:
        g.add_argument("--no-scale-rewards", action="store_true",
                       help="advantages r - mean of the group, not divided by its std")
        g.add_argument("--loss-type", choices=["dapo", "grpo"], default=c.loss_type,
                       help="dapo: mean over every token (default); grpo: per completion")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--val-every", type=int, default=0, help="steps between held-out evaluations (0: start and end)")
    g.add_argument("--save-every", type=int, default=c.save_every, help="steps between checkpoints (default 1)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def config_from_args(args):
    from homellm.catalog.library import home
    from homellm.cli.tune import auto_dtype
    from homellm.train.config import LoraConfig
    from homellm.train.rl_config import RLConfig
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device, args.quant)
    out = args.out or str(home() / "adapters" / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    lora = LoraConfig(rank=args.rank, alpha=args.alpha,
                      targets=[t.strip() for t in args.targets.split(",") if t.strip()])
    extra = {}
    if args.method == "ppo":
        extra = dict(minibatches=args.minibatches, vf_coef=args.vf_coef, cliprange_value=args.cliprange_value,
                     gamma=args.gamma, lam=args.lam, reward_norm=args.reward_norm)
    else:
        extra = dict(scale_rewards=not args.no_scale_rewards, loss_type=args.loss_type)
    return RLConfig(method=args.method, model=args.model, prompts=args.prompts, val_prompts=args.val_prompts,
                    out=out, reward=args.reward, reward_fn=args.reward_fn, lora=lora, quant=args.quant,
                    dtype=dtype, lr=args.lr, warmup=args.warmup, steps=args.steps,
                    prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    micro_batch=args.micro_batch, epochs=args.epochs, cliprange=args.cliprange,
                    kl_coef=args.kl_coef, target_kl=args.target_kl, kl_horizon=args.kl_horizon,
                    seed=args.seed, val_every=args.val_every, save_every=args.save_every,
                    threads=args.threads, device=device, rollout=args.rollout, **extra)


def _val_line(v: dict) -> str:
    return f"reward {v['reward']:.4f}, KL {v['kl']:.3f} nats, length {v['length']:.1f} tokens"


def main(args) -> int:
    from tqdm import tqdm

    from homellm.cli.options import run_training
    from homellm.train import grpo, ppo
    config = config_from_args(args)
    bar = None

    def progress(event: dict):
        nonlocal bar
        if event.get("val_only"):
            who = "base (adapters off)" if event["step"] == 0 else f"step {event['step']}"
            text = f"held-out {who}: {_val_line(event['val'])}"
            (bar.write if bar is not None else lambda t: print(t, file=sys.stderr))(text)
            return
        if bar is None:
            bar = tqdm(total=event["total"], desc=config.method, unit="step", file=sys.stderr,
                       initial=event["step"] - 1)
        bar.update(1)
        bar.set_postfix({"reward": f"{event['reward']:.3f}", "kl": f"{event['kl']:.3f}",
                         "tok/s": f"{event['rollout_tokens_per_s']:.0f}"}, refresh=False)
        if event["val"]:
            bar.write(f"held-out step {event['step']}: {_val_line(event['val'])}")

    train = ppo.train if config.method == "ppo" else grpo.train
    result = run_training(train, config, bar, progress=progress, resume=args.resume)
    if result.skipped:
        print(f"warning: skipped {len(result.skipped)} prompts:", file=sys.stderr)
        for line in result.skipped[:10]:
            print(f"  {line}", file=sys.stderr)
    logs = result.logs
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    reward = f", mean reward {first['reward']:.4f} -> {last['reward']:.4f}, KL {last['kl']:.3f}" if logs else ""
    where = {"native": "the C runtime", "engine": "the engine's PyTorch network",
             "policy": "the training network"}.get(result.rollout, result.rollout)
    print(f"{config.method}: {result.steps} steps, {result.tokens} completion tokens in "
          f"{result.seconds:.1f} s ({result.tokens_per_s:.0f} tok/s; rollouts on {where}){reward}",
          file=sys.stderr)
    if result.base_val and result.val:
        print(f"held-out: base {_val_line(result.base_val)}; tuned {_val_line(result.val[-1])}",
              file=sys.stderr)
    print(f"adapter: {Path(config.out)}  (log: {Path(config.out) / 'metrics.jsonl'}; use: homellm run -m "
          f"{config.model or 'smollm2'} --adapter {config.out}, or homellm merge)", file=sys.stderr)
    return 0
