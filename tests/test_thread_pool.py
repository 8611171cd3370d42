"""The C kernels' thread pool (engine/kernels/thread_pool.h) and the thread count's setting.

Results: every item of work is computed by one thread in one piece, so prefill, decode and the
KV cache are bit-identical whatever the number of threads, whoever is slow, and whoever calls.
Busy machines: a pool thread made to stall (a debug hook: it sleeps holding each chunk it
takes, as a thread the scheduler took off its CPU) makes the pool run on fewer threads, probes
for more keep failing while it stalls, and the pool takes its threads back once it stops.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import gguf
import numpy as np
import pytest

from homellm.engine import kernels
from homellm.engine.kernels import threads as pool
from homellm.engine.kernels.native import NativeModel
from homellm.errors import HomellmError

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA  # noqa: E402
from test_kernels import quantized_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")

# big enough for several chunks a phase, two M chunks of prefill and many attention tiles
ARGS = dataclasses.replace(TINY_LLAMA, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                           intermediate_size=768, vocab_size=2048, num_hidden_layers=3,
                           max_position_embeddings=512)
PROMPT = [(i * 7919 + 11) % ARGS.vocab_size for i in range(150)]


@pytest.fixture(scope="module")
def tensors():
    return quantized_tensors(ARGS, Q.Q4_1)


@pytest.fixture(autouse=True)
def fresh_pool():
    pool.pool_reset()
    yield
    for t in range(1, 8):
        pool.pool_debug_stall(t, 0)
    pool.pool_reset()


def run(model: NativeModel, n_decode: int = 6) -> tuple[np.ndarray, ...]:
    """Prefill logits of every position, greedy decode logits, the keys of the first layer and
    the values of the last, as far as they are written."""
    pre = model.forward(PROMPT, 0, last_only=False)
    tok, steps = int(pre[-1].argmax()), []
    for p in range(len(PROMPT), len(PROMPT) + n_decode):
        logits = model.decode(tok, p)
        steps.append(logits.copy())
        tok = int(logits.argmax())
    n = len(PROMPT) + n_decode
    return pre, np.stack(steps), model.k[0][:, :n].copy(), model.v[-1][:, :n].copy()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "raw-blocks"])
def test_results_identical_with_1_2_3_7_threads(tensors, packed):
    pool.pool_tune(shrink_pct=100)  # keep every team as asked: 7 threads on 7 threads
    ref = run(NativeModel(ARGS, tensors, 200, threads=1, packed=packed))
    for n in (2, 3, 7):
        got = run(NativeModel(ARGS, tensors, 200, threads=n, packed=packed))
        for a, b in zip(ref, got):
            assert np.array_equal(a, b), n
    stats = pool.pool_stats()
    assert stats["created"] >= 6 and stats["team_jobs"] > 0 and stats["shrinks"] == 0


def test_a_stalled_thread_shrinks_the_pool_and_it_grows_back(tensors):
    ref = run(NativeModel(ARGS, tensors, 200, threads=1))
    model = NativeModel(ARGS, tensors, 200, threads=2)
    pool.pool_tune(window_us=2000, probe_ms=5, probe_max_ms=10, shrink_pct=30)
    pool.pool_debug_stall(1, 2000)  # thread 1 sleeps 2 ms holding each chunk it takes
    deadline = time.monotonic() + 60

    def stalled_out(st):
        return st["probe_fails"] >= 2 and st["limit"] == 1

    while not stalled_out(pool.pool_stats()) and time.monotonic() < deadline:
        model.reset()
        got = run(model)
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)  # a stalled thread changes nothing but the time
    stats = pool.pool_stats()
    # one thread, and probes of two failed (a probe in which thread 1 happened to take no
    # chunk may pass, and the next window takes it back)
    assert stalled_out(stats) and stats["shrinks"] == stats["grows"] + 1, stats

    pool.pool_debug_stall(1, 0)
    # a probe keeps the thread even if two threads run this tiny model no faster than one
    # (they might, on a busy machine): the test is of probing, not of this machine's speed
    pool.pool_tune(grow_pct=-100)
    grows = stats["grows"]
    while pool.pool_stats()["limit"] == 1 and time.monotonic() < deadline:
        model.reset()
        run(model)
    stats = pool.pool_stats()
    assert stats["grows"] == grows + 1 and stats["limit"] > 1, stats


def test_an_idle_pool_forgets_the_team_a_load_made_it_take(tensors):
    """A limit learned under a load holds while jobs keep coming (probes for more are what
    lift it), and goes after an idle while: the next job runs on the team it asks for again.
    Here the probes could not lift it (a thread more must run 10x faster)."""
    model = NativeModel(ARGS, tensors, 200, threads=2)
    pool.pool_tune(window_us=2000, probe_ms=5, probe_max_ms=10, shrink_pct=30, idle_ms=300)
    pool.pool_debug_stall(1, 2000)
    deadline = time.monotonic() + 60
    while pool.pool_stats()["limit"] != 1 and time.monotonic() < deadline:
        model.reset()
        run(model)
    assert pool.pool_stats()["limit"] == 1
    pool.pool_debug_stall(1, 0)
    pool.pool_tune(grow_pct=1000)
    busy_until = time.monotonic() + 0.5
    while time.monotonic() < busy_until:  # jobs back to back: no idle while, the limit stays
        model.reset()
        run(model)
    stats = pool.pool_stats()
    assert stats["limit"] == 1 and stats["idle_resets"] == 0, stats
    time.sleep(0.4)
    model.reset()
    model.forward([1, 2, 3], 0)
    stats = pool.pool_stats()
    assert stats["idle_resets"] == 1 and stats["limit"] > 1, stats


def test_callers_in_several_threads_get_the_same_results(tensors):
    """The pool serves one caller at a time; a second caller meanwhile runs its work itself."""
    ref = run(NativeModel(ARGS, tensors, 200, threads=1))
    models = [NativeModel(ARGS, tensors, 200, threads=2) for _ in range(3)]
    bad = []

    def work(m):
        for _ in range(3):
            m.reset()
            got = run(m)
            if not all(np.array_equal(a, b) for a, b in zip(ref, got)):
                bad.append(m)

    ts = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not bad and not any(t.is_alive() for t in ts)


CHILD = r"""
import ctypes, os, resource, sys
import numpy as np
from homellm.engine.kernels import build
lib = build.load()
x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
w = np.random.default_rng(1).integers(0, 256, (512, 8 * 34), dtype=np.uint8)
w.reshape(512, 8, 34)[:, :, 1] = 0x20  # Q8_0 scales: small normal halves
def matmul(threads):
    y = np.empty((64, 512), np.float32)
    assert lib.hl_matmul(x.ctypes.data, 64, 256, w.ctypes.data, w.strides[0], 8, 512, y.ctypes.data,
                         threads, -1, 1) == 0
    return y
ref = matmul(1)
mode = sys.argv[1]
if mode == "cap":  # address space for a few more threads' stacks, not for 255
    size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), size + (64 << 20)))
    assert np.array_equal(matmul(1000), ref)
    st = (ctypes.c_int64 * 16)(); lib.hl_pool_stats(st, 16)
    print("create_fails", st[8], "created", st[13])
else:  # fork: the child has no pool threads, and starts its own
    assert np.array_equal(matmul(2), ref)
    pid = os.fork()
    if pid == 0:
        signal = __import__("signal"); signal.alarm(60)
        os._exit(0 if np.array_equal(matmul(2), ref) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert np.array_equal(matmul(2), ref)
    print("fork ok")
"""


def test_more_threads_than_the_system_gives_degrades_cleanly():
    """1000 threads asked under an address-space cap: the pool starts what it can (at most 255
    workers) and the result is the same; the process does not die."""
    out = subprocess.run([sys.executable, "-c", CHILD, "cap"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    assert int(words[1]) >= 1 and int(words[3]) < 255, out.stdout  # some creations failed


def test_a_forked_child_runs_its_own_pool():
    out = subprocess.run([sys.executable, "-c", CHILD, "fork"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fork ok" in out.stdout, out.stderr[-2000:]


STRESS = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "thread_pool.h"
/* random jobs (0 to 270,000 items a phase, 1 to 12 phases, 1 to 4 threads, stalls now and then):
 * every item must run exactly once, each close once, after all of its phase's items and before
 * any item of the next phase */
typedef struct { int n[16], *count[16], closed[16], bad; } T;
static int items(void *a, int p) { return ((T *)a)->n[p]; }
static void run(void *a, int p, int i0, int i1, int tid) {
    T *t = a;
    if (p > 0 && !__atomic_load_n(&t->closed[p - 1], __ATOMIC_ACQUIRE)) t->bad = 1;
    for (int i = i0; i < i1; i++) __atomic_fetch_add(&t->count[p][i], 1, __ATOMIC_RELAXED);
    if ((i0 * 7 + tid) % 13 == 0) for (volatile int k = 0; k < 200; k++) {}
}
static void close_(void *a, int p) {
    T *t = a;
    for (int i = 0; i < t->n[p]; i++) if (__atomic_load_n(&t->count[p][i], __ATOMIC_RELAXED) != 1) t->bad = 2;
    if (t->closed[p]) t->bad = 3;
    __atomic_store_n(&t->closed[p], 1, __ATOMIC_RELEASE);
}
int main(void) {
    srand(1);
    hl_pool_tune(-1000, 50, 200, 10, -1000, 1, 5, 2);  /* short windows: many trials; idle resets */
    for (int r = 0; r < 4000; r++) {
        T t = {0};
        const int nph = 1 + rand() % 12;
        for (int p = 0; p < nph; p++) {
            const int k = rand() % 10;
            t.n[p] = k == 0 ? 0 : k == 1 ? 1 : k < 8 ? rand() % 50 : rand() % 100000;
            if (rand() % 300 == 0) t.n[p] = 70000 + rand() % 200000;  /* more than 65535 units */
            t.count[p] = calloc(t.n[p] + 1, sizeof(int));
        }
        if (r % 500 == 0) hl_pool_debug_stall(1 + rand() % 3, r % 1000 ? 0 : 300);
        const job_t j = {nph, items, run, close_, &t};
        pool_run(&j, 1 + rand() % 4);
        for (int p = 0; p < nph; p++) {
            for (int i = 0; i < t.n[p]; i++)
                if (t.count[p][i] != 1) { printf("job %d phase %d item %d: %d times\n", r, p, i, t.count[p][i]); return 1; }
            if (!t.closed[p]) { printf("job %d phase %d not closed\n", r, p); return 1; }
            free(t.count[p]);
        }
        if (t.bad) { printf("job %d: check %d failed\n", r, t.bad); return 1; }
    }
    int64_t st[16];
    hl_pool_stats(st, 16);
    printf("ok %lld\n", (long long)st[1]);
    return 0;
}
"""


@pytest.mark.slow
def test_every_item_runs_once_under_random_jobs(tmp_path):
    """The pool on its own, compiled with its header: 4,000 random jobs."""
    from homellm.engine.kernels import build
    cc = build.compiler()
    src = tmp_path / "stress.c"
    src.write_text(STRESS)
    exe = tmp_path / "stress"
    res = subprocess.run([cc, "-O2", "-pthread", f"-I{build.SOURCE.parent}", "-o", str(exe), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) > 1000  # jobs that ran on more than one thread


# --- beside PyTorch -----------------------------------------------------------------------------

def test_a_torch_network_on_the_kernels_runs_its_torch_ops_on_one_thread(tensors):
    """While a network whose matmuls are the C kernels runs, the calling thread's own torch ops
    go on one OpenMP thread (torch's team spinning between them took the cores from the pool:
    decode 17-20 tok/s instead of 50); before and after, and in a float network, torch keeps
    its count, and an error inside the network gives it back too."""
    import torch
    start = torch.get_num_threads()
    torch.set_num_threads(max(2, start))  # (a count the test can tell from one)
    try:
        check_one_thread_inside(tensors)
    finally:
        torch.set_num_threads(start)


def check_one_thread_inside(tensors):
    import torch
    from torch import nn

    from homellm.engine.loader import build_model
    from homellm.model.formats.checkpoint import Checkpoint
    before = torch.get_num_threads()
    seen = []
    quantized = build_model(Checkpoint(ARGS, tensors, None, None, "tiny.gguf", "gguf"), "cpu")
    floats = build_model(Checkpoint(ARGS, {k: v.dequantize() if hasattr(v, "dequantize") else v
                                           for k, v in tensors.items()}, None, None, "tiny.gguf", "gguf"),
                         "cpu", quant="none")
    assert isinstance(floats.lm_head, nn.Linear)
    for net in (quantized, floats):
        net.model.norm.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    ids = torch.tensor([PROMPT[:20]])
    with torch.inference_mode():
        quantized(ids)
        assert torch.get_num_threads() == before
        floats(ids)
        assert torch.get_num_threads() == before
        with pytest.raises(IndexError):
            quantized(torch.tensor([[ARGS.vocab_size + 5]]))  # an error inside the network
    assert torch.get_num_threads() == before
    assert seen == [1, before]


# --- HOMELLM_THREADS ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", "-3", "0", "2.5", "1e3"])
def test_homellm_threads_must_be_a_whole_number(monkeypatch, value):
    monkeypatch.setenv("HOMELLM_THREADS", value)
    with pytest.raises(HomellmError, match=f"HOMELLM_THREADS='{value}': expected a whole number"):
        pool.default_threads()


def test_homellm_threads_is_capped_to_the_cpus(monkeypatch):
    monkeypatch.setenv("HOMELLM_THREADS", "1000")
    assert pool.default_threads() == pool.usable_cpus()
    monkeypatch.setenv("HOMELLM_THREADS", " 1 ")
    assert pool.default_threads() == 1
    monkeypatch.delenv("HOMELLM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")  # OpenMP's own syntax is not ours to judge
    assert pool.default_threads() == pool.physical_cores()


def test_a_bad_homellm_threads_is_an_error_line(default_gguf, homellm_home):
    env = {**os.environ, "HOMELLM_THREADS": "abc"}
    out = subprocess.run([sys.executable, "-m", "homellm", "run", "-m", str(default_gguf), "hi"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: HOMELLM_THREADS='abc'"), out.stderr
    assert "Traceback" not in out.stderr
