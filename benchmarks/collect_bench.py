"""The volunteer collection under load: N simulated volunteers at once over HTTP, on
PostgreSQL and on SQLite; next-task and submit latency (p50 / p99) and throughput.

The server is `homellm serve`'s app (create_app + web_router with --auth and the collection's
settings, Open Assistant's defaults unless told) in its own process, on a fresh database each
run: SQLite in a temporary folder, PostgreSQL in a throwaway cluster (Debian's binaries, a unix
socket; or --pg-url). N accounts log in; each volunteer then asks for a task ("random": OA's
weighted choice), answers it (a text, labels, a ranking or a vote) and asks again, for
--seconds, in two scenarios:

- paced: each volunteer thinks --think-ms (default 1000, with +-50% jitter) before each
  answer, and they start spread over the first --think-ms: 100 volunteers then make up to
  ~200 requests/s, far faster than people work;
- saturated: no think time at all (a closed loop: latency then measures the queue, i.e.
  throughput, not the cost of one request);
- direct: no HTTP; the same volunteers take turns in one thread calling the tree manager
  (TreeManager.next_task / submit) on its own: CPU and SQL statements (BEGIN and COMMIT
  aside) per operation, and on PostgreSQL its round trips (answers waited for, BEGIN and
  COMMIT included: statements queued in a batch go out together), i.e. what the
  collection itself costs, without the web server's share. (Profiled with py-spy, the
  collection's handlers were about an eighth of the server's Python CPU per request; the
  HTTP parser, FastAPI's routing and dependencies, the thread hops and the middlewares the
  rest.)

Latencies are measured by the client (asyncio, one kept-alive connection per volunteer,
HTTP/1.1 written and read by hand, or httpx with --client httpx, which costs the shared cores
more CPU per request than the server; in --client-procs processes, so that the client is not
what is measured: each reports how late its event loop ran, `client_loop_lag`), split into
next-task with a task, next-task without one ("nothing for you now"), and submit, once the
volunteers have worked --warmup seconds (default 2: a fresh server's first requests meet
cold caches and connections, and the volunteers' first arrivals; those latencies are
reported apart, as `warmup`). The CPU the server process spent per request is measured from
/proc, and on the throwaway PostgreSQL the CPU of its processes too (the SQL runs there, not
in the server); with --pg-stats it records every statement (pg_stat_statements): round trips
per request over HTTP (the session's lookup included) and the costliest statements. At the
end the store is checked: every answered task is stored once.

usage: python benchmarks/collect_bench.py [--volunteers 100] [--seconds 20] [--db both]
       [--pg-url URL] [--think-ms 1000] [--warmup 2] [--scenarios paced,saturated,direct]
       [--client-procs 2] [--client raw] [--pg-stats] [--out FILE.json]
Target (issue 15): p99 <= 50 ms for next-task and submit (`target_met`, paced).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import glob
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

FAST = dict(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server process

def serve(db_url: str, port: int, settings: dict):
    import uvicorn

    from homellm.collect import CollectSettings
    from homellm.serve import ModelRegistry, ServeConfig, create_app
    from homellm.serve.connections import server_config
    from homellm.serve.web import web_router
    from homellm.store import AuthConfig, open_store
    from homellm.catalog.pypi import cached_default_gguf
    store = open_store(db_url, auth=AuthConfig(**FAST))
    registry = ModelRegistry({"smollm2:135m": cached_default_gguf()}, ServeConfig())  # unused
    app = create_app(registry, extra_routers=[
        web_router(store, auth=True, collect=CollectSettings(**settings))])
    uvicorn.Server(server_config(app, "127.0.0.1", port)).run()


def start_server(db_url: str, settings: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", db_url, str(port),
                             json.dumps(settings)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/api/me", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


# ---------------------------------------------------------------- a throwaway PostgreSQL

class Postgres:
    def __init__(self, stats: bool = False):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise SystemExit("PostgreSQL is not installed (apt-get install postgresql), or give "
                             "--pg-url")
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="collect-bench-pg-"))
        (self.root / "sock").mkdir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            import pwd
            pw = pwd.getpwnam("postgres")
            for p in (self.root, self.root / "sock"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        data = self.root / "data"
        self._run([str(self.bin / "initdb"), "-D", str(data), "-U", "bench", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"])
        opts = (f"-c listen_addresses='' -k {self.root / 'sock'} -p 5432 -c fsync=off "
                "-c synchronous_commit=off -c max_connections=300")
        if stats:   # --pg-stats: every statement's calls and time (pg_stat_statements)
            opts += (" -c shared_preload_libraries=pg_stat_statements"
                     " -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on")
        self._run([str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                   str(self.root / "log"), "-w", "start"])
        self.url = f"postgresql://bench@/postgres?host={self.root / 'sock'}&port=5432"
        self.data = data
        self.stats = stats
        if stats:
            try:
                self.sql("CREATE EXTENSION pg_stat_statements")
            except Exception:   # (the cluster is up: stop it, not leave it running)
                self.close()
                raise

    def sql(self, query: str) -> list[dict]:
        import psycopg
        from psycopg.rows import dict_row
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as con:
            cur = con.execute(query)
            return cur.fetchall() if cur.description else []

    def reset_stats(self) -> None:
        if self.stats:
            self.sql("SELECT pg_stat_statements_reset()")

    def statements(self, requests: int) -> dict:
        """--pg-stats: round trips (statements, BEGIN and COMMIT included) per request, and
        the statements that took the most time (calls and ms per request, mean ms each)."""
        rows = self.sql("SELECT query, calls, total_exec_time, total_plan_time, plans FROM "
                        "pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' "
                        "ORDER BY total_exec_time DESC")
        n = max(requests, 1)
        return {"statements_per_request": round(sum(r["calls"] for r in rows) / n, 2),
                "exec_ms_per_request": round(sum(r["total_exec_time"] for r in rows) / n, 3),
                "plan_ms_per_request": round(sum(r["total_plan_time"] for r in rows) / n, 3),
                "top": [{"calls_per_request": round(r["calls"] / n, 3),
                         "exec_ms_per_request": round(r["total_exec_time"] / n, 3),
                         "mean_ms": round(r["total_exec_time"] / max(r["calls"], 1), 3),
                         "plans_per_call": round(r["plans"] / max(r["calls"], 1), 3),
                         "plan_ms_per_request": round(r["total_plan_time"] / n, 3),
                         "query": " ".join(r["query"].split())[:160]}
                        for r in rows[:12]]}

    def cpu_seconds(self) -> float:
        """CPU time of the cluster's processes alive now (the postmaster and its children:
        one backend per connection, kept for the server's life)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        total = cpu_seconds(pid)
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def _run(self, cmd):
        if self.as_root:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            cmd = [runuser, "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True, capture_output=True)

    def close(self):
        try:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                       "immediate", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- the volunteers

def answer(t: dict, rng: random.Random) -> dict:
    k = t["type"]
    if k in ("initial_prompt", "assistant_reply", "prompter_reply"):
        return {"text": f"{k} {rng.random():.6f} " + "words " * rng.randint(5, 60), "lang": "en"}
    if k.startswith("label"):
        return {"labels": {"spam": 1 if rng.random() < 0.1 else 0,
                           "quality": rng.choice([0, 0.25, 0.5, 0.75, 1])}}
    if k.startswith("rank"):
        n = len(t.get("replies") or t.get("prompts"))
        return {"ranking": rng.sample(range(n), n)}
    return {"approve": rng.random() < 0.8}


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
CLOSE = re.compile(rb"(?i)\r\nconnection: *close")


class RawClient:
    """One volunteer's requests on one kept-alive HTTP/1.1 connection, written and read by
    hand: on this machine the client shares the server's cores (a volunteer's browser does
    not), and httpx spent more CPU per request than the server did (~2.3 ms; this ~0.2)."""

    def __init__(self, url: str, token: str, csrf: str):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.head = (f"Host: {u.netloc}\r\nCookie: homellm_session={token}\r\n"
                     f"X-CSRF-Token: {csrf}\r\nContent-Type: application/json\r\n").encode()
        self.reader = self.writer = None

    async def post(self, path: str, obj) -> tuple[int, object]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(obj).encode()
        async with asyncio.timeout(60):
            self.writer.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
                path.encode(), self.head, len(body), body))
            head = await self.reader.readuntil(b"\r\n\r\n")
            data = await self.reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))
        if CLOSE.search(head):
            await self.aclose()
        return int(head[9:12]), json.loads(data)

    async def aclose(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class HttpxClient:
    """The same through httpx (--client httpx)."""

    def __init__(self, url: str, token: str, csrf: str):
        self.c = httpx.AsyncClient(base_url=url, timeout=60, headers={"X-CSRF-Token": csrf},
                                   cookies={"homellm_session": token})

    async def post(self, path: str, obj) -> tuple[int, object]:
        r = await self.c.post(path, json=obj)
        return r.status_code, r.json()

    async def aclose(self):
        await self.c.aclose()


CLIENTS = {"raw": RawClient, "httpx": HttpxClient}


async def volunteer(c, session: tuple, start: float, seconds: float, think: float, lat: dict,
                    counts: dict, warmup: float = 0.0, warm=None):
    """One volunteer's loop for warmup + seconds; latencies of requests sent in the first
    `warmup` seconds go to `warm` instead of `lat`."""
    rng = random.Random(session[0])
    end = start + warmup + seconds
    # arrivals spread over the first `think` seconds, not one burst
    await asyncio.sleep(max(0.0, start + rng.uniform(0, think) - time.perf_counter()))
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        status, r = await c.post("/api/collect/tasks", {"type": "random"})
        dt = time.perf_counter() - t0
        if status != 200:
            raise SystemExit(f"POST /api/collect/tasks: {status} {r}")
        task = r["task"]
        (lat if t0 >= start + warmup else warm)["next_task" if task else
                                                "next_task_none"].append(dt)
        if task is None:
            await asyncio.sleep(max(0.2, think))
            continue
        if think:
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))
        t0 = time.perf_counter()
        status, r = await c.post(f"/api/collect/tasks/{task['id']}/submit", answer(task, rng))
        (lat if t0 >= start + warmup else warm)["submit"].append(time.perf_counter() - t0)
        if status != 200:
            counts["refused"] = counts.get("refused", 0) + 1
        else:
            counts[task["type"]] = counts.get(task["type"], 0) + 1


async def loop_lag(seconds: float, lags: list, warmup: float = 0.0):
    """How late this event loop wakes a 5 ms sleep (after `warmup`): a busy client inflates
    every latency."""
    start = time.perf_counter()
    while time.perf_counter() < start + warmup + seconds:
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        if t0 >= start + warmup:
            lags.append(time.perf_counter() - t0 - 0.005)


def client(url: str, sessions: list[tuple], seconds: float, think: float,
           warmup: float = 0.0, kind: str = "raw") -> dict:
    """One client process's volunteers; their latencies (those of the first `warmup`
    seconds apart), counts, loop lag and CPU."""
    lat = {"next_task": [], "next_task_none": [], "submit": []}
    warm = {k: [] for k in lat}
    counts: dict = {}
    lags: list = []

    async def main():
        # the clients first (an httpx client takes tens of ms to make: made inside the
        # volunteers, they held up this event loop until every volunteer's first request
        # went out at once), then everyone starts from the same moment
        clients = [CLIENTS[kind](url, s[1], s[2]) for s in sessions]
        start = time.perf_counter()
        try:
            await asyncio.gather(loop_lag(seconds, lags, warmup), *(
                volunteer(c, s, start, seconds, think, lat, counts, warmup, warm)
                for c, s in zip(clients, sessions)))
        finally:
            for c in clients:
                await c.aclose()
    cpu0 = time.process_time()
    asyncio.run(main())
    return {"lat": lat, "warm": warm, "counts": counts, "lags": lags,
            "cpu": time.process_time() - cpu0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"n": len(xs), "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
            "max_ms": round(xs[-1] * 1000, 2)}


def run_one(db_url: str, args, settings: dict, think_ms: float, pg=None) -> dict:
    from homellm.store import AuthConfig, open_store
    # sessions made in the store, as a login makes them (logins are not what is measured,
    # and a hundred from one address would meet the login rate limit)
    with open_store(db_url, auth=AuthConfig(**FAST)) as store:
        sessions = [store.create_session(store.create_user(f"vol{i:03d}", "bench-password"))
                    for i in range(args.volunteers)]
    sessions = [(s.user.username, s.token, s.csrf_token) for s in sessions]
    proc, url = start_server(db_url, settings)
    procs = max(1, min(args.client_procs, len(sessions)))
    shares = [sessions[i::procs] for i in range(procs)]
    try:
        cpu0 = cpu_seconds(proc.pid)
        db0 = pg.cpu_seconds() if pg else None
        if pg:
            pg.reset_stats()
        t0 = time.perf_counter()
        job = (args.seconds, think_ms / 1000, args.warmup, args.client)
        if procs == 1:
            parts = [client(url, shares[0], *job)]
        else:
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                parts = pool.starmap(client, [(url, share, *job) for share in shares])
        wall = time.perf_counter() - t0
        server_cpu = cpu_seconds(proc.pid) - cpu0
        db_cpu = pg.cpu_seconds() - db0 if pg else None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = {k: [x for p in parts for x in p["lat"][k]] for k in parts[0]["lat"]}
    warm = [x for p in parts for v in p["warm"].values() for x in v]
    counts: dict = {}
    for p in parts:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    client_cpu = sum(p["cpu"] for p in parts)
    lags = [x for p in parts for x in p["lags"]]
    with open_store(db_url, auth=AuthConfig(**FAST)) as store:
        done = store.db.one("SELECT COUNT(*) AS n FROM collect_tasks WHERE status = 'done'")["n"]
        states = {r["state"]: r["n"] for r in store.db.all(
            "SELECT state, COUNT(*) AS n FROM collect_trees GROUP BY state")}
    answered = sum(v for k, v in counts.items() if k != "refused")
    requests = sum(len(v) for v in lat.values()) + len(warm)
    assert done == answered, f"{answered} answered but {done} stored"
    out = {"next_task": summary(lat["next_task"]),
           "next_task_none": summary(lat["next_task_none"]), "submit": summary(lat["submit"]),
           # the first --warmup seconds (a fresh server: cold caches, new connections, the
           # volunteers' first arrivals), every kind of request together; not in the above
           "warmup": {"seconds": args.warmup, **summary(warm)},
           "answered": answered, "refused": counts.get("refused", 0),
           "answers_per_s": round(answered / wall, 1), "requests_per_s": round(requests / wall, 1),
           # CPU the server spent per request (all of them, the warm-up's too), and the
           # share of a core each side had
           "server_cpu_ms_per_request": round(server_cpu / max(requests, 1) * 1000, 2),
           "server_cores_used": round(server_cpu / wall, 2)}
    if db_cpu is not None:   # PostgreSQL's processes: where the SQL of a request runs
        out["db_cpu_ms_per_request"] = round(db_cpu / max(requests, 1) * 1000, 2)
        out["db_cores_used"] = round(db_cpu / wall, 2)
        if pg.stats:
            out["pg_stats"] = pg.statements(requests)
    out.update({"client_procs": procs, "client_cores_used": round(client_cpu / wall, 2),
                # the machine's load as this run ended: the cores are shared (other work
                # on them stretches every latency's tail)
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "client_loop_lag": summary(lags),
                "target_met": all(out[k].get("p99_ms", 0) <= 50
                                  for k in ("next_task", "next_task_none", "submit")),
                "by_kind": {k: v for k, v in sorted(counts.items()) if k != "refused"},
                "trees": states, "stored_once": done == answered})
    return out


def run_direct(db_url: str, args, settings: dict, pg=None) -> dict:
    """No HTTP: the volunteers take turns (one thread) at TreeManager.next_task / submit for
    --seconds; CPU, SQL statements and (PostgreSQL) round trips per operation (the
    collection's own cost)."""
    from homellm.collect import CollectSettings, TreeManager
    from homellm.store import AuthConfig, open_store
    rng = random.Random(0)
    with open_store(db_url, auth=AuthConfig(**FAST)) as store:
        users = [store.create_user(f"vol{i:03d}", "bench-password")
                 for i in range(args.volunteers)]
        tm = TreeManager(store.db, CollectSettings(**settings), rng=random.Random(1))
        statements = [0]
        execute = store.db._execute

        def counted(sql, params=(), *rest):
            statements[0] += 1
            return execute(sql, params, *rest)
        store.db._execute = counted
        held: dict = {}
        cpu = {"next_task": [], "next_task_none": [], "submit": []}
        sql = {k: 0 for k in cpu}
        trips = {k: 0 for k in cpu}   # PostgreSQL: answers waited for (Database.round_trips)
        db0 = pg.cpu_seconds() if pg else None
        if pg:
            pg.reset_stats()
        cpu_all0, t0, i = time.process_time(), time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            u = users[i % len(users)]
            i += 1
            task = held.pop(u.id, None)
            n0, r0, c0 = statements[0], store.db.round_trips, time.process_time()
            if task is None:
                task = tm.next_task(u)["task"]
                what = "next_task" if task else "next_task_none"
                if task:
                    held[u.id] = task
            else:
                tm.submit(u, task["id"], answer(task, rng))
                what = "submit"
            cpu[what].append(time.process_time() - c0)
            sql[what] += statements[0] - n0
            trips[what] += store.db.round_trips - r0
        wall = time.perf_counter() - t0
        cpu_all = time.process_time() - cpu_all0
        db_cpu = pg.cpu_seconds() - db0 if pg else None
    on_pg = db_url.startswith(("postgresql://", "postgres://"))
    out = {k: {"n": len(v), "cpu_ms": round(sum(v) / max(len(v), 1) * 1000, 3),
               "statements": round(sql[k] / max(len(v), 1), 2),
               **({"round_trips": round(trips[k] / max(len(v), 1), 2)} if on_pg else {})}
           for k, v in cpu.items()}
    ops = sum(len(v) for v in cpu.values())
    out["ops_per_s"] = round(ops / wall, 1)
    out["cpu_ms_per_op"] = round(cpu_all / max(ops, 1) * 1000, 3)
    if db_cpu is not None:
        out["db_cpu_ms_per_op"] = round(db_cpu / max(ops, 1) * 1000, 3)
        if pg.stats:
            out["pg_stats"] = pg.statements(ops)
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volunteers", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--db", choices=("both", "postgresql", "sqlite"), default="both")
    p.add_argument("--pg-url", default=None, help="an empty PostgreSQL database to use")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds the volunteers work before latencies count (reported apart)")
    p.add_argument("--think-ms", type=float, default=1000,
                   help="the paced scenario's pause before each answer")
    p.add_argument("--scenarios", default="paced,saturated,direct")
    p.add_argument("--client-procs", type=int, default=2,
                   help="client processes the volunteers are spread over")
    p.add_argument("--client", choices=sorted(CLIENTS), default="raw",
                   help="how the volunteers send requests (raw: HTTP/1.1 by hand, the least "
                   "client CPU on the server's cores)")
    p.add_argument("--pg-stats", action="store_true",
                   help="the throwaway PostgreSQL records its statements (pg_stat_statements): "
                   "round trips per request and the costliest statements")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    settings = {}   # Open Assistant's defaults
    out = {"volunteers": args.volunteers, "seconds": args.seconds, "settings": "OA defaults",
           "client": args.client,
           "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
           "note": "client and server share this machine's cores"}
    scenarios = {"paced": args.think_ms, "saturated": 0.0, "direct": None}
    for name in args.scenarios.split(","):
        name = name.strip()
        if name not in scenarios:
            p.error(f"--scenarios: unknown {name!r} (expected some of {', '.join(scenarios)})")
        think = scenarios[name]
        res = out.setdefault(name, {} if think is None else {"think_ms": think})

        def one(url, pg=None):
            if think is None:
                return run_direct(url, args, settings, pg)
            return run_one(url, args, settings, think, pg)
        if args.db in ("both", "postgresql"):
            pg = None if args.pg_url else Postgres(args.pg_stats)
            try:
                res["postgresql"] = one(args.pg_url or pg.url, pg)
            finally:
                if pg:
                    pg.close()
        if args.db in ("both", "sqlite"):
            with tempfile.TemporaryDirectory() as d:
                res["sqlite"] = one(str(Path(d) / "collect.db"))
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
