"""A throwaway PostgreSQL server for tests: initdb in a temp folder, a unix socket, no TCP.

Use from a test module:

    from pg_server import pg_server, pg_url   # noqa: F401  (pytest fixtures)

`pg_server` (session scope) starts one cluster with Debian's binaries
(/usr/lib/postgresql/*/bin) and stops it at the end; `pg_url` gives each test a fresh, empty
database as a `postgresql://` URL. As root, the server runs as the `postgres` user (postgres
refuses root) with the folder handed to it. Without the binaries the tests skip, naming the
package to install.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

PORT = 5432  # only names the socket file: the server listens on no TCP port


@dataclass
class PgServer:
    bin: Path
    root: Path
    user: str = "homellm"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={PORT}"


def _find_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    # runuser lives in /usr/sbin, which a minimal PATH (cron, env -i, some CI runners) leaves out
    runuser = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser")
                                               if os.path.exists(p)), "runuser")
    return [runuser, "-u", "postgres", "--"] + cmd


@pytest.fixture(scope="session")
def pg_server():
    bindir = _find_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (or `make sysdeps`)")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as "
                        "(apt-get install postgresql creates it)")
    root = Path(tempfile.mkdtemp(prefix="homellm-pg-"))
    (root / "sock").mkdir()
    if os.geteuid() == 0:
        for p in (root, root / "sock"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    server = PgServer(bindir, root)
    data, log = root / "data", root / "server.log"
    try:
        subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U",
                                        server.user, "-A", "trust", "-E", "UTF8",
                                        "--locale=C", "--no-sync"]),
                       check=True, capture_output=True, text=True)
        opts = (f"-c listen_addresses='' -k {server.socket_dir} -p {PORT} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                                        "-l", str(log), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr}\n{text[-2000:]}")
    try:
        yield server
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m",
                                        "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_count = itertools.count()


def new_database(server: PgServer) -> str:
    """A new empty database on `server`, as a URL."""
    import psycopg
    name = f"t{os.getpid()}_{next(_count)}"
    with psycopg.connect(server.url(), autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return server.url(name)


@pytest.fixture
def pg_url(pg_server) -> str:
    """A new empty database on the test server, as a URL."""
    return new_database(pg_server)
