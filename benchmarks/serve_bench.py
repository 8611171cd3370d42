"""`homellm serve` under load, against llama.cpp's OpenAI-compatible server, side by side.

Each server runs as its own process on the same GGUF file and thread count. For 1, 4 and 16
concurrent streaming clients (each sends --rounds requests one after another; greedy,
--max-tokens each) it measures aggregate output tokens/s (streamed tokens / wall time) and
p50/p99 time to first token. Then prefix reuse: a conversation whose first turn carries
~--history words (950: ~1,000 tokens); the second turn's time to first token and prefilled tokens, against the
first turn's and against the same second-turn prompt sent cold (a different first word, so
nothing but the template's system header matches).

The peer is llama-cpp-python's server in a virtualenv outside the repo (HOMELLM_PEER_PYTHON,
default /root/peers/llamacpp/bin/python; `pip install uvicorn fastapi sse-starlette
starlette-context pydantic-settings` there, and see bench_vs_llamacpp.py for its build
flags). --no-peer measures homellm alone.

usage: python benchmarks/serve_bench.py [--model PATH] [--threads 2] [--max-tokens 64]
       [--rounds 2] [--clients 1,4,16] [--history 1000] [--no-peer] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a river town", "an old map",
          "a clockmaker", "a desert train", "a night market", "a mountain school", "a whale song",
          "a paper kite", "a glass garden", "a sleepy dragon", "a tiny planet", "a jazz band",
          "a secret library"]
WORDS = ("the quick brown fox jumps over the lazy dog while rivers run to the sea and "
         "mountains rise above quiet valleys where farmers grow wheat and barley").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, env: dict, timeout: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd[:4])} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd[:4])} did not start in {timeout} s")


async def one_request(http: httpx.AsyncClient, url: str, model: str, messages: list[dict],
                      max_tokens: int) -> dict:
    """Stream one chat completion; time to first token, streamed tokens, usage if sent."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
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
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": usage["completion_tokens"] if usage else tokens, "text": "".join(text),
            "usage": usage, "total_s": time.perf_counter() - t0}


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
            "ttft_p99_ms": round(1e3 * pct(ttfts, 99), 1)}


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


def measure(name: str, cmd: list[str], url: str, args, env: dict) -> dict:
    proc = start_server(cmd, url, env)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        runs = [asyncio.run(load_test(url, model, c, args.rounds, args.max_tokens))
                for c in args.clients]
        for r in runs:
            print(f"{name}: {r}", file=sys.stderr)
        prefix = asyncio.run(prefix_test(url, model, args.history))
        print(f"{name} prefix: {prefix}", file=sys.stderr)
        return {"throughput": runs, "prefix_reuse": prefix}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--history", type=int, default=950,
                   help="words of history in the first turn (950: ~1,000 tokens)")
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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ours = [sys.executable, "-m", "homellm", "serve", "-m", args.model, "--port", str(port),
            "--max-batch", str(max(args.clients)), "--ctx", "2048", "--threads", str(args.threads),
            "--preload"]
    result["homellm"] = measure("homellm", ours, url, args, env)
    if not args.no_peer:
        peer_python = os.environ.get("HOMELLM_PEER_PYTHON", "/root/peers/llamacpp/bin/python")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        peer = [peer_python, "-m", "llama_cpp.server", "--model", args.model, "--port", str(port),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--n_ctx", "2048", "--verbose", "false", "--interrupt_requests", "false"]
        result["llama_cpp"] = measure("llama.cpp", peer, url, args, env)
        result["ratio_aggregate_tps"] = {
            str(a["clients"]): round(a["aggregate_tps"] / b["aggregate_tps"], 2)
            for a, b in zip(result["homellm"]["throughput"], result["llama_cpp"]["throughput"])}
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
