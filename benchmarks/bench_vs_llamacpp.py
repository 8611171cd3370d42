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
       python benchmarks/bench_vs_llamacpp.py --suite DIR   # issue 3's table, below

--kernel-path PATH forces homellm's kernels (HOMELLM_KERNEL_PATH: avx2, avxvnni, ...), e.g. the AVX2
path on a bigger CPU against a peer built for AVX2 only (issue 19):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
  -DGGML_AVX_VNNI=OFF -DGGML_AVX2=ON -DGGML_AVX=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF
  -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python   # (into e.g. /work/peer-avx2)
  python benchmarks/bench_vs_llamacpp.py --kernel-path avx2 --peer-python /work/peer-avx2/bin/python \
      --peer-build "AVX2 only" [--model Q4_K_M.gguf]
Each row then says which targets it meets (decode >= 1.3x, prefill >= 2x, RSS <= 1.1x).

--suite DIR runs every model of issue 3 at a 512-token prompt (128 decoded) and again at 2000
tokens of context (64 decoded): the default model (Q4_1), its Q8_0 and Q4_K_M versions and
the random 1B LLaMA (Q4_0) found in DIR (make them with benchmarks/make_variants.py DIR and
benchmarks/make_1b_gguf.py DIR/random-1b.q4_0.gguf), and prints one JSON row per run plus a
text table of the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# both sides get the caller's environment as it was before anything was imported (an import of
# homellm that set an OpenMP variable would otherwise reach the peer too)
START_ENV = dict(os.environ)

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


TARGETS = {"decode_tps": 1.3, "prefill_tps": 2.0, "peak_rss_mb": 1.1}  # (RSS: at most)


def side_by_side(model: str, prompt_tokens: int, gen_tokens: int, threads: int, repeat: int,
                 peer_python: str, kernel_path: str | None = None,
                 peer_build: str = "llama-cpp-python built with AVX512/VNNI/BF16, AMX off") -> dict:
    env = dict(START_ENV, OMP_NUM_THREADS=str(threads))
    ours_env = dict(env, HOMELLM_KERNEL_PATH=kernel_path) if kernel_path else env
    ours = run_json([sys.executable, "-m", "homellm", "bench", "-m", model, "--json",
                     "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens),
                     "--repeat", str(repeat)], ours_env)
    peer = run_json([peer_python, "-c", PEER, model, str(prompt_tokens), str(gen_tokens), str(threads),
                     str(repeat)], env)
    ratio = {k: round(ours[k] / peer[k], 3) for k in ("prefill_tps", "decode_tps", "peak_rss_mb")}
    meets = {k: ratio[k] <= t if k == "peak_rss_mb" else ratio[k] >= t for k, t in TARGETS.items()}
    return {"model": model, "threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "kernel_path": kernel_path or "auto", "peer_build": peer_build,
            "omp_wait_policy": START_ENV.get("OMP_WAIT_POLICY", "default"),
            "homellm": ours, "llama_cpp": peer, "ratio_homellm_over_llama_cpp": ratio, "meets_targets": meets}


SUITE = [("default Q4_1", None), ("Q8_0", "smollm2-135m.q8_0.gguf"),
         ("Q4_K_M", "smollm2-135m.q4_k_m.gguf"), ("1B Q4_0", "random-1b.q4_0.gguf")]


def suite(folder: str, threads: int, repeat: int, peer_python: str, kernel_path: str | None = None,
          peer_build: str | None = None):
    from pathlib import Path

    from homellm.catalog.pypi import cached_default_gguf
    rows = []
    for label, name in SUITE:
        path = str(cached_default_gguf()) if name is None else str(Path(folder) / name)
        if not Path(path).exists():
            print(json.dumps({"model": label, "skipped": f"{path} is missing"}), flush=True)
            continue
        for prompt, gen in ((512, 128), (2000, 64)):
            row = side_by_side(path, prompt, gen, threads, repeat, peer_python, kernel_path,
                               **({"peer_build": peer_build} if peer_build else {}))
            row["label"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':14} {'ctx':>5} {'prefill ours/peer':>22} {'ratio':>6} {'decode ours/peer':>18} "
          f"{'ratio':>6} {'RSS MB ours/peer':>18} {'ratio':>6}")
    for r in rows:
        o, q, x = r["homellm"], r["llama_cpp"], r["ratio_homellm_over_llama_cpp"]
        print(f"{r['label']:14} {r['prompt_tokens']:>5} {o['prefill_tps']:>10.0f}/{q['prefill_tps']:<11.0f} "
              f"{x['prefill_tps']:>6.2f} {o['decode_tps']:>8.1f}/{q['decode_tps']:<9.1f} {x['decode_tps']:>6.2f} "
              f"{o['peak_rss_mb']:>8.0f}/{q['peak_rss_mb']:<9.0f} {x['peak_rss_mb']:>6.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--peer-python", default=os.environ.get("HOMELLM_PEER_PYTHON",
                                                           "/root/peers/llamacpp/bin/python"))
    p.add_argument("--suite", metavar="DIR", help="issue 3's table over the models in DIR")
    p.add_argument("--kernel-path", default=None,
                   help="force homellm's kernels (HOMELLM_KERNEL_PATH: avx2, avxvnni, avx512, ...)")
    p.add_argument("--peer-build", default=None, help="how the peer was built (a label for the JSON)")
    args = p.parse_args()
    if args.suite:
        return suite(args.suite, args.threads, args.repeat, args.peer_python, args.kernel_path, args.peer_build)
    if args.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        args.model = str(cached_default_gguf())
    print(json.dumps(side_by_side(args.model, args.prompt_tokens, args.gen_tokens, args.threads,
                                  args.repeat, args.peer_python, args.kernel_path,
                                  **({"peer_build": args.peer_build} if args.peer_build else {})), indent=2))


if __name__ == "__main__":
    main()
