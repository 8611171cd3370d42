"""How many threads the C kernels run on, and what their thread pool did (thread_pool.h).

The kernels share one pool of threads a process. It uses at most the threads a call asks for,
and fewer while the machine does not give it the CPUs (another program busy on them); it tries
more again every so often, so full speed comes back once the machine is free. `pool_stats()`
says how often it did which.
"""
from __future__ import annotations

import os
import threading

from homellm.errors import HomellmError

STATS = ("jobs", "team_jobs", "shrinks", "grows", "probes", "probe_fails", "sleeps", "wakes",
         "create_fails", "wait_ns", "team_ns", "thread_ns", "limit", "created", "idle_resets")


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def physical_cores() -> int:
    """Cores (not hyperthread siblings) among the CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores) or (os.cpu_count() or 1))


def default_threads() -> int:
    """Threads for the C runtime: $HOMELLM_THREADS (a whole number >= 1; more than the CPUs this
    process may use is capped to them), else $OMP_NUM_THREADS where it is one such number, else
    one per physical core this process may run on (hyperthread siblings slow integer matmuls
    down). Raises HomellmError for a $HOMELLM_THREADS that is not a whole number >= 1."""
    raw = os.environ.get("HOMELLM_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise HomellmError(f"HOMELLM_THREADS={raw!r}: expected a whole number of threads >= 1 "
                               f"(this machine lets the process use {usable_cpus()} CPUs)")
        return min(n, usable_cpus())
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return min(int(omp), usable_cpus())
    return physical_cores()


_KERNEL_THREADS: dict = {}


def kernel_threads() -> int:
    """default_threads(), remembered per value of the environment variables it reads: the
    threads of a kernel call that does not say (called for every layer of every step)."""
    key = (os.environ.get("HOMELLM_THREADS"), os.environ.get("OMP_NUM_THREADS"))
    if key not in _KERNEL_THREADS:
        _KERNEL_THREADS[key] = default_threads()
    return _KERNEL_THREADS[key]


def network_threads(model) -> int:
    """The threads a PyTorch network computes with on the CPU: its C-kernel layers' (they do the
    matmuls; the thread's own torch ops run on one, see torch_ops_on_one_thread), else torch's."""
    from homellm.engine.kernels.ggml_linear import GGMLLinear
    layer = next((m for m in model.modules() if isinstance(m, GGMLLinear)), None)
    if layer is not None:
        return layer.threads or kernel_threads()
    import torch
    return torch.get_num_threads()


def pool_stats() -> dict:
    """The pool's counters since the process started (or `pool_reset`): jobs (calls that asked
    for more than one thread), team_jobs (those run on more than one), shrinks / grows (times it
    took fewer threads / more again), probes and probe_fails (trials of one thread fewer or
    more, and those not kept), sleeps and wakes (futex waits and wake-ups), wait_ns (time the
    calling thread waited for the others), limit (the threads it allows now; 256: no limit),
    created (threads started), idle_resets (times a job after an idle while took the whole team
    again, forgetting a limit), and threads_used: the average threads of the jobs, weighted by
    their time. {} without kernels."""
    import ctypes

    from homellm.engine.kernels import build
    lib = build.load()
    if lib is None:
        return {}
    buf = (ctypes.c_int64 * len(STATS))()
    n = lib.hl_pool_stats(buf, len(STATS))
    out = dict(zip(STATS[:n], buf[:n]))
    out["threads_used"] = round(out["thread_ns"] / out["team_ns"], 2) if out.get("team_ns") else None
    return out


def pool_tune(spin_job_us: float | None = None, spin_step_us: float | None = None,
              window_us: float | None = None, shrink_pct: float | None = None,
              grow_pct: float | None = None, probe_ms: float | None = None,
              probe_max_ms: float | None = None, idle_ms: float | None = None):
    """Change the pool's settings (thread_pool.h, hl_pool_tune); None leaves one as it is."""
    from homellm.engine.kernels import build
    lib = build.load()
    if lib is not None:
        values = (spin_job_us, spin_step_us, window_us, shrink_pct, grow_pct, probe_ms, probe_max_ms, idle_ms)
        lib.hl_pool_tune(*(-1000.0 if v is None else float(v) for v in values))


def pool_reset():
    """Forget what the pool learned (its thread limit), its counters and pool_tune's settings."""
    from homellm.engine.kernels import build
    lib = build.load()
    if lib is not None:
        lib.hl_pool_reset()


def pool_debug_stall(thread: int, us: int):
    """Make pool thread `thread` (1, 2, ...: not the caller's) sleep `us` microseconds holding
    each chunk of work it takes, as if the machine took its CPU away (tests); 0 stops it."""
    from homellm.engine.kernels import build
    lib = build.load()
    if lib is not None:
        lib.hl_pool_debug_stall(thread, us)


_torch_omp: list = []  # torch's libgomp (omp_set_num_threads), found once
_local = threading.local()


def _torch_set_threads(n: int) -> bool:
    """omp_set_num_threads(n) for the calling thread in torch's OpenMP runtime (torch's own
    setting and other threads stay as they are); False where torch has none (no libgomp)."""
    import torch
    if not getattr(_local, "warm", False):
        torch.zeros(1 << 16).sum()  # torch sets this thread's count on its first parallel op
        _local.warm = True
    if not _torch_omp:
        import ctypes
        import glob
        libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for path in sorted(glob.glob(os.path.join(libdir, "libgomp*.so*"))):
            try:
                _torch_omp.append(ctypes.CDLL(path).omp_set_num_threads)
                break
            except (OSError, AttributeError):
                continue
        else:
            _torch_omp.append(None)
    if _torch_omp[0] is None:
        return False
    _torch_omp[0](n)
    return torch.get_num_threads() == n


def torch_ops_on_one_thread() -> bool:
    """Run the calling thread's PyTorch ops on one OpenMP thread from now on (a thread that
    only runs a network whose matmuls are the C kernels, such as the server's engine thread).
    Returns whether it took effect."""
    return _torch_set_threads(1)


def torch_beside_kernels(model) -> bool:
    """Where every projection of a PyTorch network is a C-kernel layer (GGMLLinear), run the
    calling thread's own torch ops on one OpenMP thread while the network runs, and give it its
    count back after (forward hooks on the network): those ops (norms, RoPE, adds, LoRA) are
    light, and torch's OpenMP team spinning on the cores between them takes them from the
    kernels' thread pool (decode of such a network 17-20 tok/s instead of 50, prefill halved).
    Returns whether the hooks were set."""
    from homellm.engine.kernels.ggml_linear import FusedProjection, GGMLLinear
    layers = getattr(getattr(model, "model", None), "layers", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if layers is None or not isinstance(getattr(model, "lm_head", None), GGMLLinear):
        return False
    for layer in layers:
        parts = [getattr(layer.self_attn, n, None) for n in names[:4]] + \
                [getattr(layer.mlp, n, None) for n in names[4:]]
        if not all(isinstance(m, (GGMLLinear, FusedProjection)) for m in parts):
            return False

    def before(module, args):
        import torch
        stack = getattr(_local, "saved", None)
        if stack is None:
            stack = _local.saved = []
        stack.append(torch.get_num_threads())
        _torch_set_threads(1)

    def after(module, args, output):
        stack = getattr(_local, "saved", None)
        if stack:
            _torch_set_threads(stack.pop())

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after, always_call=True)
    return True
