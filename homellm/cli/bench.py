"""`homellm bench`: prefill and decode speed, load time, peak memory, weight bandwidth.

The prompt is a fixed sequence of token ids (the same one benchmarks/ gives llama.cpp), and
decoding ignores end-of-sequence so every run generates exactly --gen-tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys

from homellm.cli.options import add_model_arguments, load_model

HELP = "measure prefill and decode speed"


def bench_prompt(n: int, vocab_size: int) -> list[int]:
    """A fixed, model-independent prompt of n ids spread over the vocabulary."""
    span = max(vocab_size - 1000, 1)
    return [1000 % vocab_size + (i * 7919) % span for i in range(n)]


def add_arguments(p: argparse.ArgumentParser):
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the best is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(args: argparse.Namespace) -> int:
    from homellm.engine.kernels.threads import pool_stats
    from homellm.engine.sampling import SamplingParams
    from homellm.errors import HomellmError
    if args.prompt_tokens < 1 or args.repeat < 1 or args.gen_tokens < 2:
        raise HomellmError("--prompt-tokens and --repeat must be at least 1, --gen-tokens at "
                           "least 2 (the first token comes out of the prefill)")
    need = args.prompt_tokens + args.gen_tokens
    if args.ctx is None:
        args.ctx = need
    elif args.ctx < need:
        raise HomellmError(f"--ctx {args.ctx} is smaller than --prompt-tokens + --gen-tokens = {need}")
    model = load_model(args, quiet=args.json)
    ids = bench_prompt(args.prompt_tokens, model.args.vocab_size)
    greedy = SamplingParams(temperature=0)
    best = None
    for _ in range(args.repeat):
        model.engine.reset()
        steps = list(model.engine.generate(ids, greedy, max_tokens=args.gen_tokens, logprobs=False))
        t = steps[-1].timings
        if best is None or t.decode_tps > best.decode_tps:
            best = t
        if best.prefill_tps < t.prefill_tps:
            best.prefill_s = t.prefill_s
    wbytes = model.weight_bytes_per_token
    pool = pool_stats() if model.runtime == "native" else {}
    result = {
        "model": str(args.model or "default"),
        "device": str(model.device),
        "runtime": model.runtime,
        "threads": model.threads,
        "load_s": round(model.load_s, 3),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": best.generated_tokens,
        "prefill_tps": round(best.prefill_tps, 2),
        "decode_tps": round(best.decode_tps, 2),
        "weight_bytes_per_token": wbytes,
        "weight_gbps": round(wbytes * best.decode_tps / 1e9, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # the kernels' thread pool: threads it ran on (time-weighted), times it took fewer
        # threads because the machine was busy, and more again
        "threads_used": pool.get("threads_used"),
        "pool": {k: pool[k] for k in ("shrinks", "grows", "probes", "probe_fails", "limit") if k in pool},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model     {result['model']} on {result['device']} ({result['runtime']} runtime), "
              f"{result['threads']} threads")
        if result["threads_used"]:
            busy = pool.get("shrinks", 0)
            note = f" (fewer {busy} time{'s' if busy > 1 else ''} while the machine was busy)" if busy else ""
            print(f"threads   {result['threads_used']:.2f} used on average{note}")
        print(f"load      {result['load_s']:.2f} s")
        print(f"prefill   {result['prefill_tps']:.1f} tok/s ({args.prompt_tokens} tokens)")
        print(f"decode    {result['decode_tps']:.1f} tok/s ({result['gen_tokens']} tokens), "
              f"{result['weight_gbps']:.2f} GB/s of weights")
        print(f"peak RSS  {result['peak_rss_mb']:.0f} MB")
    sys.stdout.flush()
    return 0
