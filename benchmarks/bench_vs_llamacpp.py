"""homellm against llama.cpp (llama-cpp-python) on the same GGUF file, side by side, one run.

Each side runs in its own process (so peak RSS is its own), on the same fixed prompt ids,
with the same thread count; decoding is greedy and ignores end-of-sequence. Prints JSON with
both results and the ratios homellm / llama.cpp.

The peer lives in a virtualenv outside the repo (HOMELLM_PEER_PYTHON, default
/root/peers/llamacpp/bin/python), built without AMX (AMX crashes in these VMs):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
  -DGGML_AMX_BF16=OFF" pip install llama-cpp-python

usage: python benchmarks/bench_vs_llamacpp.py [--model PATH] [--prompt-tokens 512]
       [--gen-tokens 128] [--threads 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PEER = r'''
import json, resource, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama, __version__
path, n_prompt, n_gen, threads, repeat = sys.argv[1], *map(int, sys.argv[2:6])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=n_prompt + n_gen, n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, verbose=False)
load_s = time.perf_counter() - t0
vocab = llm.n_vocab()
span = max(vocab - 1000, 1)
ids = [1000 % vocab + (i * 7919) % span for i in range(n_prompt)]
def last_logits():  # logits of the last evaluated token (the only ones computed)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))
best = None
for _ in range(repeat):
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); prefill_s = time.perf_counter() - t
    tok = int(np.argmax(last_logits()))
    t = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    decode_s = time.perf_counter() - t
    run = {"prefill_tps": n_prompt / prefill_s, "decode_tps": (n_gen - 1) / decode_s}
    best = run if best is None else {k: max(best[k], run[k]) for k in run}
print(json.dumps({"llama_cpp_python": __version__, "load_s": round(load_s, 3),
                  "prefill_tps": round(best["prefill_tps"], 2), "decode_tps": round(best["decode_tps"], 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
'''


def run_json(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--peer-python", default=os.environ.get("HOMELLM_PEER_PYTHON",
                                                           "/root/peers/llamacpp/bin/python"))
    args = p.parse_args()
    if args.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        args.model = str(cached_default_gguf())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    ours = run_json([sys.executable, "-m", "homellm", "bench", "-m", args.model, "--json",
                     "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                     "--repeat", str(args.repeat)], env)
    peer = run_json([args.peer_python, "-c", PEER, args.model, str(args.prompt_tokens),
                     str(args.gen_tokens), str(args.threads), str(args.repeat)], env)
    ratio = {k: round(ours[k] / peer[k], 3) for k in ("prefill_tps", "decode_tps", "peak_rss_mb")}
    print(json.dumps({"model": args.model, "threads": args.threads,
                      "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                      "peer_build": "llama-cpp-python built with AVX512/VNNI/BF16, AMX off",
                      "homellm": ours, "llama_cpp": peer, "ratio_homellm_over_llama_cpp": ratio},
                     indent=2))


if __name__ == "__main__":
    main()
