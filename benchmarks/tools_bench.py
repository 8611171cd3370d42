"""Tool-call round trip and Ollama /api/chat time to first token, homellm serve beside
llama.cpp's server (llama-cpp-python) on the same GGUF file. Prints JSON.

- tool round trip: POST /v1/chat/completions with a weather tool and a named tool_choice
  (both sides decode the call under a grammar), from sending the request to holding the
  parsed call (name + arguments as JSON) on the client; greedy.
- time to first token: a streamed chat request, from sending it to the first non-empty
  content piece: Ollama's /api/chat (NDJSON) on homellm, and /v1/chat/completions (SSE) on
  both sides (llama-cpp-python has no Ollama API).
Each side is its own server process with the same thread count, warmed up with one request
first; --repeat requests per measure, median and best reported.

The peer is llama-cpp-python's server (`python -m llama_cpp.server`, its `[server]` extra)
in the virtualenv HOMELLM_PEER_PYTHON points at (default /work/peer/bin/python), run with
--chat_format chatml-function-calling (the default model speaks ChatML); without it, only
homellm's numbers are printed.

usage: python benchmarks/tools_bench.py [--model PATH] [--repeat 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from homellm.catalog.library import name_from
from common import free_port  # noqa: E402  (benchmarks/common.py)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris today?"}]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server at {url} did not start in {timeout} s")


def tool_round_trip(url: str, model: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 64,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    json.loads(call["arguments"])
    assert call["name"] == "get_weather"
    return time.perf_counter() - t0


def ttft_openai(url: str, model: str) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=300, json={
            "model": model, "messages": ASK, "temperature": 0, "max_tokens": 8, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    return time.perf_counter() - t0
    raise RuntimeError("no content in the stream")


def ttft_ollama(url: str, model: str) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/api/chat", timeout=300, json={
            "model": model, "messages": ASK, "options": {"temperature": 0, "num_predict": 8}}) as r:
        for line in r.iter_lines():
            if line and json.loads(line).get("message", {}).get("content"):
                return time.perf_counter() - t0
    raise RuntimeError("no content in the stream")


def measure(fn, url: str, model: str, repeat: int) -> dict:
    fn(url, model)  # warm-up (load, grammar compile)
    times = [fn(url, model) for _ in range(repeat)]
    return {"median_ms": round(statistics.median(times) * 1e3, 1), "best_ms": round(min(times) * 1e3, 1),
            "runs": repeat}


def run_side(cmd: list[str], env: dict, port: int, model: str, repeat: int, ollama: bool) -> dict:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc)
        out = {"tool_round_trip": measure(tool_round_trip, url, model, repeat),
               "ttft_v1_chat": measure(ttft_openai, url, model, repeat)}
        if ollama:
            out["ttft_api_chat"] = measure(ttft_ollama, url, model, repeat)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        args.model = str(cached_default_gguf())
    env = {**os.environ, "HOMELLM_THREADS": str(args.threads)}
    port = free_port()
    db = tempfile.mkdtemp(prefix="tools-bench-")
    homellm_cmd = [sys.executable, "-m", "homellm", "serve", "-m", args.model, "--port", str(port),
                   "--threads", str(args.threads), "--quiet", "--preload", "--ctx", "2048",
                   "--db", os.path.join(db, "bench.db")]
    report = {"model": args.model, "threads": args.threads}
    model_id = name_from(Path(args.model).stem)   # the id homellm serve gives a file
    try:
        report["homellm"] = run_side(homellm_cmd, env, port, model_id, args.repeat, ollama=True)
    finally:
        shutil.rmtree(db, ignore_errors=True)
    peer = os.environ.get("HOMELLM_PEER_PYTHON", "/work/peer/bin/python")
    if os.path.exists(peer):
        port = free_port()
        peer_cmd = [peer, "-m", "llama_cpp.server", "--model", args.model, "--model_alias", model_id,
                    "--host", "127.0.0.1", "--port", str(port),
                    "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                    "--n_ctx", "2048", "--chat_format", "chatml-function-calling"]
        try:
            report["llama_cpp_server"] = run_side(peer_cmd, dict(os.environ), port, model_id,
                                                  args.repeat, ollama=False)
            h, p = report["homellm"], report["llama_cpp_server"]
            report["ratio_homellm_over_peer"] = {
                k: round(h[k]["median_ms"] / p[k]["median_ms"], 2) for k in p}
        except (RuntimeError, KeyError, httpx.HTTPError) as e:
            report["llama_cpp_server"] = {"error": str(e)[:300]}
    else:
        report["llama_cpp_server"] = {"error": f"no peer Python at {peer} (HOMELLM_PEER_PYTHON)"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
