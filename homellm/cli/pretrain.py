"""`homellm pretrain --data DIR --size NAME|--depth D`: a LLaMA-family model from scratch.

DIR is a corpus made by `homellm data prepare` and `homellm tokenizer train`. The output is a
Hugging Face folder (config.json, model.safetensors, tokenizer files) that run, chat, tune,
export and eval open. Under torchrun (`torchrun --nproc_per_node N -m homellm pretrain ...`)
the processes train one model with DDP (or FSDP with --fsdp); only the first one prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HELP = "pretrain a LLaMA-family model from scratch on a tokenized corpus"


def add_arguments(p: argparse.ArgumentParser):
    from homellm.train.pretrain_config import SIZES, PretrainConfig
    c = PretrainConfig()
    p.add_argument("--data", required=True, help="corpus folder (homellm data prepare + tokenizer train)")
    p.add_argument("--out", default=None, help="output folder (default $HOMELLM_HOME/pretrained/<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    g = p.add_argument_group("model")
    g.add_argument("--size", choices=list(SIZES), default=None,
                   help="named depth: " + ", ".join(f"{k} {v}" for k, v in SIZES.items()) + " (default micro)")
    g.add_argument("--depth", type=int, default=None,
                   help="layers D: width 64 D, D heads of 64, ~20 tokens per parameter")
    g.add_argument("--seq-len", type=int, default=c.seq_len, help=f"context in tokens (default {c.seq_len})")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 20 tokens per parameter)")
    g.add_argument("--tokens", type=float, default=None, help="training tokens instead of --steps (e.g. 5e6)")
    g.add_argument("--batch-tokens", type=int, default=c.batch_tokens,
                   help=f"tokens per optimizer step, all processes (default {c.batch_tokens})")
    g.add_argument("--device-batch", type=int, default=c.device_batch,
                   help=f"sequences per forward/backward; the rest is gradient accumulation (default {c.device_batch})")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default=c.optimizer,
                   help="adamw, or muon for the matrices (AdamW for embeddings and norms) (default adamw)")
    g.add_argument("--lr", type=float, default=c.lr, help=f"AdamW peak learning rate (default {c.lr:g})")
    g.add_argument("--muon-lr", type=float, default=c.muon_lr, help=f"Muon's learning rate (default {c.muon_lr:g})")
    g.add_argument("--weight-decay", type=float, default=c.weight_decay,
                   help=f"on matrices (default {c.weight_decay:g})")
    g.add_argument("--schedule", choices=["cosine", "wsd"], default=c.schedule,
                   help="after warmup: cosine to 0.1 x lr, or warmup-stable-decay (default cosine)")
    g.add_argument("--warmup", type=float, default=c.warmup,
                   help=f"warmup: a fraction of the steps (< 1) or a number of steps (default {c.warmup:g})")
    g.add_argument("--decay", type=float, default=c.decay, help="wsd: fraction of steps that decay (default 0.2)")
    g.add_argument("--max-grad-norm", type=float, default=c.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=c.seed, help="seed of initialization and data order")
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="bfloat16 matmuls (autocast; weights and optimizer float32); auto: where the "
                        "device multiplies bf16 natively")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and loss (compiles once, ~30 s on a CPU; default: on a GPU "
                        "and in bfloat16 on a CPU, where it measured faster; falls back to eager if it fails)")
    g.add_argument("--attention", choices=["auto", "sdpa", "blocks"], default=c.attention,
                   help="causal attention: PyTorch's SDPA, or explicit matmuls over query blocks (faster "
                        "on a CPU at short contexts); auto: blocks on a CPU up to 512 tokens (1024 compiled)")
    g.add_argument("--fuse", action="store_true",
                   help="q/k/v and gate/up projections each as one matmul (same weights)")
    g.add_argument("--val-every", type=int, default=0, help="steps between validations (0: at the end)")
    g.add_argument("--val-tokens", type=int, default=c.val_tokens, help=f"validation tokens (default {c.val_tokens})")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP2) instead of DDP")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU (default: an estimate from the CPU or GPU)")


def config_from_args(args):
    from homellm.catalog.library import home
    from homellm.cli.tune import auto_dtype
    from homellm.train.pretrain_config import PretrainConfig
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device, "none")
    out = args.out or str(home() / "pretrained" / time.strftime("%Y%m%d-%H%M%S"))
    return PretrainConfig(
        data=args.data, out=out, size=args.size, depth=args.depth, seq_len=args.seq_len,
        steps=args.steps, tokens=int(args.tokens) if args.tokens else None,
        batch_tokens=args.batch_tokens, device_batch=args.device_batch, optimizer=args.optimizer,
        lr=args.lr, muon_lr=args.muon_lr, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup=args.warmup, decay=args.decay, max_grad_norm=args.max_grad_norm, dtype=dtype,
        compile=args.compile, attention=args.attention, fuse=args.fuse, val_every=args.val_every,
        val_tokens=args.val_tokens, save_every=args.save_every, seed=args.seed, threads=args.threads,
        device=device,
        fsdp=args.fsdp, peak_flops=args.peak_flops)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from homellm.cli.options import run_training
    from homellm.train.pretrain import pretrain
    config = config_from_args(args)
    main_process = int(os.environ.get("RANK", "0")) == 0
    bar = None

    def progress(event: dict):
        nonlocal bar
        if event.get("start"):
            a = event["args"]
            print(f"pretrain: {event['n_params'] / 1e6:.2f}M parameters (depth {a.num_hidden_layers}, "
                  f"width {a.hidden_size}, {a.num_attention_heads} heads, vocab {a.vocab_size}), "
                  f"{event['total']} steps x {config.batch_tokens} tokens = {event['tokens_total'] / 1e6:.1f}M "
                  f"tokens, {config.optimizer}, {config.schedule}, {config.dtype}, {event['world']} "
                  f"process(es) x {event['accum']} micro-batch(es), "
                  f"{'compiled' if event['compile'] else 'eager'}, {event['attention']} attention; MFU "
                  f"against {event['peak_flops'] / 1e12:.2f} TFLOP/s ({event['peak_how']})", file=sys.stderr)
            bar = tqdm(total=event["total"], initial=event["step"], desc="pretrain", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
            return
        if event.get("compiling"):
            bar.write("pretrain: compiling the model with torch.compile (once; ~30 s on a CPU, "
                      "--no-compile skips it)", file=sys.stderr)
            return
        if "compiled" in event:
            bar.write(f"pretrain: compiled in {event['compiled']:.0f} s", file=sys.stderr)
            return
        if "compile_failed" in event:
            bar.write(f"warning: torch.compile failed ({event['compile_failed']}); training eager "
                      f"(--no-compile skips the attempt)", file=sys.stderr)
            return
        bar.update(1)
        bar.set_postfix({"loss": f"{event['loss']:.3f}", "tok/s": f"{event['tokens_per_s']:.0f}",
                         "MFU": f"{event['mfu']:.1%}"}, refresh=False)
        if event["val"]:
            v = event["val"]
            bar.write(f"step {event['step']}: train loss {event['loss']:.4f}, validation loss "
                      f"{v['loss']:.4f}, {v['bpb']:.4f} bits per byte", file=sys.stderr)

    result = run_training(pretrain, config, bar, main_process, progress=progress if main_process else None,
                          resume=args.resume)
    if not main_process:
        return 0
    first = f"{result.losses[0]:.4f} -> " if len(result.losses) > 1 else ""
    val = result.val[-1] if result.val else None
    print(f"pretrain: {result.steps} steps, {result.tokens / 1e6:.2f}M tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_s:.0f} tok/s), loss {first}{result.losses[-1]:.4f}"
          + (f", validation loss {val['loss']:.4f} ({val['bpb']:.4f} bits per byte)" if val else ""),
          file=sys.stderr)
    print(f"model: {result.out}  (homellm run -m {result.out} \"Once upon a time\"; "
          f"homellm tune sft -m {result.out} --data chats.jsonl; homellm pull {result.out} --name mine)",
          file=sys.stderr)
    return 0
