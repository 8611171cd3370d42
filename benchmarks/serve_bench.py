"""`homellm serve` under load, against llama.cpp's OpenAI-compatible server, side by side.

Each server runs as its own process on the same GGUF file and thread count. First the same
file's `homellm bench` (decode tok/s of `homellm run`'s engine), then for 1, 4 and 16
concurrent streaming clients (each sends --rounds requests one after another; greedy,
--max-tokens each) aggregate output tokens/s (streamed tokens / wall time), p50/p99 time to
first token, and per request the decode rate after its first token (one client: against
`homellm bench`). Then prefix reuse: a conversation whose first turn carries ~--history words
(950: ~1,000 tokens); the second turn's time to first token and prefilled tokens, against the
first turn's and against the same second-turn prompt sent cold (a different first word, so
nothing but the template's system header matches).

homellm alone then: reopening a conversation of ~--reopen-words words (1,500: ~2,000 tokens)
after a restart, with its keys and values saved by the first server (prompt_cache_key) against
a server without them (time to first token of the next turn); and the peak resident memory
(VmHWM) of a server with --adapters LoRA adapters loaded and each used once, against the same
server with none.

The peer is llama-cpp-python's server in a virtualenv outside the repo (HOMELLM_PEER_PYTHON,
default /root/peers/llamacpp/bin/python, with its [server] extra; see bench_vs_llamacpp.py
for its build flags). --no-peer measures homellm alone.

usage: python benchmarks/serve_bench.py [--model PATH] [--threads 2] [--max-tokens 64]
       [--rounds 2] [--clients 1,4,16] [--history 950] [--reopen-words 1500] [--adapters 3]
       [--no-peer] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port, start_server, stop  # noqa: E402  (benchmarks/common.py)

TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a river town", "an old map",
          "a clockmaker", "a desert train", "a night market", "a mountain school", "a whale song",
          "a paper kite", "a glass garden", "a sleepy dragon", "a tiny planet", "a jazz band",
          "a secret library"]
WORDS = ("the quick brown fox jumps over the lazy dog while rivers run to the sea and "
         "mountains rise above quiet valleys where farmers grow wheat and barley").split()


async def one_request(http: httpx.AsyncClient, url: str, model: str, messages: list[dict],
                      max_tokens: int, extra: dict | None = None) -> dict:
    """Stream one chat completion; time to first token, streamed tokens, usage if sent."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    ttft, tokens, text, usage = None, 0, [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    tokens += 1
                    text.append(piece)
    total = time.perf_counter() - t0
    ttft = ttft if ttft is not None else total
    n = usage["completion_tokens"] if usage else tokens
    return {"ttft_s": ttft, "tokens": n, "text": "".join(text), "usage": usage, "total_s": total,
            "decode_tps": (n - 1) / (total - ttft) if n > 1 and total > ttft else 0.0}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


async def load_test(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        await one_request(http, url, model, [{"role": "user", "content": "Hi"}], 4)  # warm up

        async def client(c: int):
            out = []
            for r in range(rounds):
                topic = TOPICS[(c + r * clients) % len(TOPICS)]
                msgs = [{"role": "user", "content": f"Write a long story about {topic}."}]
                out.append(await one_request(http, url, model, msgs, max_tokens))
            return out

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
    ttfts = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "output_tokens": tokens,
            "wall_s": round(wall, 3), "aggregate_tps": round(tokens / wall, 2),
            "ttft_p50_ms": round(1e3 * statistics.median(ttfts), 1),
            "ttft_p99_ms": round(1e3 * pct(ttfts, 99), 1),
            "request_decode_tps": round(statistics.median(r["decode_tps"] for r in results), 2)}


def history_text(n_words: int) -> str:
    return " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(n_words))


async def prefix_test(url: str, model: str, history_words: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        doc = history_text(history_words)
        turn1 = [{"role": "user", "content": f"Read this text:\n{doc}\nWhat animal is in it?"}]
        first = await one_request(http, url, model, turn1, 24)
        turn2 = turn1 + [{"role": "assistant", "content": first["text"]},
                         {"role": "user", "content": "Now give the text a short title."}]
        second = await one_request(http, url, model, turn2, 24)
        cold_turn2 = [{"role": "user", "content": "Please r" + turn2[0]["content"][1:]}] + turn2[1:]
        cold = await one_request(http, url, model, cold_turn2, 24)

    def row(r):
        u = r["usage"] or {}
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        return {"prompt_tokens": u.get("prompt_tokens"), "cached_tokens": cached,
                "prefilled_tokens": None if cached is None else u.get("prompt_tokens") - cached,
                "ttft_ms": round(1e3 * r["ttft_s"], 1)}
    out = {"turn1_cold": row(first), "turn2_warm": row(second), "turn2_cold": row(cold)}
    out["turn2_speedup_vs_turn1"] = round(first["ttft_s"] / second["ttft_s"], 2)
    out["turn2_speedup_vs_cold"] = round(cold["ttft_s"] / second["ttft_s"], 2)
    return out


def cli_bench(args, env: dict) -> dict:
    """`homellm bench` on the same file and threads: the engine of `homellm run`."""
    out = subprocess.run([sys.executable, "-m", "homellm", "bench", "-m", args.model, "--json",
                          "--prompt-tokens", "32", "--gen-tokens", str(args.max_tokens), "--repeat", "2"],
                         env=dict(env, HOMELLM_THREADS=str(args.threads)), capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"homellm bench failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: r[k] for k in ("prefill_tps", "decode_tps", "threads", "peak_rss_mb")}


def homellm_cmd(args, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "homellm", "serve", "-m", args.model, "--port", str(port),
            "--max-batch", str(max(args.clients)), "--ctx", "4096", "--threads", str(args.threads),
            "--preload", "--quiet", *extra]


def reopen_test(args, env: dict) -> dict:
    """Time to first token of a conversation's next turn after a restart: with the keys and
    values the first server saved (prompt_cache_key), and on a server without them."""
    home = tempfile.mkdtemp(prefix="homellm-bench-home-")
    env = dict(env, HOMELLM_HOME=home)
    doc = history_text(args.reopen_words)
    turn1 = [{"role": "user", "content": f"Read this text:\n{doc}\nWhat animal is in it?"}]
    key = {"prompt_cache_key": "bench-conversation"}

    def serve(*extra):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        return start_server(homellm_cmd(args, port, *extra), url, env, timeout=180), url

    async def ask(url, model, messages, extra):
        async with httpx.AsyncClient(timeout=600) as http:
            # a first request of another conversation: the chat template compiled, the threads
            # started (what every server has done before a conversation returns to it)
            await one_request(http, url, model, [{"role": "user", "content": "Hi"}], 4)
            return await one_request(http, url, model, messages, 16, extra)

    proc, url = serve()
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        first = asyncio.run(ask(url, model, turn1, key))
    finally:
        stop(proc)  # the conversation goes to disk
    turn2 = turn1 + [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "Now give the text a short title."}]
    proc, url = serve()  # restarted: the saved keys and values
    try:
        warm = asyncio.run(ask(url, model, turn2, key))
    finally:
        stop(proc)
    proc, url = serve("--kv-disk", "0")  # restarted without them
    try:
        cold = asyncio.run(ask(url, model, turn2, key))
    finally:
        stop(proc)
    u = warm["usage"] or {}
    return {"prompt_tokens": u.get("prompt_tokens"),
            "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "ttft_saved_ms": round(1e3 * warm["ttft_s"], 1), "ttft_cold_ms": round(1e3 * cold["ttft_s"], 1),
            "speedup": round(cold["ttft_s"] / warm["ttft_s"], 1), "same_reply": warm["text"] == cold["text"]}


def write_adapter(folder: Path, model_path: str, rank: int, seed: int):
    """A random LoRA adapter in PEFT's layout on every projection of every layer."""
    import numpy as np
    from safetensors.numpy import save_file

    from homellm.engine.lora import projection_shape
    from homellm.model.formats import open_checkpoint
    args = open_checkpoint(model_path).args
    rng = np.random.default_rng(seed)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tensors = {}
    for layer in range(args.num_hidden_layers):
        for which, name in enumerate(names):
            out_f, in_f = projection_shape(args, which)
            part = "self_attn" if which < 4 else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (0.01 * rng.standard_normal((rank, in_f))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((out_f, rank))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(names)}))


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def adapters_rss_test(args, env: dict) -> dict:
    """Peak resident memory of a server with --adapters adapters (rank 16, every projection),
    each used by a request, against the same server and requests with none."""
    root = Path(tempfile.mkdtemp(prefix="homellm-bench-adapters-"))
    flags = []
    for i in range(args.adapters):
        write_adapter(root / f"a{i}", args.model, 16, i)
        flags += ["--adapter", f"a{i}={root / f'a{i}'}"]
    env = dict(env, HOMELLM_HOME=str(root / "home"))
    out = {}
    for name, extra in (("none", []), ("adapters", flags)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(homellm_cmd(args, port, *extra), url, env, timeout=180)
        try:
            ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
            base = ids[0]

            async def go():
                async with httpx.AsyncClient(timeout=600) as http:
                    msgs = [{"role": "user", "content": "Write a long story about a river town."}]
                    await asyncio.gather(*(one_request(http, url, m, msgs, 32)
                                           for m in (ids if extra else [base] * len(ids))))
            asyncio.run(go())
            out[name] = {"models": ids, "vm_hwm_mb": round(vm_hwm_mb(proc.pid), 1)}
        finally:
            stop(proc)
    out["ratio"] = round(out["adapters"]["vm_hwm_mb"] / out["none"]["vm_hwm_mb"], 3)
    return out


def measure(name: str, cmd: list[str], url: str, args, env: dict) -> dict:
    proc = start_server(cmd, url, env, timeout=180)
    skip = set(args.skip.split(","))
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        out = {}
        if "load" not in skip:
            out["throughput"] = [asyncio.run(load_test(url, model, c, args.rounds, args.max_tokens))
                                 for c in args.clients]
            for r in out["throughput"]:
                print(f"{name}: {r}", file=sys.stderr)
        if "prefix" not in skip:
            out["prefix_reuse"] = asyncio.run(prefix_test(url, model, args.history))
            print(f"{name} prefix: {out['prefix_reuse']}", file=sys.stderr)
        return out
    finally:
        stop(proc, 20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--history", type=int, default=950,
                   help="words of history in the first turn (950: ~1,000 tokens)")
    p.add_argument("--reopen-words", type=int, default=1500,
                   help="words of the conversation reopened after a restart (1500: ~2,000 tokens)")
    p.add_argument("--adapters", type=int, default=3, help="LoRA adapters of the memory test")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: load, prefix, "
                                              "reopen, adapters, bench")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        args.model = str(cached_default_gguf())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = {"model": os.path.basename(args.model), "threads": args.threads,
              "max_tokens": args.max_tokens, "rounds": args.rounds,
              "load_average_before": os.getloadavg()[0]}
    skip = set(args.skip.split(","))
    if "bench" not in skip:
        result["homellm_bench"] = cli_bench(args, env)
        print(f"homellm bench: {result['homellm_bench']}", file=sys.stderr)
    if "load" not in skip or "prefix" not in skip:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ours = homellm_cmd(args, port, "--kv-disk", "0")
        result["homellm"] = measure("homellm", ours, url, args, env)
        if "homellm_bench" in result:
            one = next((r for r in result["homellm"]["throughput"] if r["clients"] == 1), None)
            if one:
                result["one_client_vs_homellm_bench"] = round(
                    one["request_decode_tps"] / result["homellm_bench"]["decode_tps"], 3)
    if not args.no_peer and ("load" not in skip or "prefix" not in skip):
        peer_python = os.environ.get("HOMELLM_PEER_PYTHON", "/root/peers/llamacpp/bin/python")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        peer = [peer_python, "-m", "llama_cpp.server", "--model", args.model, "--port", str(port),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--n_ctx", "4096", "--verbose", "false", "--interrupt_requests", "false"]
        result["llama_cpp"] = measure("llama.cpp", peer, url, args, env)
        if "load" not in skip:
            result["ratio_aggregate_tps"] = {
                str(a["clients"]): round(a["aggregate_tps"] / b["aggregate_tps"], 2)
                for a, b in zip(result["homellm"]["throughput"], result["llama_cpp"]["throughput"])}
    if "reopen" not in skip:
        result["reopen_after_restart"] = reopen_test(args, env)
        print(f"reopen: {result['reopen_after_restart']}", file=sys.stderr)
    if "adapters" not in skip and args.adapters > 0:
        result["adapters_peak_rss"] = adapters_rss_test(args, env)
        print(f"adapters: {result['adapters_peak_rss']}", file=sys.stderr)
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
