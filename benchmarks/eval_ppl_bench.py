"""`homellm eval ppl` speed against our own prefill on the same model and the same tokens;
prints one JSON object. Target: ppl tokens/s >= 0.8 x prefill tokens/s.

    python benchmarks/eval_ppl_bench.py [-m MODEL] [--data FILE] [--ctx 512] [--chunks 8] [--repeat 3]

The text (default: this repository's README and Python sources, concatenated) is cut into chunks
as `eval ppl` cuts it. For each chunk, in turn (so that a busy machine slows both alike):
  prefill  the engine's prefill of the chunk's ctx tokens, as `homellm bench` times it (the KV
           cache filled, logits of the last position only)
  ppl      `homellm.eval.ppl.evaluate` on that one chunk: the forward passes with logits for
           the scored half, the log-softmax, the NLL of each scored token
Reported: tokens/s of each (the chunk's ctx tokens over the best time of --repeat runs, summed
over the chunks), their ratio, the split of the ppl time between the network and the
log-softmax, and the machine's load average (a shared machine makes all of this noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_text() -> str:
    files = [REPO / "README.md"] + sorted((REPO / "homellm").rglob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from homellm.api import load
    from homellm.eval import ppl

    text = ppl.read_text(args.data).text if args.data else default_text()
    model = load(args.model, ctx=args.ctx + 1)  # + 1: the engine's prefill leaves one position free
    chunks = ppl.make_chunks(model.tokenizer, text, args.ctx)
    n = min(args.chunks, chunks.n_chunks)
    one = [ppl.Chunks(chunks.tokens[i:i + 1], chunks.scored_bytes[i:i + 1], args.ctx) for i in range(n)]
    ppl.evaluate(model, one[0])  # warm-up (first-touch of the weights and caches)
    model.engine.reset()
    model.engine.prefill(chunks.tokens[0].tolist())

    prefill_s, ppl_s, net_s = [float("inf")] * n, [float("inf")] * n, [float("inf")] * n
    for _ in range(args.repeat):
        for i in range(n):
            ids = chunks.tokens[i].tolist()
            model.engine.reset()
            t0 = time.perf_counter()
            model.engine.prefill(ids)
            prefill_s[i] = min(prefill_s[i], time.perf_counter() - t0)
            t0 = time.perf_counter()
            ppl.scored_logits(model, chunks.tokens[i:i + 1], chunks.first)
            net_s[i] = min(net_s[i], time.perf_counter() - t0)
            run = ppl.evaluate(model, one[i])
            ppl_s[i] = min(ppl_s[i], run.seconds)
    tokens = n * args.ctx
    prefill_tps, ppl_tps = tokens / sum(prefill_s), tokens / sum(ppl_s)
    result = {
        "model": str(args.model or "default"), "runtime": model.runtime, "threads": model.threads,
        "ctx": args.ctx, "chunks": n, "repeat": args.repeat,
        "prefill_tps": round(prefill_tps, 1), "ppl_tps": round(ppl_tps, 1),
        "ratio": round(ppl_tps / prefill_tps, 3), "target": 0.8,
        "ppl_network_share": round(sum(net_s) / sum(ppl_s), 3),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "ppl": round(ppl.evaluate(model, ppl.Chunks(chunks.tokens[:n], chunks.scored_bytes[:n], tokens)).ppl, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
