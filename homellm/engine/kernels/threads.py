"""How many threads the C kernels run on, and what their thread pool did (thread_pool.h).

The kernels share one pool of threads a process. It uses at most the threads a call asks for,
and fewer while the machine does not give it the CPUs (another program busy on them); it tries
more again every so often, so full speed comes back once the machine is free. `pool_stats()`
says how often it did which.
"""
from __future__ import annotations

import os

from homellm.errors import HomellmError

STATS = ("jobs", "team_jobs", "shrinks", "grows", "probes", "probe_fails", "sleeps", "wakes",
         "create_fails", "wait_ns", "team_ns", "thread_ns", "limit", "created")


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


def pool_stats() -> dict:
    """The pool's counters since the process started (or `pool_reset`): jobs (calls that asked
    for more than one thread), team_jobs (those run on more than one), shrinks / grows (times it
    took fewer threads / more again), probes and probe_fails (trials of one thread fewer or
    more, and those not kept), sleeps and wakes (futex waits and wake-ups), wait_ns (time the
    calling thread waited for the others), limit (the threads it allows now; 256: no limit),
    created (threads started), and threads_used: the average threads of the jobs, weighted by
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
              probe_max_ms: float | None = None):
    """Change the pool's settings (thread_pool.h, hl_pool_tune); None leaves one as it is."""
    from homellm.engine.kernels import build
    lib = build.load()
    if lib is not None:
        values = (spin_job_us, spin_step_us, window_us, shrink_pct, grow_pct, probe_ms, probe_max_ms)
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
