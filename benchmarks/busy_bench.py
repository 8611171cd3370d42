"""Decode speed on a busy machine: idle, beside a one-core CPU hog and beside a two-core hog.

A hog is a separate process spinning in a loop (`python -c 'while True: pass'`), one per core
it takes. For each load this measures, at default settings:
  run    `homellm bench --json` (a fixed prompt, then --gen-tokens greedy tokens; EOS ignored)
  serve  `homellm serve`, one client streaming --requests chat completions one after another
         (greedy, --max-tokens each): decode tok/s of each reply from its streamed chunks
and the ratio of each to its idle speed (issue 14's targets: one-core hog >= 0.5x, two-core hog
>= 0.25x). One server process serves every load in turn, then idle again ("idle_after": the
pool takes its threads back once the machine is free).

With llama.cpp (HOMELLM_PEER_PYTHON: a llama-cpp-python virtualenv, built as in
bench_vs_llamacpp.py; its server needs `pip install 'llama-cpp-python[server]'` there), the
same measures run for it side by side, on the same thread count as ours, in the environment
the caller started with (nothing of ours reaches it). Its decode prints a time per token, so
a collapse under a hog is measured for --timeout seconds and reported, not waited out.

What our thread pool did comes back too: `threads_used` (the average threads of its jobs),
shrinks (times it took fewer threads) and grows (more again); the server's from
HOMELLM_POOL_DEBUG=1's line at exit.

usage: python benchmarks/busy_bench.py [--model PATH] [--prompt-tokens 64] [--gen-tokens 128]
       [--repeat 2] [--loads 0,1,2] [--requests 4] [--max-tokens 64] [--timeout 120]
       [--no-serve] [--no-peer] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from common import free_port, start_server  # noqa: E402  (benchmarks/common.py)

# every side gets the caller's environment as it was before anything was imported
START_ENV = dict(os.environ)
PEER_PYTHON = os.environ.get("HOMELLM_PEER_PYTHON", "")
TARGETS = {"hog1": 0.5, "hog2": 0.25}

# llama.cpp's decode, one line per token (seconds since the first decoded token), greedy, EOS
# ignored, the same prompt ids as `homellm bench`
PEER_DECODE = r'''
import sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, n_prompt, n_gen, threads = sys.argv[1], *map(int, sys.argv[2:5])
llm = Llama(model_path=path, n_ctx=n_prompt + n_gen, n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, verbose=False)
vocab = llm.n_vocab()
span = max(vocab - 1000, 1)
ids = [1000 % vocab + (i * 7919) % span for i in range(n_prompt)]
def last_logits():
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))
llm.eval(ids)
tok = int(np.argmax(last_logits()))
print("ready", flush=True)
t0 = time.perf_counter()
for _ in range(n_gen - 1):
    llm.eval([tok])
    tok = int(np.argmax(last_logits()))
    print(f"{time.perf_counter() - t0:.6f}", flush=True)
'''

TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a river town", "an old map",
          "a clockmaker", "a desert train", "a night market"]


@contextlib.contextmanager
def hogs(n: int):
    """n processes spinning, each on a core of its own (while the machine has them)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=START_ENV)
             for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_label(n: int) -> str:
    return "idle" if n == 0 else f"hog{n}"


# --- run -----------------------------------------------------------------------------------------

def ours_run(model: str, a) -> dict:
    cmd = [sys.executable, "-m", "homellm", "bench", "-m", model, "--json", "--prompt-tokens",
           str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--repeat", str(a.repeat)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=START_ENV, timeout=a.timeout * a.repeat + 120)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout * a.repeat + 120} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"decode_tps": out["decode_tps"], "threads": out["threads"],
            "threads_used": out.get("threads_used"), "pool": out.get("pool")}


def timed_lines(cmd: list[str], env: dict, want: int, timeout: float) -> tuple[list[float], bool]:
    """Run cmd; after its "ready" line, collect float lines (seconds) until `want` or `timeout`
    seconds have passed; returns (times, timed_out). The process is killed either way."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    times, timed_out, started = [], False, None
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                started = time.monotonic()
                continue
            if started is None:
                continue
            times.append(float(line))
            if len(times) >= want:
                break
            if time.monotonic() - started > timeout:
                timed_out = True
                break
    finally:
        proc.kill()
        proc.wait()
    return times, timed_out


def peer_run(model: str, threads: int, a) -> dict:
    best = None
    for _ in range(a.repeat):
        times, timed_out = timed_lines([PEER_PYTHON, "-c", PEER_DECODE, model, str(a.prompt_tokens),
                                        str(a.gen_tokens), str(threads)], START_ENV, a.gen_tokens - 1, a.timeout)
        if len(times) < 2:
            return {"error": "llama.cpp decoded fewer than 2 tokens", "timed_out": timed_out}
        tps = (len(times) - 1) / (times[-1] - times[0])
        run = {"decode_tps": round(tps, 2), "threads": threads, "tokens": len(times) + 1,
               "timed_out": timed_out}
        best = run if best is None or run["decode_tps"] > best["decode_tps"] else best
        if timed_out:
            break  # a collapse: once is enough
    return best


# --- serve ---------------------------------------------------------------------------------------

def stream_decode_tps(url: str, model: str, topic: str, max_tokens: int, timeout: float) -> dict:
    """One streamed chat completion: decode tok/s between its first and last content chunk."""
    import httpx
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Write a long story about {topic}."}]}
    stamps, timed_out = [], False
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout + 60) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.monotonic())
            if time.monotonic() - t0 > timeout:
                timed_out = True
                break
    n = len(stamps)
    tps = (n - 1) / (stamps[-1] - stamps[0]) if n > 2 and stamps[-1] > stamps[0] else None
    return {"tokens": n, "decode_tps": tps, "timed_out": timed_out}


def measure_server(name: str, cmd: list[str], env: dict, a, loads: list[int]) -> dict:
    import httpx
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*cmd, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as err:
        proc = start_server(cmd, url, env, err)
        out = {}
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            stream_decode_tps(url, model, "a warm-up", 8, a.timeout)
            for n in [*loads, 0]:
                label = load_label(n) if n or "idle" not in out else "idle_after"
                with hogs(n):
                    reqs = [stream_decode_tps(url, model, TOPICS[i % len(TOPICS)], a.max_tokens, a.timeout)
                            for i in range(a.requests)]
                rates = [r["decode_tps"] for r in reqs if r["decode_tps"]]
                out[label] = {"decode_tps": round(statistics.median(rates), 2) if rates else None,
                              "requests": len(reqs), "tokens": sum(r["tokens"] for r in reqs),
                              "timed_out": any(r["timed_out"] for r in reqs)}
                print(f"{name} serve {label}: {out[label]}", file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err.seek(0)
            m = re.search(r"homellm pool: .*", err.read())
            if m:
                out["pool"] = m.group(0)
    return out


# --- the table -----------------------------------------------------------------------------------

def ratios(rows: dict) -> dict:
    idle = (rows.get("idle") or {}).get("decode_tps")
    return {k: round(v["decode_tps"] / idle, 3) for k, v in rows.items()
            if k != "idle" and isinstance(v, dict) and v.get("decode_tps") and idle}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2, help="bench runs per load (the best counts)")
    p.add_argument("--loads", default="0,1,2", help="hog processes per measurement (default 0,1,2)")
    p.add_argument("--requests", type=int, default=4, help="streamed requests per load (serve)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed request")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds a decode may take before it is reported as it stands")
    p.add_argument("--no-serve", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    loads = [int(x) for x in a.loads.split(",")]
    if a.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        a.model = str(cached_default_gguf())
    peer = PEER_PYTHON and not a.no_peer and os.path.exists(PEER_PYTHON)
    result = {"model": os.path.basename(a.model), "cpus": len(os.sched_getaffinity(0)),
              "load_average_before": round(os.getloadavg()[0], 2), "targets": TARGETS,
              "run": {"homellm": {}}, "serve": {}}
    threads = None
    for n in loads:
        label = load_label(n)
        with hogs(n):
            ours = ours_run(a.model, a)
        result["run"]["homellm"][label] = ours
        threads = threads or ours.get("threads")
        print(f"homellm run {label}: {ours}", file=sys.stderr, flush=True)
        if peer:
            with hogs(n):
                theirs = peer_run(a.model, threads or 2, a)
            result["run"].setdefault("llama_cpp", {})[label] = theirs
            print(f"llama.cpp run {label}: {theirs}", file=sys.stderr, flush=True)
    if not a.no_serve:
        env = dict(START_ENV, HOMELLM_POOL_DEBUG="1")
        result["serve"]["homellm"] = measure_server(
            "homellm", [sys.executable, "-m", "homellm", "serve", "-m", a.model, "--preload", "--quiet"],
            env, a, loads)
        if peer and subprocess.run([PEER_PYTHON, "-c", "import llama_cpp.server"], env=START_ENV,
                                   capture_output=True).returncode == 0:
            result["serve"]["llama_cpp"] = measure_server(
                "llama.cpp", [PEER_PYTHON, "-m", "llama_cpp.server", "--model", a.model, "--n_threads",
                              str(threads or 2), "--n_threads_batch", str(threads or 2), "--n_ctx", "2048",
                              "--verbose", "false"], START_ENV, a, loads)
        elif peer:
            result["serve"]["llama_cpp"] = {"skipped": "llama_cpp.server is not installed in the peer "
                                                       "(pip install 'llama-cpp-python[server]')"}
    result["ratio_to_idle"] = {kind: {side: ratios(rows) for side, rows in sides.items() if "skipped" not in rows}
                               for kind, sides in (("run", result["run"]), ("serve", result["serve"]))}
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
