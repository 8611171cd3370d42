"""`homellm tune sft|dpo|rm|ppo|grpo -m NAME ...`: LoRA fine-tuning, the adapter in PEFT's layout.

    homellm tune sft -m NAME --data chats.jsonl
    homellm tune dpo -m NAME --data pairs.jsonl
    homellm tune rm -m NAME --data pairs.jsonl --val held-out.jsonl      # a reward model
    homellm tune ppo -m NAME --reward RM --prompts prompts.jsonl          # cli/tune_rl.py
    homellm tune grpo -m NAME --prompts prompts.jsonl --reward-fn check.py:reward

Under torchrun (`torchrun --nproc_per_node N -m homellm tune sft|dpo|rm ...`) the processes
train one model with DDP; only the first one prints and writes files.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = ("fine-tune a model with LoRA: supervised (sft), from preference pairs (dpo), a reward "
        "model (rm), or by reinforcement learning (ppo, grpo)")


def _common(p: argparse.ArgumentParser, method: str):
    from homellm.train.config import TARGETS, LoraConfig, TuneConfig
    c, lo = TuneConfig(), LoraConfig()
    p.add_argument("-m", "--model", default=None,
                   help="base model: catalog name, .gguf file or Hugging Face folder (default: the default model)")
    what = {"sft": "SFT JSONL: OpenAI messages, ShareGPT, prompt/response or Open Assistant trees",
            "dpo": "DPO pairs JSONL (prompt/chosen/rejected) or Open Assistant trees",
            "rm": "preference pairs JSONL: DPO pairs, chosen/rejected conversations, Anthropic HH, "
                  "Stanford SHP, arena battles or Open Assistant trees (homellm.data.pairs)"}[method]
    p.add_argument("--data", required=True, help=what)
    p.add_argument("--val", default=None, help="validation file, same formats as --data")
    p.add_argument("--out", default=None,
                   help="output folder for the adapter, config and checkpoint (default: "
                        + ("$HOMELLM_HOME/rewards/rm-<time>, which `homellm score -m` finds by name)"
                           if method == "rm" else "$HOMELLM_HOME/adapters/<method>-<time>)"))
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=lo.rank, help=f"adapter rank (default {lo.rank})")
    g.add_argument("--alpha", type=float, default=lo.alpha, help=f"scale alpha / rank (default alpha {lo.alpha:g})")
    g.add_argument("--dropout", type=float, default=lo.dropout, help=f"LoRA dropout (default {lo.dropout:g})")
    g.add_argument("--targets", default=",".join(lo.targets),
                   help=f"projections to adapt, comma-separated from {','.join(TARGETS)} (default all)")
    g.add_argument("--quant", choices=["none", "int8", "int4"], default=c.quant,
                   help="frozen base weights: none (float32), int8 or int4 (QLoRA-style) (default none)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="a float base's weights and matmuls; bfloat16 halves its memory and is ~3x "
                        "faster on CPUs with AVX512-BF16 (LoRA, norms and loss stay float32) (default "
                        "auto: bfloat16 where the device multiplies it natively, as TRL defaults to bf16)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=c.lr, help=f"AdamW learning rate (default {c.lr:g})")
    g.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", type=float, default=c.warmup,
                   help=f"linear warmup: a fraction of the run's steps (below 1) or a number of steps "
                        f"(default {c.warmup:g}: the first {c.warmup * 100:.0f}%% of the steps)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default=c.schedule,
                   help="learning rate after warmup (default cosine, to 0.1 x lr)")
    g.add_argument("--epochs", type=_epochs, default=c.epochs,
                   help="passes over the data (default auto: 3, more for a small file so that the run "
                        "sees at least 100 examples, fewer for a big one so that it sees at most 25,000)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=c.batch_size,
                   help=f"{'examples' if method == 'sft' else 'pairs'} per micro-batch at most "
                        f"(default {c.batch_size})")
    g.add_argument("--batch-tokens", type=int, default=c.batch_tokens,
                   help=f"padded tokens per micro-batch at most (default {c.batch_tokens})")
    g.add_argument("--grad-accum", type=int, default=c.grad_accum,
                   help="micro-batches per optimizer step and process (default 1)")
    g.add_argument("--max-length", type=int, default=c.max_length,
                   help=f"tokens per example; longer ones are cut (default {c.max_length})")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute layer activations in the backward: less memory, ~30%% slower")
    g.add_argument("--max-grad-norm", type=float, default=c.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=c.seed, help="seed of data order and initialization (default 0)")
    if method == "dpo":
        g.add_argument("--beta", type=float, default=c.beta, help=f"DPO beta (default {c.beta:g})")
    g = p.add_argument_group("run")
    g.add_argument("--val-every", type=int, default=0, help="steps between validation losses (0: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def _epochs(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    _common(sub.add_parser("sft", help="supervised fine-tuning on conversations",
                           description="LoRA supervised fine-tuning: loss on the assistant's tokens only"), "sft")
    _common(sub.add_parser("dpo", help="direct preference optimization on chosen/rejected pairs",
                           description="LoRA DPO (Rafailov et al. 2023); the reference is the base "
                                       "with the adapters off"), "dpo")
    _common(sub.add_parser("rm", help="a reward model (scalar head) from preference pairs",
                           description="a reward model: the base with LoRA and a scalar head on the "
                                       "last token, Bradley-Terry loss on chosen/rejected pairs; held-out "
                                       "pair accuracy reported (homellm.train.reward)"), "rm")
    from homellm.cli.tune_rl import add_parsers
    add_parsers(sub)  # ppo, grpo


def auto_dtype(device: str, quant: str) -> str:
    """bfloat16 for a float base where the device multiplies it natively (CPUs with AVX512-BF16
    or AMX, CUDA GPUs with bf16), else float32; a quantized base is float32 around its weights."""
    import torch
    if quant != "none":
        return "float32"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if any(f() for f in native) else "float32"


def config_from_args(args: argparse.Namespace):
    from homellm.catalog.library import home
    from homellm.train.config import LoraConfig, TuneConfig
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device, args.quant)
    folder = "rewards" if args.method == "rm" else "adapters"
    out = args.out or str(home() / folder / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                      targets=[t.strip() for t in args.targets.split(",") if t.strip()])
    return TuneConfig(method=args.method, model=args.model, data=args.data, val=args.val, out=out,
                      lora=lora, quant=args.quant, dtype=dtype, lr=args.lr, weight_decay=args.weight_decay,
                      warmup=args.warmup, schedule=args.schedule, epochs=args.epochs,
                      max_steps=args.steps, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                      grad_accum=args.grad_accum,
                      max_length=args.max_length, grad_checkpointing=args.grad_checkpointing,
                      seed=args.seed, beta=getattr(args, "beta", 0.1), val_every=args.val_every,
                      save_every=args.save_every, max_grad_norm=args.max_grad_norm,
                      threads=args.threads, device=device)


def main(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from homellm.cli.options import run_training
    if args.method in ("ppo", "grpo"):
        from homellm.cli.tune_rl import main as rl_main
        return rl_main(args)
    from homellm.train import dpo, reward, sft
    config = config_from_args(args)
    main_process = int(os.environ.get("RANK", "0")) == 0
    bar = None

    def progress(event: dict):
        nonlocal bar
        if "warning" in event:
            print(f"warning: {event['warning']}", file=sys.stderr)
            return
        if bar is None:
            bar = tqdm(total=event["total"], desc=config.method, unit="step", file=sys.stderr,
                       initial=event["step"] - 1)
        bar.update(1)
        postfix = {"loss": f"{event['loss']:.4f}", "tok/s": f"{event['tokens_per_s']:.0f}"}
        if event["val"]:
            postfix["val"] = f"{event['val']['loss']:.4f}"
            bar.write(f"step {event['step']}: validation " +
                      ", ".join(f"{k} {v:.4f}" for k, v in event["val"].items() if k != "step"))
        bar.set_postfix(postfix, refresh=False)

    train = {"sft": sft.train, "dpo": dpo.train, "rm": reward.train}[config.method]
    result = run_training(train, config, bar, main_process, progress=progress if main_process else None,
                          resume=args.resume)
    if not main_process:
        return 0
    if result.skipped:
        print(f"warning: skipped {len(result.skipped)} malformed records:", file=sys.stderr)
        for line in result.skipped[:10]:
            print(f"  {line}", file=sys.stderr)
    done = result.steps
    first = f"{result.losses[0]:.4f} -> " if len(result.losses) > 1 else ""
    loss = f", loss {first}{result.losses[-1]:.4f}" if result.losses else ""
    val = f", validation loss {result.val[-1]['loss']:.4f}" if result.val else ""
    if result.val and "accuracy" in result.val[-1]:
        v = result.val[-1]
        val += f", held-out pair accuracy {v['accuracy']:.3f} (mean margin {v['margin']:.2f})"
    ran = result.config or config
    passes = f" ({ran.epochs} epoch{'s' * (ran.epochs != 1)})" if ran.max_steps is None and ran.epochs else ""
    print(f"{config.method}: {done} steps{passes}, {result.tokens} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_s:.0f} tok/s){loss}{val}", file=sys.stderr)
    if config.method == "rm":
        print(f"reward model: {Path(config.out)}  (use: homellm score -m {config.out}, or "
              f"homellm tune ppo --reward {config.out})", file=sys.stderr)
        return 0
    print(f"adapter: {Path(config.out)}  (use: homellm run -m {config.model or 'smollm2'} "
          f"--adapter {config.out}, or homellm merge)", file=sys.stderr)
    return 0
