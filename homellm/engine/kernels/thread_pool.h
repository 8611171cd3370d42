/* homellm's thread pool for the C kernels (included once, by ggml_cpu.c; pthreads and futexes).
 *
 * A job is a sequence of phases; phase p has items(p) items, run(p, i0, i1) computes items
 * i0..i1-1 and close(p) runs once after the phase's last item, on the thread that finished it
 * (the serial step between two parallel loops: a norm, a quantization). Each thread has a share
 * of a phase's items (an equal, contiguous part, as OpenMP's static schedule), takes it from the
 * front a few chunks at a time, then takes half of what is left of another thread's share from
 * the back, until nothing is left. Threads wait for a phase's items to be done, never for
 * another thread to arrive: a thread that the scheduler took off the CPU holds up only the
 * chunk it holds; the others do the rest of its share, and of the next phases' shares, and it
 * joins again when it runs. Every item is computed by exactly one thread in one piece, so the
 * results do not depend on which thread or how many.
 *
 * Waiting: spin a short while (`spin_step_us` inside a job, `spin_job_us` between jobs, so the
 * short gaps between a decode step's calls cost no wake-up), then sleep on a futex.
 *
 * Busy machines: OpenMP-style teams spin away whole time slices when the scheduler takes one of
 * their threads off its CPU (decode beside a one-core hog fell to 0.2x). Here the caller's
 * thread measures how long it waited for chunks other threads held, over windows of
 * `window_us` of jobs. When that is over `shrink_pct` of a window, it tries one thread fewer
 * for a window and keeps that if the same kinds of jobs ran no slower (the pool is not getting
 * the CPUs it asks for). While it runs fewer threads than callers ask for, it tries one more
 * every `probe_ms` and keeps it if jobs ran at least `grow_pct` faster: full speed again once
 * the machine is free. A trial that fails waits twice as long before the next, up to
 * `probe_max_ms`. One thread runs a job inline, without waking anyone.
 *
 * Phases are numbered globally (phase id = job base + p), and a share carries its phase's id: a
 * thread that was off the CPU while its job ended finds later ids and takes nothing.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define POOL_MAX 256  /* threads of one job at most, the caller's included */
#define POOL_RING 4   /* phase slots (phase id % POOL_RING) */
#define UMAX 65535    /* units a phase at most (a unit: ceil(items / UMAX) items) */

/* a thread's share of the open phase, one word: phase tag (its id's low 32 bits) | front | back;
 * the owner takes units from the front, others from the back */
#define RW(t, f, b) ((uint64_t)(t) << 32 | (uint64_t)(f) << 16 | (uint64_t)(b))
#define RT(w) ((uint32_t)((w) >> 32))
#define RF(w) ((int)((w) >> 16 & 0xffff))
#define RB(w) ((int)((w) & 0xffff))

typedef struct {
    int nph;
    int (*items)(void *arg, int p);
    void (*run)(void *arg, int p, int i0, int i1, int tid);
    void (*close)(void *arg, int p);  /* may be NULL */
    void *arg;
} job_t;

typedef struct {
    _Alignas(64) int units, unit, n;  /* written by the thread that opens the phase, before `cur` */
    _Alignas(64) uint32_t done;       /* units done */
} slot_t;

typedef struct {
    _Alignas(64) uint64_t share;      /* RW(): this thread's share of the open phase */
    _Alignas(64) uint32_t futex, sleeping;
    int stall_us;  /* debug: sleep this long holding each chunk (tests of the busy-machine logic) */
} worker_t;

enum { ST_JOBS, ST_TEAM_JOBS, ST_SHRINKS, ST_GROWS, ST_PROBES, ST_PROBE_FAILS, ST_SLEEPS, ST_WAKES,
       ST_CREATE_FAILS, ST_WAIT_NS, ST_TEAM_NS, ST_THREAD_NS, ST_LIMIT, ST_CREATED, ST_IDLE_RESETS, ST_COUNT };

static struct {
    _Alignas(64) uint32_t jobgen;  /* 0 while the job below is being written (a seqlock) */
    job_t job;
    int nt;
    uint64_t base;
    _Alignas(64) uint64_t cur;     /* the open phase's id; >= the job's end once it is done */
    _Alignas(64) uint32_t ev, ev_sleepers;
    _Alignas(64) uint32_t busy;    /* a caller owns the pool (another one runs its job inline) */
    slot_t ring[POOL_RING];
    worker_t w[POOL_MAX];
    int created;                   /* workers 1..created exist */
    uint64_t next_id;
    /* settings (hl_pool_tune) */
    int64_t spin_job_ns, spin_step_ns, window_ns, probe_ns, probe_max_ns, idle_ns;
    double shrink, grow;
    /* adaptation (the owner's thread only): jobs' times by kind in two arms, the window of the
     * current team (0) and of the team on trial (1) */
    int limit, trial, arm_team;
    int64_t arm_ns[2], win_wait, up_gap, up_at, down_gap, down_at, last_end;
    struct { uint64_t key; int64_t ns[2]; int n[2]; } kinds[16];
    int64_t stats[ST_COUNT];
    int debug;                     /* $HOMELLM_POOL_DEBUG: 2 prints each window */
    pthread_mutex_t create_lock;
} P;

/* the settings' defaults (hl_pool_tune changes them, hl_pool_reset brings them back) */
static void pool_defaults(void) {
    P.spin_job_ns = 2000000; P.spin_step_ns = 100000; P.window_ns = 20000000;
    P.probe_ns = P.up_gap = P.down_gap = 100000000; P.probe_max_ns = 1600000000; P.idle_ns = 1000000000;
    P.shrink = 0.3; P.grow = 0.03;
}

#define LOAD(p, o) __atomic_load_n(p, o)
#define STORE(p, v, o) __atomic_store_n(p, v, o)
#define RLX __ATOMIC_RELAXED
#define ACQ __ATOMIC_ACQUIRE
#define REL __ATOMIC_RELEASE
#define SEQ __ATOMIC_SEQ_CST

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(uint32_t *addr, uint32_t val) {
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* the CPUs this thread may run on */
static int pool_cpus(void) {
    cpu_set_t s;
    if (sched_getaffinity(0, sizeof s, &s) != 0) return 1;
    int n = CPU_COUNT(&s);
    return n > 0 ? n : 1;
}

/* ---- phases -------------------------------------------------------------------------------- */

/* open phase id (its n > 0 items): the shares of its units are made by whoever takes them first */
static void open_slot(uint64_t id, int n) {
    slot_t *s = &P.ring[id % POOL_RING];
    const int unit = n > UMAX ? (n + UMAX - 1) / UMAX : 1;
    STORE(&s->n, n, RLX); STORE(&s->unit, unit, RLX); STORE(&s->units, (n + unit - 1) / unit, RLX);
    STORE(&s->done, 0, RLX);
}

/* after phase `id` of the job based at `base` (ending at `end`): close it, open the next phase
 * with items (closing empty ones on the way), publish it, wake sleepers */
static void close_phase(const job_t *j, uint64_t base, uint64_t end, uint64_t id, int nt) {
    if (j->close) j->close(j->arg, (int)(id - base));
    uint64_t q = id + 1;
    for (; q < end; q++) {
        const int n = j->items(j->arg, (int)(q - base));
        if (n > 0) { open_slot(q, n); break; }
        if (j->close) j->close(j->arg, (int)(q - base));
    }
    STORE(&P.cur, q, SEQ);
    if (LOAD(&P.ev_sleepers, SEQ)) {
        __atomic_fetch_add(&P.ev, 1, SEQ);
        futex_wake(&P.ev);
    }
}

/* wait until the open phase's id is >= id; returns it; *waited += ns spent when it was not yet */
static uint64_t wait_phase(uint64_t id, int64_t *waited) {
    uint64_t c = LOAD(&P.cur, ACQ);
    if (c >= id) return c;
    const int64_t t0 = now_ns();
    int64_t t = t0;
    for (int i = 1;; i++) {
        cpu_relax();
        if ((c = LOAD(&P.cur, ACQ)) >= id) goto out;
        if ((i & 31) == 0 && (t = now_ns()) - t0 > P.spin_step_ns) break;
    }
    for (;;) {
        __atomic_fetch_add(&P.ev_sleepers, 1, SEQ);
        const uint32_t e = LOAD(&P.ev, SEQ);
        if ((c = LOAD(&P.cur, SEQ)) < id) {
            __atomic_fetch_add(&P.stats[ST_SLEEPS], 1, RLX);
            futex_wait(&P.ev, e);
            c = LOAD(&P.cur, SEQ);
        }
        __atomic_fetch_sub(&P.ev_sleepers, 1, SEQ);
        if (c >= id) break;
    }
out:
    if (waited) *waited += now_ns() - t0;
    return c;
}

/* take chunks of thread u's share of phase id (of `units` units, `nt` threads) until it is empty:
 * from the front when u is this thread (tid), else half of what is left from the back. A share
 * still of an earlier phase (u has not come to this one) is made first. Returns units done. */
static int take_share(const job_t *j, uint64_t base, uint64_t id, int nt, int tid, int u, const slot_t *s) {
    const uint32_t tag = (uint32_t)id;
    const int units = LOAD(&s->units, RLX), unit = LOAD(&s->unit, RLX), n = LOAD(&s->n, RLX);
    const int lo = (int)((int64_t)u * units / nt), hi = (int)((int64_t)(u + 1) * units / nt);
    uint64_t *w = &P.w[u].share;
    int done = 0;
    for (;;) {
        uint64_t v = LOAD(w, ACQ);
        const int32_t age = (int32_t)(RT(v) - tag);
        if (age > 0) return done;  /* a later phase: this one is over */
        if (age < 0) {             /* (once the phase is over every share is of it or later) */
            const uint64_t nv = RW(tag, lo, hi);
            if (!__atomic_compare_exchange_n(w, &v, nv, 0, __ATOMIC_ACQ_REL, RLX)) continue;
            v = nv;
        }
        const int f = RF(v), b = RB(v);
        if (f >= b) return done;
        int i0, i1;
        if (u == tid) {
            int c = (b - f + 3) / 4, m = (hi - lo + 7) / 8;
            c = c > m ? c : m;
            i0 = f; i1 = f + c < b ? f + c : b;
        } else {
            i0 = b - (b - f + 1) / 2; i1 = b;
        }
        const uint64_t nv = u == tid ? RW(tag, i1, b) : RW(tag, f, i0);
        if (!__atomic_compare_exchange_n(w, &v, nv, 0, __ATOMIC_ACQ_REL, RLX)) continue;
        if (tid > 0 && P.w[tid].stall_us > 0) {
            struct timespec ts = {P.w[tid].stall_us / 1000000, (long)(P.w[tid].stall_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        j->run(j->arg, (int)(id - base), i0 * unit, i1 * unit < n ? i1 * unit : n, tid);
        done += i1 - i0;
    }
}

/* this thread's share of phase id, then what is left of the others'; the thread whose units
 * complete the phase closes it */
static void work_phase(const job_t *j, uint64_t base, uint64_t end, uint64_t id, int nt, int tid) {
    const slot_t *s = &P.ring[id % POOL_RING];
    int done = take_share(j, base, id, nt, tid, tid, s);
    for (int k = 1; k < nt; k++) done += take_share(j, base, id, nt, tid, (tid + k) % nt, s);
    if (done && (int)__atomic_add_fetch(&P.ring[id % POOL_RING].done, (uint32_t)done, __ATOMIC_ACQ_REL)
                == LOAD(&s->units, RLX))
        close_phase(j, base, end, id, nt);
}

/* one thread's part of a job; the caller's thread (tid 0) returns once the job is done, and
 * *waited is the time it spent waiting for others */
static void run_job(const job_t *j, int nt, uint64_t base, int tid, int64_t *waited) {
    const uint64_t end = base + (uint64_t)j->nph;
    uint64_t p = base;
    while (p < end) {
        const uint64_t c = wait_phase(p, tid == 0 ? waited : NULL);
        if (c >= end) return;
        if (c > p) p = c;
        work_phase(j, base, end, p, nt, tid);
        p++;
    }
    if (tid == 0) wait_phase(end, waited);
}

/* ---- workers ------------------------------------------------------------------------------- */

/* the next job (generation != seen) that takes worker `id`; copies it out */
static uint32_t next_job(int id, uint32_t seen, job_t *j, int *nt, uint64_t *base) {
    worker_t *me = &P.w[id];
    int64_t t0 = 0;
    for (int i = 0;; i++) {
        uint32_t g = LOAD(&P.jobgen, ACQ);
        if (g != 0 && g != seen) {
            job_t copy = {LOAD(&P.job.nph, RLX), LOAD(&P.job.items, RLX), LOAD(&P.job.run, RLX),
                          LOAD(&P.job.close, RLX), LOAD(&P.job.arg, RLX)};
            const int n = LOAD(&P.nt, RLX);
            const uint64_t b = LOAD(&P.base, RLX);
            __atomic_thread_fence(ACQ);
            if (LOAD(&P.jobgen, RLX) == g) {
                seen = g;
                if (id < n) { *j = copy; *nt = n; *base = b; return g; }
            }
            continue;
        }
        cpu_relax();
        if ((i & 31) == 0) {
            const int64_t t = now_ns();
            if (!t0) t0 = t;
            if (t - t0 < P.spin_job_ns) continue;
            /* sleep until the caller bumps our futex for a job that takes us */
            const uint32_t f = LOAD(&me->futex, SEQ);
            STORE(&me->sleeping, 1, SEQ);
            g = LOAD(&P.jobgen, SEQ);
            if (g == 0 || g == seen) {
                __atomic_fetch_add(&P.stats[ST_SLEEPS], 1, RLX);
                futex_wait(&me->futex, f);
            }
            STORE(&me->sleeping, 0, SEQ);
            t0 = 0;
        }
    }
}

static void *worker_main(void *a) {
    const int id = (int)(intptr_t)a;
    uint32_t seen = 0;
    for (;;) {
        job_t j; int nt; uint64_t base;
        seen = next_job(id, seen, &j, &nt, &base);
        run_job(&j, nt, base, id, NULL);
    }
    return NULL;
}

/* start workers up to id want-1 (as many as the system gives) */
static void grow_workers(int want) {
    pthread_mutex_lock(&P.create_lock);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 2 << 20);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* workers take no signals: Python's thread does */
    while (P.created + 1 < want) {
        pthread_t th;
        if (pthread_create(&th, &at, worker_main, (void *)(intptr_t)(P.created + 1)) != 0) {
            P.stats[ST_CREATE_FAILS]++;
            break;
        }
        pthread_setname_np(th, "homellm-pool");
        P.created++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&at);
    pthread_mutex_unlock(&P.create_lock);
}

static void pool_after_fork(void) {  /* the child has none of the parent's workers */
    P.created = 0;
    P.busy = 0;
    P.ev_sleepers = 0;
    for (int i = 0; i < POOL_MAX; i++) P.w[i].sleeping = 0;
    pthread_mutex_init(&P.create_lock, NULL);
}

static void pool_report(void) {
    fprintf(stderr, "homellm pool: %lld jobs, %lld on more than one thread (%.2f threads on average), "
            "%lld shrinks, %lld grows, %lld probes (%lld failed), %lld sleeps, %lld wakes, limit %d, "
            "%d threads started, the caller waited %.1f%% of the time\n",
            (long long)P.stats[ST_JOBS], (long long)P.stats[ST_TEAM_JOBS],
            P.stats[ST_TEAM_NS] ? (double)P.stats[ST_THREAD_NS] / (double)P.stats[ST_TEAM_NS] : 0.0,
            (long long)P.stats[ST_SHRINKS], (long long)P.stats[ST_GROWS], (long long)P.stats[ST_PROBES],
            (long long)P.stats[ST_PROBE_FAILS], (long long)P.stats[ST_SLEEPS], (long long)P.stats[ST_WAKES],
            P.limit, P.created,
            P.stats[ST_TEAM_NS] ? 100.0 * (double)P.stats[ST_WAIT_NS] / (double)P.stats[ST_TEAM_NS] : 0.0);
}

__attribute__((constructor)) static void pool_init(void) {
    pthread_mutex_init(&P.create_lock, NULL);
    pool_defaults();
    P.limit = POOL_MAX; P.next_id = 1;
    pthread_atfork(NULL, NULL, pool_after_fork);
    const char *d = getenv("HOMELLM_POOL_DEBUG");  /* 1: counters at exit; 2: each window too */
    P.debug = d ? atoi(d) : 0;
    if (P.debug > 0) atexit(pool_report);
}

/* ---- running a job ------------------------------------------------------------------------- */

static void run_inline(const job_t *j) {
    for (int p = 0; p < j->nph; p++) {
        const int n = j->items(j->arg, p);
        if (n > 0) j->run(j->arg, p, 0, n, 0);
        if (j->close) j->close(j->arg, p);
    }
}

/* the team for the next job of a caller asking for `want` threads */
static int pick_team(int want) {
    if (P.trial && P.trial <= want) return P.trial;
    return want < P.limit ? want : P.limit;
}

/* a job's kind: its code and its phases' sizes (jobs of one kind take about the same time) */
static uint64_t job_kind(const job_t *j) {
    uint64_t k = (uint64_t)(uintptr_t)j->run * 0x9E3779B97F4A7C15ull ^ (uint64_t)j->nph * 0xC2B2AE3D27D4EB4Full;
    k ^= (uint64_t)j->items(j->arg, 0) * 0x165667B19E3779F9ull;
    if (j->nph > 1) k ^= (uint64_t)j->items(j->arg, 1) * 0x85EBCA77C2B2AE63ull;
    return k;
}

static void arm_clear(int arm) {
    P.arm_ns[arm] = 0;
    for (int i = 0; i < 16; i++) { P.kinds[i].ns[arm] = 0; P.kinds[i].n[arm] = 0; }
    if (arm == 0) P.win_wait = 0;
}

static void arm_add(int arm, uint64_t key, int64_t wall) {
    P.arm_ns[arm] += wall;
    for (int i = 0, h = (int)(key % 16); i < 16; i++, h = (h + 1) % 16) {
        if (P.kinds[h].key != key && (P.kinds[h].n[0] || P.kinds[h].n[1])) continue;
        P.kinds[h].key = key; P.kinds[h].ns[arm] += wall; P.kinds[h].n[arm]++;
        return;
    }
}

/* the trial arm's time over the current team's, kind by kind (weighted by the current team's
 * time); -1 when no kind ran in both */
static double arms_ratio(void) {
    double num = 0, den = 0;
    for (int i = 0; i < 16; i++)
        if (P.kinds[i].n[0] && P.kinds[i].n[1]) {
            const double m0 = (double)P.kinds[i].ns[0] / P.kinds[i].n[0], m1 = (double)P.kinds[i].ns[1] / P.kinds[i].n[1];
            num += (double)P.kinds[i].ns[0] * (m1 / m0); den += (double)P.kinds[i].ns[0];
        }
    return den > 0 ? num / den : -1;
}

static int64_t doubled(int64_t gap) { return gap * 2 < P.probe_max_ns ? gap * 2 : P.probe_max_ns; }

/* account a job of kind `key` run by `team` threads in `wall` ns, `waited` of them by the caller
 * waiting for the others. Over a window of the current team, a caller that waited more than
 * `shrink` of the time starts a trial of one thread fewer (at most every down_gap); a team
 * below what callers ask for starts a trial of one thread more every up_gap. A trial runs a
 * window of jobs on its team, then keeps it if the same kinds of jobs ran faster (one more
 * thread: by `grow` at least) or no slower (one fewer). Failed trials wait twice as long. */
static void adapt(int team, int want, uint64_t key, int64_t wall, int64_t waited, int64_t t) {
    if (P.trial) {
        if (team != P.trial) return;
        arm_add(1, key, wall);
        if (P.arm_ns[1] < P.window_ns) return;
        const double r = arms_ratio();
        const int down = P.trial < P.arm_team;
        const int keep = r >= 0 && (down ? r <= 1.0 : r <= 1.0 - P.grow);
        if (P.debug > 1)
            fprintf(stderr, "homellm pool: trial of %d threads (against %d): %.2fx the time, %s\n", P.trial,
                    P.arm_team, r, keep ? "kept" : "not kept");
        if (keep) {
            P.limit = !down && P.trial >= want ? POOL_MAX : P.trial;  /* as many as asked: no cap */
            P.stats[down ? ST_SHRINKS : ST_GROWS]++;
            P.up_gap = P.down_gap = P.probe_ns;
            if (down) P.up_at = t + P.up_gap;
        } else {  /* (r < 0: no kind of job ran in both windows; try again later too) */
            P.stats[ST_PROBE_FAILS]++;
            if (down) { P.down_gap = doubled(P.down_gap); P.down_at = t + P.down_gap; }
            else { P.up_gap = doubled(P.up_gap); P.up_at = t + P.up_gap; }
        }
        P.trial = 0;
        arm_clear(0); arm_clear(1);
        return;
    }
    if (team != P.arm_team) { arm_clear(0); P.arm_team = team; }
    arm_add(0, key, wall);
    P.win_wait += waited;
    if (P.arm_ns[0] < P.window_ns) return;
    const double f = (double)P.win_wait / (double)P.arm_ns[0];
    if (P.debug > 1)
        fprintf(stderr, "homellm pool: %d threads, %.1f ms, waited %.0f%%\n", team, P.arm_ns[0] / 1e6, 100 * f);
    if (team > 1 && f > P.shrink && t >= P.down_at) P.trial = team - 1;
    else if (team < want && t >= P.up_at) P.trial = team + 1;
    if (P.trial) P.stats[ST_PROBES]++;  /* (this window is the trial's yardstick) */
    else arm_clear(0);
}

/* a pool that ran no job for idle_ns starts the next one with as many threads as it is asked
 * for: what it learned of the machine's load is old (the load that made it take fewer may have
 * gone, and a probe for more waits up to probe_max after failed ones: a server's first request
 * after a busy start ran on one thread of two for over a second). Under a load that stays, the
 * next window's waiting takes the thread off again within a window of jobs. */
static void forget_if_idle(int64_t t) {
    if (!P.last_end || t - P.last_end < P.idle_ns || (P.limit == POOL_MAX && !P.trial)) return;
    P.limit = POOL_MAX; P.trial = 0; P.arm_team = 0;
    arm_clear(0); arm_clear(1);
    P.up_gap = P.down_gap = P.probe_ns; P.up_at = P.down_at = 0;
    P.stats[ST_IDLE_RESETS]++;
}

/* run a job on up to `want` threads (<= 0: one per CPU this thread may use), the caller's included */
static void pool_run(const job_t *j, int want) {
    if (want <= 0) want = pool_cpus();
    if (want > POOL_MAX) want = POOL_MAX;
    if (want == 1 || j->nph <= 0 || __atomic_exchange_n(&P.busy, 1, ACQ)) {
        run_inline(j);  /* one thread, or another caller holds the pool (or a job calls a kernel) */
        return;
    }
    const uint64_t key = job_kind(j);
    forget_if_idle(now_ns());
    int team = pick_team(want);
    if (team > P.created + 1) grow_workers(team);
    const int64_t t0 = now_ns();
    if (team > P.created + 1) {  /* the system gave fewer threads: no trial of more */
        team = P.created + 1;
        if (P.trial > team) {
            P.trial = 0;
            arm_clear(0); arm_clear(1);
            P.up_gap = doubled(P.up_gap); P.up_at = t0 + P.up_gap;
        }
    }
    P.stats[ST_JOBS]++;
    if (team == 1) {
        run_inline(j);
        const int64_t t1 = now_ns();
        P.stats[ST_THREAD_NS] += t1 - t0; P.stats[ST_TEAM_NS] += t1 - t0;
        adapt(1, want, key, t1 - t0, 0, t1);
        P.last_end = t1;
        STORE(&P.busy, 0, REL);
        return;
    }
    const uint64_t base = P.next_id, end = base + (uint64_t)j->nph;
    P.next_id = end;
    /* a share whose tag is not a little older than this job's first phase (never used, or so
     * long ago that the 32-bit tags wrapped) gets an empty one of the phase before */
    for (int u = 0; u < team; u++) {
        const uint32_t t = RT(LOAD(&P.w[u].share, RLX)), age = (uint32_t)base - t;
        if (age == 0 || age > (1u << 30)) STORE(&P.w[u].share, RW((uint32_t)(base - 1), 0, 0), RLX);
    }
    /* open the first phase with items (closing empty ones) */
    uint64_t q = base;
    for (; q < end; q++) {
        const int n = j->items(j->arg, (int)(q - base));
        if (n > 0) { open_slot(q, n); break; }
        if (j->close) j->close(j->arg, (int)(q - base));
    }
    int64_t waited = 0;
    if (q < end) {
        STORE(&P.jobgen, 0, RLX);
        __atomic_thread_fence(REL);
        STORE(&P.job.nph, j->nph, RLX); STORE(&P.job.items, j->items, RLX); STORE(&P.job.run, j->run, RLX);
        STORE(&P.job.close, j->close, RLX); STORE(&P.job.arg, j->arg, RLX);
        STORE(&P.nt, team, RLX); STORE(&P.base, base, RLX);
        STORE(&P.cur, q, REL);
        static uint32_t gen = 0;
        if (++gen == 0) gen = 1;
        STORE(&P.jobgen, gen, SEQ);
        for (int i = 1; i < team; i++)
            if (LOAD(&P.w[i].sleeping, SEQ)) {
                __atomic_fetch_add(&P.w[i].futex, 1, SEQ);
                futex_wake(&P.w[i].futex);
                P.stats[ST_WAKES]++;
            }
        run_job(j, team, base, 0, &waited);
    } else {
        STORE(&P.cur, end, REL);
    }
    const int64_t t1 = now_ns();
    P.stats[ST_TEAM_JOBS]++;
    P.stats[ST_WAIT_NS] += waited;
    P.stats[ST_THREAD_NS] += (t1 - t0) * team; P.stats[ST_TEAM_NS] += t1 - t0;
    adapt(team, want, key, t1 - t0, waited, t1);
    P.last_end = t1;
    STORE(&P.busy, 0, REL);
}

/* a parallel loop: fn(ctx, i0, i1) over chunks of 0..n-1 on up to `threads` threads */
typedef struct { int n; void (*fn)(void *ctx, int i0, int i1); void *ctx; } loop_t;
static int loop_items(void *a, int p) { (void)p; return ((const loop_t *)a)->n; }
static void loop_run(void *a, int p, int i0, int i1, int tid) {
    (void)p; (void)tid;
    const loop_t *l = a;
    l->fn(l->ctx, i0, i1);
}
static void par_for(int n, int threads, void (*fn)(void *ctx, int i0, int i1), void *ctx) {
    loop_t l = {n, fn, ctx};
    const job_t j = {1, loop_items, loop_run, NULL, &l};
    pool_run(&j, threads);
}

/* ---- the Python side's handles ------------------------------------------------------------- */

int hl_pool_default_threads(void) { return pool_cpus(); }

/* settings; a value <= -1000 leaves one as it is. Times in microseconds (probes, idle: ms);
 * shrink_pct: the caller's waiting, in percent of a window's time, that starts a trial of one
 * thread fewer; grow_pct: how much faster (percent) a trial of one thread more must run to be
 * kept (below 0: how much slower it may run); idle_ms: no job for this long and the next one
 * forgets the team size learned (forget_if_idle). */
void hl_pool_tune(double spin_job_us, double spin_step_us, double window_us, double shrink_pct,
                  double grow_pct, double probe_ms, double probe_max_ms, double idle_ms) {
    const double keep = -1000;
    if (spin_job_us > keep) P.spin_job_ns = (int64_t)(spin_job_us * 1e3);
    if (spin_step_us > keep) P.spin_step_ns = (int64_t)(spin_step_us * 1e3);
    if (window_us > keep) P.window_ns = (int64_t)(window_us * 1e3);
    if (shrink_pct > keep) P.shrink = shrink_pct / 100;
    if (grow_pct > keep) P.grow = grow_pct / 100;
    if (probe_ms > keep) P.probe_ns = P.up_gap = P.down_gap = (int64_t)(probe_ms * 1e6);
    if (probe_max_ms > keep) P.probe_max_ns = (int64_t)(probe_max_ms * 1e6);
    if (idle_ms > keep) P.idle_ns = (int64_t)(idle_ms * 1e6);
}

/* counters (ST_*) into out[0..n-1]; returns how many there are */
int hl_pool_stats(int64_t *out, int n) {
    P.stats[ST_LIMIT] = P.limit; P.stats[ST_CREATED] = P.created;
    for (int i = 0; i < n && i < ST_COUNT; i++) out[i] = LOAD(&P.stats[i], RLX);
    return ST_COUNT;
}

/* forget what the pool learned and counted, and the settings hl_pool_tune made (tests) */
void hl_pool_reset(void) {
    pool_defaults();
    P.limit = POOL_MAX; P.trial = 0; P.arm_team = 0; P.up_at = P.down_at = 0; P.last_end = 0;
    arm_clear(0); arm_clear(1);
    for (int i = 0; i < ST_COUNT; i++) STORE(&P.stats[i], 0, RLX);
}

/* debug: worker tid (1..) sleeps us microseconds holding each chunk it takes (0: not) */
void hl_pool_debug_stall(int tid, int us) {
    if (tid > 0 && tid < POOL_MAX) P.w[tid].stall_us = us;
}
