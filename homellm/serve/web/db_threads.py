"""The threads that run the volunteer collection's database work: a few long-lived threads,
each with its own connection opened when the app is made, and one queue in front of them.

    threads = DbThreads(store.db)            # 2 threads on SQLite, 4 on PostgreSQL
    task = await threads.run(tm.next_task, user)
    threads.close()                          # the app's shutdown (web_router's lifespan)

Why not FastAPI's thread pool (anyio's: up to 40 threads, each dropped after 10 s idle)?
- A new thread opens a new connection: on PostgreSQL a new backend process, its caches
  cold and every statement planned again until psycopg prepares it (after 5 uses on that
  connection); the first burst of requests waited behind those connects. Here the
  connections are opened once, before the first request, and stay.
- Forty threads contend for the GIL and, on SQLite, for its one writer: under load each
  request waits out the others' time slices while holding its place (a convoy). A queue in
  front of a few threads serves the requests in order, and the threads that run hold the GIL
  for short stretches. More threads add nothing on SQLite (its writes are one at a time and
  a read takes microseconds); on PostgreSQL a few overlap the server's round trips.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from homellm.errors import HomellmError

THREADS = {"sqlite": 2, "postgresql": 4}


class DbThreads:
    def __init__(self, db, n: int | None = None):
        self.db = db
        self.n = n or THREADS.get(db.dialect.name, 2)
        self._pool = None
        self._start()

    def _start(self) -> None:
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="homellm-db")
        ready = threading.Barrier(self.n)
        for _ in range(self.n):  # each waits for the others: n threads, n connections
            self._pool.submit(self._open, ready)

    def _open(self, ready: threading.Barrier) -> None:
        try:
            ready.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        try:
            self.db.connection()
        except HomellmError:  # the request that needs it says why (db.py's message)
            pass

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on one of the threads; its result (or its exception)."""
        if self._pool is None:   # closed (the app stopped), and started again
            self._start()
        return await asyncio.wrap_future(self._pool.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """Let the threads end once their work is done (the app's shutdown)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
