"""What the benchmarks share: a free port, and a server started and waited for."""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, env: dict, stderr=subprocess.PIPE,
                 timeout: float = 240) -> subprocess.Popen:
    """Popen(cmd) and wait until GET url/v1/models answers 200; SystemExit naming the command
    (and the end of its stderr, when piped) if it exits or does not answer within timeout."""
    import httpx
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            said = f": {proc.stderr.read()[-2000:]}" if stderr is subprocess.PIPE else ""
            raise SystemExit(f"{' '.join(cmd[:4])} exited ({proc.returncode}) before it answered{said}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd[:4])} did not start in {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 60):
    """SIGTERM (the server shuts down as a user's Ctrl-C does), then SIGKILL after timeout."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
