"""The web app's speed as a user sees it, in headless Chromium against `homellm serve` on the
default model (issue 18): first paint, then time to the first streamed token and tokens/s as
the page shows them, idle and beside a one-core CPU hog; the page's gzipped size without math
(target < 60 KB) and its first paint (target < 300 ms). Prints JSON.

  first paint   a fresh browser context (no cache) opens the page: the paint timings
                (first-paint, first-contentful-paint) and when the app shows (#app visible:
                the models and the user's settings are known), each the median of --paints runs
  reply         a new chat, Enter pressed in the composer (timed in the page at the keydown),
                a MutationObserver on the messages: TTFT = keydown -> the reply's first text in
                the DOM; tokens/s = (completion tokens - 1) / (first text -> last change), the
                tokens being the stored reply's own count; --replies runs a load, greedy,
                --max-tokens each (median; EOS ends a reply early, its count is its own)
  api           the same question over /v1/chat/completions streamed with httpx: the server's
                side without the page (TTFT, decode tok/s), to compare with the peer
  size          the page, app.js, app.css and markdown-it.min.js with Accept-Encoding: gzip
                (what a chat without math loads), and what a first message with math adds

The peer is llama-cpp-python's server (HOMELLM_PEER_PYTHON, as benchmarks/serve_bench.py;
default /work/peer/bin/python) where it is installed. It ships no web UI (llama.cpp's own UI
is part of the C++ llama-server, not of the Python package): that is said in the JSON
(`llama_cpp.web_ui`), and its API side is measured as ours is, on the same threads.

The hog is benchmarks/busy_bench.py's (a process spinning in `while True: pass`). The numbers
depend on the machine's other work: `load_average_before` is recorded.

usage: python benchmarks/web_bench.py [--model PATH] [--threads 2] [--max-tokens 128]
       [--replies 3] [--paints 5] [--loads 0,1] [--no-peer] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from busy_bench import hogs, load_label  # noqa: E402
from common import free_port, start_server, stop  # noqa: E402  (benchmarks/common.py)

CHROMIUM = os.environ.get("HOMELLM_CHROMIUM", "/usr/bin/chromium")
QUESTION = "Write a long story about a dragon who learns to bake bread."
SIZE_TARGET = 60_000
PAINT_TARGET_MS = 300
CHAT_FILES = ("/", "/static/app.js", "/static/app.css", "/static/markdown-it.min.js")
MATH_FILES = ("/static/math.js", "/static/katex/katex.min.js", "/static/katex/katex.min.css")

# In the page: when Enter was pressed, and each change of the newest reply's text.
WATCH = """() => {
  window.__bench = { sent: null, changes: [] };
  document.getElementById('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter') window.__bench.sent = performance.now(); }, true);
  new MutationObserver(() => {
    const b = [...document.querySelectorAll('.msg.assistant:not(.pending) .body')].pop();
    const n = b ? b.textContent.trim().length : 0;
    const c = window.__bench.changes;
    if (n && (!c.length || c[c.length - 1][1] !== n)) c.push([performance.now(), n]);
  }).observe(document.getElementById('messages'), { childList: true, subtree: true, characterData: true });
}"""


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def gzipped_bytes(url: str, paths) -> dict:
    import httpx
    out = {}
    for path in paths:
        with httpx.stream("GET", url + path, headers={"Accept-Encoding": "gzip"}) as r:
            r.read()
            out[path] = {"bytes": r.num_bytes_downloaded,
                         "gzip": r.headers.get("content-encoding") == "gzip"}
    return out


def first_paints(browser, url: str, n: int) -> dict:
    rows = []
    for _ in range(n):
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(url)
        page.wait_for_selector("#app:not([hidden])")
        app_ms = page.evaluate("performance.now()")
        paint = page.evaluate("""Object.fromEntries(performance.getEntriesByType('paint')
                                 .map((e) => [e.name, e.startTime]))""")
        nav = page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
        rows.append({"first_paint_ms": paint.get("first-paint"),
                     "first_contentful_paint_ms": paint.get("first-contentful-paint"),
                     "dom_content_loaded_ms": nav["domContentLoadedEventEnd"],
                     "app_shown_ms_at_most": app_ms})
        ctx.close()
    return {k: med([r[k] for r in rows]) for k in rows[0]} | {"runs": n}


def page_reply(browser, url: str, max_tokens: int) -> dict:
    """One reply in a new chat, as the page shows it."""
    import httpx
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(600_000)
    page.goto(url)
    page.wait_for_selector("#app:not([hidden])")
    page.click("#settings-toggle")
    page.fill("#set-max_tokens", str(max_tokens))
    page.fill("#set-temperature", "0")
    page.locator("#set-temperature").press("Tab")
    page.wait_for_function("() => document.getElementById('settings-status').textContent !== ''")
    page.evaluate(WATCH)
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector(".msg.assistant .regenerate")
    marks = page.evaluate("window.__bench")
    cid = page.evaluate("S.conv.id")
    ctx.close()
    d = httpx.get(f"{url}/api/conversations/{cid}").json()
    reply = [t["message"] for t in d["turns"] if t["message"]["role"] == "assistant"][-1]
    n = reply["completion_tokens"]
    changes = marks["changes"]
    ttft = changes[0][0] - marks["sent"] if changes and marks["sent"] is not None else None
    span = (changes[-1][0] - changes[0][0]) / 1000 if len(changes) > 1 else 0
    return {"ttft_ms": ttft, "tokens": n, "updates": len(changes),
            "tps": (n - 1) / span if n and n > 1 and span > 0 else None,
            "server_decode_tps": (reply.get("timings") or {}).get("predicted_per_second")}


def api_reply(url: str, model: str, max_tokens: int) -> dict:
    """The same question streamed from /v1/chat/completions: TTFT and decode tokens/s."""
    import httpx
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTION}]}
    stamps, usage = [], None
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.monotonic())
    n = (usage or {}).get("completion_tokens") or len(stamps)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0
    return {"ttft_ms": (stamps[0] - t0) * 1000 if stamps else None, "tokens": n,
            "tps": (n - 1) / span if n > 1 and span > 0 else None}


def summary(rows: list[dict]) -> dict:
    return {"ttft_ms": med([r["ttft_ms"] for r in rows]), "tps": med([r["tps"] for r in rows]),
            "tokens": [r["tokens"] for r in rows],
            **({"updates": [r["updates"] for r in rows],
                "server_decode_tps": med([r["server_decode_tps"] for r in rows])}
               if "updates" in rows[0] else {})}


def ours(a, browser) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HOMELLM_HOME=os.environ.get("HOMELLM_HOME", str(Path.home() / ".homellm")))
        cmd = [sys.executable, "-m", "homellm", "serve", "-m", a.model, "--port", str(port),
               "--threads", str(a.threads), "--db", str(Path(tmp) / "bench.db"), "--kv-disk", "0",
               "--preload", "--quiet"]
        proc = start_server(cmd, url, env, subprocess.DEVNULL)
        try:
            import httpx
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            sizes = gzipped_bytes(url, CHAT_FILES)
            math = gzipped_bytes(url, MATH_FILES)
            total = sum(v["bytes"] for v in sizes.values())
            out = {"page_gzip_bytes": total, "page_gzip_target": SIZE_TARGET,
                   "page_gzip_ok": total < SIZE_TARGET and all(v["gzip"] for v in sizes.values()),
                   "page_files": {k: v["bytes"] for k, v in sizes.items()},
                   "math_adds_gzip_bytes": sum(v["bytes"] for v in math.values())}
            api_reply(url, model, 8)                       # warm: the first request's setup
            page_reply(browser, url, 8)
            for n in a.loads:
                label = load_label(n)
                with hogs(n):
                    paint = first_paints(browser, url, a.paints)
                    rows = [page_reply(browser, url, a.max_tokens) for _ in range(a.replies)]
                    api = [api_reply(url, model, a.max_tokens) for _ in range(a.replies)]
                out[label] = {"first_paint": paint,
                              "first_paint_ok": (paint["first_contentful_paint_ms"] or 1e9) < PAINT_TARGET_MS,
                              "page": summary(rows), "api": summary(api)}
                print(f"homellm {label}: {json.dumps(out[label])}", file=sys.stderr)
            return out
        finally:
            stop(proc)


def peer(a) -> dict:
    python = os.environ.get("HOMELLM_PEER_PYTHON", "/work/peer/bin/python")
    if not os.path.exists(python):
        return {"available": False, "why": f"no peer Python at {python} (HOMELLM_PEER_PYTHON)"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [python, "-m", "llama_cpp.server", "--model", a.model, "--port", str(port),
           "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx", "2048",
           "--verbose", "false"]
    try:
        proc = start_server(cmd, url, dict(os.environ), subprocess.DEVNULL)
    except SystemExit as e:
        return {"available": False, "why": str(e)}
    try:
        import httpx
        home = httpx.get(url + "/", follow_redirects=True)
        is_ui = home.status_code == 200 and "text/html" in home.headers.get("content-type", "") \
            and "swagger" not in home.text.lower()
        out = {"available": True, "web_ui": is_ui,
               "web_ui_note": None if is_ui else
               f"GET / answers {home.status_code} ({'Swagger docs' if 'swagger' in home.text.lower() else home.headers.get('content-type')}): "
               "llama-cpp-python's server has no chat page; llama.cpp's web UI ships with the C++ "
               "llama-server only, so page timings exist for homellm alone"}
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        api_reply(url, model, 8)
        for n in a.loads:
            label = load_label(n)
            with hogs(n):
                rows = [api_reply(url, model, a.max_tokens) for _ in range(a.replies)]
            out[label] = {"api": summary(rows)}
            print(f"llama.cpp {label}: {json.dumps(out[label])}", file=sys.stderr)
        return out
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--replies", type=int, default=3, help="replies per load (median)")
    p.add_argument("--paints", type=int, default=5, help="fresh page loads per load (median)")
    p.add_argument("--loads", default="0,1", help="hog processes per measurement (default 0,1)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    a.loads = [int(x) for x in a.loads.split(",")]
    if a.model is None:
        from homellm.catalog.pypi import cached_default_gguf
        a.model = str(cached_default_gguf())
    from playwright.sync_api import sync_playwright
    result = {"model": os.path.basename(a.model), "threads": a.threads, "max_tokens": a.max_tokens,
              "replies": a.replies, "chromium": CHROMIUM, "cpus": os.cpu_count(),
              "load_average_before": round(os.getloadavg()[0], 2)}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            result["homellm"] = ours(a, browser)
        finally:
            browser.close()
    if not a.no_peer:
        result["llama_cpp"] = peer(a)
        for label in (load_label(n) for n in a.loads):
            o, q = result["homellm"].get(label, {}), result["llama_cpp"].get(label)
            if q and o.get("api", {}).get("tps") and q["api"]["tps"]:
                o["api_tps_vs_llama_cpp"] = round(o["api"]["tps"] / q["api"]["tps"], 2)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
