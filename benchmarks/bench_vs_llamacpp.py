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
       [--gen-tokens 128] [--threads 2] [--repeat 2] [--rounds 1]
       python benchmarks/bench_vs_llamacpp.py --suite DIR   # issue 3's table, below

--kernel-path PATH forces homellm's kernels (HOMELLM_KERNEL_PATH: avx2, avxvnni, ...), e.g. the AVX2
path on a bigger CPU against a peer built for AVX2 only (issue 19):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
  -DGGML_AVX_VNNI=OFF -DGGML_AVX2=ON -DGGML_AVX=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF
  -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python   # (into e.g. /work/peer-avx2)
  python benchmarks/bench_vs_llamacpp.py --kernel-path avx2 --peer-python /work/peer-avx2/bin/python \
      --peer-build "AVX2 only" [--model Q4_K_M.gguf]
Each row then says which targets it meets (decode >= 1.3x, prefill >= 2x, RSS <= 1.1x).

Decode of a small model is bound by memory bandwidth, so each row also carries the machine's
measured read bandwidth (`read_bandwidth`: a small C program, compiled here with the kernels'
compiler, reads a buffer 16x the size of the L3 cache with the same thread count; best of
several passes) and each side's decode as a fraction of it: bytes of weights one decode step
reads (the file's blocks, `homellm bench`'s weight_bytes_per_token: every matrix, a tied
embedding table in full, else one row of it) x decode tok/s / bandwidth. Both sides get the
file's bytes, though homellm's packs of the K-quants are larger (`packed_bytes_per_token`:
what its packed kernels really stream on the path it ran).

--rounds N runs homellm and llama.cpp alternately N times each (each run itself best of
--repeat) and keeps each side's best prefill, decode and smallest RSS: on a shared machine one
side's slow round is the other's noise, not its speed. The load average before and after goes
into the JSON (`loadavg`).

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
import shutil
import subprocess
import sys
import tempfile

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

# Read bandwidth: `threads` threads each stream their own slice of one buffer (uint64 loads
# folded by xor into 8 accumulators, which the compiler vectorizes), all slices at once; the
# best pass of `passes` in GB/s (1e9 bytes). The buffer is touched (written) first, so that its
# pages exist and the passes read memory, not the zero page. It reads as the kernels do: on
# huge pages where the system gives them (numpy asks for them for the packed weights; 4 KB
# pages cost ~25% here in TLB misses) and a software prefetch 4 KB ahead (the hardware
# prefetchers stop at 4 KB boundaries): the best a reader gets, not a naive loop's.
READER = r'''
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
typedef struct { const uint64_t *p; size_t n; uint64_t acc; } job_t;
static void *reader(void *arg) {
    job_t *j = arg;
    uint64_t a[8] = {0};
    for (size_t i = 0; i + 8 <= j->n; i += 8) {
        __builtin_prefetch(j->p + i + 512, 0, 3);  /* 4 KB ahead */
        for (int k = 0; k < 8; k++) a[k] ^= j->p[i + k];
    }
    j->acc = a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
    return NULL;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char **argv) {
    const size_t bytes = (size_t)atoll(argv[1]) << 20;
    const int threads = atoi(argv[2]), passes = atoi(argv[3]);
    const size_t n = bytes / 8, per = n / threads / 8 * 8;
    uint64_t *buf = aligned_alloc(1 << 21, bytes);
    if (!buf || threads < 1 || threads > 256) return 1;
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    pthread_t tid[256]; job_t job[256];
    double best = 0; uint64_t sink = 0;
    for (int r = 0; r < passes; r++) {
        const double t0 = now();
        for (int t = 0; t < threads; t++) {
            job[t] = (job_t){buf + t * per, per, 0};
            pthread_create(&tid[t], NULL, reader, &job[t]);
        }
        for (int t = 0; t < threads; t++) { pthread_join(tid[t], NULL); sink ^= job[t].acc; }
        const double gbps = (double)per * 8 * threads / (now() - t0) / 1e9;
        if (gbps > best) best = gbps;
    }
    printf("{\"read_gbps\": %.2f, \"buffer_mb\": %zu, \"threads\": %d, \"passes\": %d, \"sink\": %llu}\n",
           best, bytes >> 20, threads, passes, (unsigned long long)(sink & 1));
    return 0;
}
'''


def l3_bytes() -> int:
    """The largest cache's size from sysfs (32 MiB where it cannot be read)."""
    from pathlib import Path
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


def read_bandwidth(threads: int, passes: int = 15) -> dict:
    """The machine's memory read bandwidth with `threads` threads (READER, compiled with the
    kernels' C compiler), over a buffer 16x the largest cache (at least 256 MiB)."""
    from homellm.engine.kernels import build
    cc = build.compiler()
    if cc is None:
        raise SystemExit("measuring read bandwidth needs a C compiler (cc/gcc), the one the kernels use")
    mb = max(256, 16 * l3_bytes() >> 20)
    folder = tempfile.mkdtemp(prefix="homellm-bw-")
    try:
        src, exe = os.path.join(folder, "read.c"), os.path.join(folder, "read")
        with open(src, "w") as f:
            f.write(READER)
        res = None
        for march in (["-march=native"], []):  # (a compiler without -march=native: the plain build)
            res = subprocess.run([cc, "-O3", *march, "-pthread", "-o", exe, src], capture_output=True, text=True)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            raise SystemExit(f"{cc} failed on the bandwidth reader: {res.stderr[-2000:]}")
        out = run_json([exe, str(mb), str(threads), str(passes)], dict(START_ENV))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out.pop("sink")
    return out


def packed_bytes_per_token(model: str, kernel_path: str | None) -> int | None:
    """Bytes of the matrices one homellm decode step streams on `kernel_path` (None: this CPU's
    best), packed as that path packs them (hl_packed_bytes; a matrix without a pack as in the
    file): what its decode really reads, beside the file's weight_bytes_per_token. None where
    the path has no packs."""
    import numpy as np

    from homellm.engine.kernels import build
    from homellm.engine.kernels.native import pack_rows
    G = pack_rows(kernel_path)
    lib = build.load()
    if not G or lib is None:
        return None
    from gguf import GGUFReader
    reader = GGUFReader(model)
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if len(t.shape) != 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue  # vectors (norms, biases), and an untied embedding table (one row a step)
        K, N = (int(x) for x in t.shape)  # (gguf lists the row length first)
        packed = lib.hl_packed_bytes(int(t.tensor_type), N, K, G)
        total += packed if packed > 0 else int(np.prod(t.data.shape) * t.data.itemsize)
    return int(total)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def best_of(runs: list[dict]) -> dict:
    """One side's best over rounds: the highest prefill and decode, the smallest peak RSS
    (the rest from the round with the best decode)."""
    best = dict(max(runs, key=lambda r: r["decode_tps"]))
    best["prefill_tps"] = max(r["prefill_tps"] for r in runs)
    best["peak_rss_mb"] = min(r["peak_rss_mb"] for r in runs)
    best["rounds"] = {k: [r[k] for r in runs] for k in ("prefill_tps", "decode_tps")}
    return best


def side_by_side(model: str, prompt_tokens: int, gen_tokens: int, threads: int, repeat: int,
                 peer_python: str, kernel_path: str | None = None,
                 peer_build: str = "llama-cpp-python built with AVX512/VNNI/BF16, AMX off",
                 rounds: int = 1, bandwidth: dict | None = None) -> dict:
    env = dict(START_ENV, OMP_NUM_THREADS=str(threads))
    ours_env = dict(env, HOMELLM_KERNEL_PATH=kernel_path) if kernel_path else env
    load_before = loadavg()
    if bandwidth is None:
        bandwidth = read_bandwidth(threads)
    ours_runs, peer_runs = [], []
    for _ in range(rounds):  # alternately: a busy spell slows one round of each side, not one side
        ours_runs.append(run_json([sys.executable, "-m", "homellm", "bench", "-m", model, "--json",
                                   "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens),
                                   "--repeat", str(repeat)], ours_env))
        peer_runs.append(run_json([peer_python, "-c", PEER, model, str(prompt_tokens), str(gen_tokens),
                                   str(threads), str(repeat)], env))
    ours, peer = (best_of(ours_runs), best_of(peer_runs)) if rounds > 1 else (ours_runs[0], peer_runs[0])
    ratio = {k: round(ours[k] / peer[k], 3) for k in ("prefill_tps", "decode_tps", "peak_rss_mb")}
    meets = {k: ratio[k] <= t if k == "peak_rss_mb" else ratio[k] >= t for k, t in TARGETS.items()}
    wbytes = ours["weight_bytes_per_token"]  # the same file: the same blocks on both sides
    packed = packed_bytes_per_token(model, kernel_path)
    bw = bandwidth["read_gbps"] * 1e9
    fraction = {"homellm": round(wbytes * ours["decode_tps"] / bw, 3),
                "llama_cpp": round(wbytes * peer["decode_tps"] / bw, 3)}
    if packed:
        fraction["homellm_packed_bytes"] = round(packed * ours["decode_tps"] / bw, 3)
    return {"model": model, "threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "kernel_path": kernel_path or "auto", "peer_build": peer_build,
            "omp_wait_policy": START_ENV.get("OMP_WAIT_POLICY", "default"), "rounds": rounds,
            "loadavg": {"before": load_before, "after": loadavg()},
            "read_bandwidth": bandwidth, "weight_bytes_per_token": wbytes, "packed_bytes_per_token": packed,
            "decode_fraction_of_bandwidth": fraction,
            "homellm": ours, "llama_cpp": peer, "ratio_homellm_over_llama_cpp": ratio, "meets_targets": meets}


SUITE = [("default Q4_1", None), ("Q8_0", "smollm2-135m.q8_0.gguf"),
         ("Q4_K_M", "smollm2-135m.q4_k_m.gguf"), ("1B Q4_0", "random-1b.q4_0.gguf")]


def suite(folder: str, threads: int, repeat: int, peer_python: str, kernel_path: str | None = None,
          peer_build: str | None = None, rounds: int = 1):
    from pathlib import Path

    from homellm.catalog.pypi import cached_default_gguf
    rows = []
    bandwidth = read_bandwidth(threads)  # (once: it is the machine's, not the model's)
    for label, name in SUITE:
        path = str(cached_default_gguf()) if name is None else str(Path(folder) / name)
        if not Path(path).exists():
            print(json.dumps({"model": label, "skipped": f"{path} is missing"}), flush=True)
            continue
        for prompt, gen in ((512, 128), (2000, 64)):
            row = side_by_side(path, prompt, gen, threads, repeat, peer_python, kernel_path,
                               **({"peer_build": peer_build} if peer_build else {}), rounds=rounds,
                               bandwidth=bandwidth)
            row["label"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nread bandwidth {bandwidth['read_gbps']:.1f} GB/s ({threads} threads); decode as a fraction of it")
    print(f"{'model':14} {'ctx':>5} {'prefill ours/peer':>22} {'ratio':>6} {'decode ours/peer':>18} "
          f"{'ratio':>6} {'of bw ours/peer':>16} {'RSS MB ours/peer':>18} {'ratio':>6}")
    for r in rows:
        o, q, x = r["homellm"], r["llama_cpp"], r["ratio_homellm_over_llama_cpp"]
        f = r["decode_fraction_of_bandwidth"]
        print(f"{r['label']:14} {r['prompt_tokens']:>5} {o['prefill_tps']:>10.0f}/{q['prefill_tps']:<11.0f} "
              f"{x['prefill_tps']:>6.2f} {o['decode_tps']:>8.1f}/{q['decode_tps']:<9.1f} {x['decode_tps']:>6.2f} "
              f"{f['homellm']:>8.2f}/{f['llama_cpp']:<7.2f} "
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
    p.add_argument("--rounds", type=int, default=1,
                   help="run both sides alternately this many times and keep each side's best")
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.suite:
        return suite(args.suite, args.threads, args.repeat, args.peer_python, args.kernel_path, args.peer_build,
                     args.rounds)
    if args.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        args.model = str(cached_default_gguf())
    print(json.dumps(side_by_side(args.model, args.prompt_tokens, args.gen_tokens, args.threads,
                                  args.repeat, args.peer_python, args.kernel_path,
                                  **({"peer_build": args.peer_build} if args.peer_build else {}),
                                  rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
