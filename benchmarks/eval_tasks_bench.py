"""lm-eval samples/s: `--model homellm` against `--model hf` (and llama.cpp), same task and threads.

Each side runs in its own process with the caller's environment as it was at start (START_ENV)
plus the thread count (OMP_NUM_THREADS and HOMELLM_THREADS), evaluates the same lm-eval task
through lm_eval.simple_evaluate (homellm.eval.tasks.run_task) and reports the task's metrics
and its samples/s: documents over the seconds spent in the model's request methods
(loglikelihood, loglikelihood_rolling, generate_until), so lm-eval's own bookkeeping (task
building, metrics, its environment report) counts for no side. Best of --repeat runs.

Sides:
  homellm      --model homellm on the GGUF file (the C runtime; the file that is served)
  hf           --model hf (transformers, float32) on the Hugging Face export of that file
               (`homellm export --type float32`: the same weights, dequantized)
  homellm_hf   --model homellm on that export (homellm's PyTorch path), for reference
  llama_cpp    --model gguf (lm-eval's llama.cpp back end) against llama-cpp-python's server
               on the GGUF file (logits_all, as the back end's echo + logprobs requests need;
               each request then returns the prompt's log-probabilities, which the server
               builds in Python: a sort of the vocabulary for every prompt token), when
               HOMELLM_PEER_PYTHON names a Python that has llama_cpp
               and its server's packages (uvicorn, fastapi, sse-starlette, starlette-context,
               pydantic-settings; HOMELLM_PEER_PYTHONPATH is added to the server's PYTHONPATH
               only, for packages installed with pip --target beside the peer)

Prints one JSON object: each side's result and the ratios homellm / hf and homellm / llama_cpp
(targets: >= 5x and >= 3x, at identical accuracy).

usage: python benchmarks/eval_tasks_bench.py [--model GGUF] [--task homellm_capitals]
       [--limit N] [--num-fewshot K] [--threads 2] [--repeat 2] [--sides homellm,hf,llama_cpp]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from common import free_port  # noqa: E402  (benchmarks/common.py)

# every side gets the caller's environment as it was before anything was imported
START_ENV = dict(os.environ)

SIDE = r'''
import json, sys, time
side, model, task, limit, fewshot, repeat = sys.argv[1:7]
limit = None if limit == "none" else float(limit)
limit = int(limit) if limit is not None and limit >= 1 else limit
fewshot = None if fewshot == "none" else int(fewshot)
from homellm.eval import tasks as tasklib
import lm_eval
from lm_eval.api.registry import get_model
t0 = time.perf_counter()
if side in ("homellm", "homellm_hf"):
    from homellm.eval.harness import HomellmLM
    lm = HomellmLM(model=model)
    info = {"runtime": lm.model.runtime, "threads": lm.model.threads}
elif side == "hf":
    import torch
    lm = get_model("hf")(pretrained=model, dtype="float32", device="cpu",
                                              batch_size=16)
    info = {"runtime": "transformers", "threads": torch.get_num_threads()}
else:
    lm = get_model("gguf")(base_url=model)
    info = {"runtime": "llama-cpp-python server"}
load_s = time.perf_counter() - t0
suite = tasklib.find_tasks([task])
tasklib.load_tasks(suite)
best = None
for _ in range(int(repeat)):
    clock = tasklib.timed(lm)
    [r] = tasklib.run_task(lm, suite, suite.specs[0], limit=limit, num_fewshot=fewshot, clock=clock)
    if best is None or r.model_seconds < best.model_seconds:
        best = r
print(json.dumps({"side": side, **info, "load_s": round(load_s, 2), "samples": best.samples,
                  "model_s": round(best.model_seconds, 3), "wall_s": round(best.wall_seconds, 3),
                  "samples_per_s": round(best.samples_per_s, 2),
                  "metrics": {k: round(v, 4) for k, v in best.metrics.items()}}))
'''


def run_side(side: str, model: str, args, env: dict) -> dict:
    cmd = [sys.executable, "-c", SIDE, side, model, args.task, str(args.limit or "none"),
           str("none" if args.num_fewshot is None else args.num_fewshot), str(args.repeat)]
    print(f"{side}: running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_side(gguf: str, args, env: dict, peer_python: str) -> dict:
    """lm-eval's gguf back end (run by our Python: it is the client) against llama-cpp-python's
    server (run by the peer's Python, same threads) on the same file."""
    check = subprocess.run([peer_python, "-c", "import llama_cpp.server.app"], capture_output=True,
                           text=True, env=_peer_env(env))
    if check.returncode != 0:
        return {"side": "llama_cpp", "skipped": f"{peer_python} cannot import llama_cpp.server: "
                                                f"{check.stderr.strip().splitlines()[-1:]}"}
    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [peer_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
         "--logits_all", "true", "--n_ctx", "2048"], stdout=log, stderr=log, env=_peer_env(env))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 2 minutes to load
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"llama_cpp.server exited:\n{log.read().decode()[-2000:]}")
                time.sleep(0.2)
        row = run_side("llama_cpp", url, args, env)
        version = subprocess.run([peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True, env=_peer_env(env)).stdout.strip()
        row["llama_cpp_python"] = version
        return row
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _peer_env(env: dict) -> dict:
    extra = START_ENV.get("HOMELLM_PEER_PYTHONPATH")
    return dict(env, PYTHONPATH=extra) if extra else {k: v for k, v in env.items() if k != "PYTHONPATH"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--hf-export", default=None, metavar="DIR",
                   help="its float32 Hugging Face export (default: written to a temporary folder)")
    p.add_argument("--task", default="homellm_capitals", help="an lm-eval task name or task YAML")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--sides", default="homellm,hf,homellm_hf,llama_cpp")
    args = p.parse_args()
    from homellm.catalog.pypi import cached_default_gguf
    gguf = str(Path(args.model or cached_default_gguf()).resolve())
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    env = dict(START_ENV, OMP_NUM_THREADS=str(args.threads), HOMELLM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        export = args.hf_export
        if export is None and {"hf", "homellm_hf"} & set(sides):
            from homellm.catalog.export import export as write
            export = str(write(gguf, Path(tmp) / "hf", "hf", "float32"))
        rows = {}
        for side in sides:
            if side == "llama_cpp":
                peer = START_ENV.get("HOMELLM_PEER_PYTHON")
                rows[side] = (peer_side(gguf, args, env, peer) if peer else
                              {"side": side, "skipped": "set HOMELLM_PEER_PYTHON to a Python with llama_cpp"})
            else:
                rows[side] = run_side(side, gguf if side == "homellm" else export, args, env)
            print(json.dumps(rows[side]), file=sys.stderr, flush=True)
    ratios = {}
    for peer in ("hf", "homellm_hf", "llama_cpp"):
        if peer in rows and "samples_per_s" in rows[peer] and "homellm" in rows:
            ours, theirs = rows["homellm"], rows[peer]
            ratios[f"homellm_over_{peer}"] = {
                "samples_per_s": round(ours["samples_per_s"] / theirs["samples_per_s"], 2),
                "same_metrics": ours["metrics"] == theirs["metrics"]}
    print(json.dumps({"task": args.task, "limit": args.limit, "num_fewshot": args.num_fewshot,
                      "threads": args.threads, "model": gguf,
                      "omp_wait_policy": START_ENV.get("OMP_WAIT_POLICY", "default"),
                      "load_average": os.getloadavg(), "sides": rows, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
