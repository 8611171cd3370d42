"""A real `homellm serve` that dies or is stopped while the web app streams a reply, in
headless Chromium (issue 18, items 2 and 4): kill -9 mid-reply loses no word the page showed,
the page says "lost connection" (never "Failed to fetch"), offers Retry and recovers when the
server is back; Ctrl+C says what it waits for, stops the web reply keeping its text, cuts
the API's open requests after a few seconds, and a second Ctrl+C quits at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_web_api import free_port
from test_web_browser import CHROMIUM, open_page, send, settings

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Serve:
    """`homellm serve` in a subprocess on a fixed port and database (so it can come back)."""

    def __init__(self, home: Path, gguf: Path, port: int | None = None):
        self.home, self.gguf = home, gguf
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = home / "web.db"
        self.start()

    def start(self):
        env = {**os.environ, "HOMELLM_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "homellm"), "serve", "-m", str(self.gguf), "--port",
             str(self.port), "--db", str(self.db), "--ctx", "512", "--quiet"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("homellm serve did not start: " + self.stop_now())

    def stop_now(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)[1]

    def replies(self, cid: str):
        from homellm.store import open_store
        with open_store(self.db) as store:
            return [m for m in store.messages(store.local_user(), cid) if m.role == "assistant"]


def shown_reply(page) -> str:
    """The raw text of the last reply as the page holds it (what it showed, as markdown)."""
    return page.evaluate("S.turns.length ? S.turns[S.turns.length - 1].message.content : ''")


def start_reply(page, text="Write a long story about a dragon and a baker.", max_tokens=300):
    settings(page, max_tokens=max_tokens, temperature=1, seed=5)
    send(page, text)
    page.wait_for_function("() => S.streaming && S.streaming.id && "
                           "S.turns[S.turns.length - 1].message.content.length > 40")


def test_kill_9_mid_reply_loses_nothing_shown(chromium, tmp_path, default_gguf):
    server = Serve(tmp_path, default_gguf)
    try:
        ctx, page, watch = open_page(chromium, server.url)
        start_reply(page)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        page.wait_for_selector("#connection:not([hidden]) >> text=Lost connection")
        shown = shown_reply(page)
        cid = page.evaluate("S.conv.id")
        assert page.locator(".cursor").count() == 0 and page.is_visible("#send")
        assert page.is_visible("#retry")                                   # offers Retry
        assert "Failed to fetch" not in page.locator("body").inner_text()
        stored = server.replies(cid)[-1]
        assert stored.content.startswith(shown) and len(shown) > 40   # every word shown is kept
        assert stored.incomplete and stored.finish_reason is None
        # back again: the page finds it by itself (/health), reads the reply back, offers more
        server.start()
        page.wait_for_selector("#connection", state="hidden", timeout=20_000)
        reply = page.locator(".msg.assistant").last
        reply.locator(".badge >> text=interrupted").wait_for()
        assert reply.locator(".body").inner_text().split()[:5] == \
            page.evaluate("S.turns[S.turns.length - 1].message.content").split()[:5]
        assert reply.locator(".regenerate").is_enabled() and reply.locator(".continue").is_visible()
        assert reply.locator(".thumb.up").is_enabled()                    # it can be rated
        assert page.locator(".msg.user .edit").is_enabled()
        # and the next message goes through
        settings(page, max_tokens=3, temperature=0)
        send(page, "Are you there?")
        page.wait_for_function("() => !S.streaming && S.turns.length === 4 && "
                               "!S.turns[3].message.incomplete")
        assert watch.dialogs == []
        ctx.close()
    finally:
        server.stop_now()


def test_ctrl_c_stops_within_seconds_keeping_the_text(chromium, tmp_path, default_gguf):
    server = Serve(tmp_path, default_gguf)
    api_lines: list[str] = []

    def stream_api():   # an API client streaming too (prompt + max_tokens fit the 512 context)
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "stream": True, "max_tokens": 440, "temperature": 1, "seed": 3,
                "messages": [{"role": "user", "content": "Tell a very long story."}]}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                              timeout=60) as r:
                for line in r.iter_lines():
                    api_lines.append(line)
        except httpx.HTTPError:
            pass
    try:
        ctx, page, watch = open_page(chromium, server.url)
        api = threading.Thread(target=stream_api, daemon=True)
        api.start()
        deadline = time.monotonic() + 30
        while sum(x.startswith("data: {") for x in api_lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(x.startswith("data: {") for x in api_lines) >= 3, api_lines
        start_reply(page, max_tokens=400)    # both run when Ctrl+C comes (~10 s of work each)
        cid = page.evaluate("S.conv.id")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(15)
        took = time.monotonic() - t0
        api.join(10)
        assert "data: [DONE]" not in api_lines      # cut, not finished
        err = server.proc.stderr.read()
        assert took < 8, (took, err)
        assert "stopping: 1 web reply (stopped now, its text kept) and 1 API request (cut after" \
            in err, err
        assert "Traceback" not in err
        page.wait_for_selector(".msg.assistant .badge.stopped")
        shown = shown_reply(page)
        stored = server.replies(cid)[-1]
        assert stored.finish_reason == "stopped" and stored.incomplete
        assert stored.content.startswith(shown) and len(shown) > 40
        ctx.close()
        # a second Ctrl+C quits at once, however much is open
        server.start()
        threading.Thread(target=stream_api, daemon=True).start()
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(15)
        assert time.monotonic() - t0 < 2.5
        assert "quitting now" in server.proc.stderr.read()
    finally:
        server.stop_now()
