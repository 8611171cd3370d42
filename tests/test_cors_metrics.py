"""CORS (serve/cors.py, in the guard) and /metrics (serve/metrics.py): preflights answered for
allowed origins before the key is checked and refused for others, Access-Control-Allow-Origin
on every answer to an allowed origin (the guard's 401 too), the --cors-origins rules; a page
served from another origin calling the API through CORS in real headless Chromium (and being
blocked where the origin is not allowed); /metrics in Prometheus' text format behind the key,
its counters equal to the usage the API reported."""
from __future__ import annotations

import http.server
import os
import threading

import httpx
import pytest

from homellm.errors import HomellmError
from homellm.serve import create_app
from homellm.serve.cors import CorsPolicy
from test_serve import MODEL, LiveServer, registry_for

KEY = "cors-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_origin_rules():
    default = CorsPolicy.parse(None)
    for origin in ("http://localhost:5173", "http://127.0.0.1", "https://[::1]:8443", "http://LOCALHOST:3000"):
        assert default.allows(origin), origin
    for origin in ("https://evil.example", "http://localhost.evil.example", "null", None, ""):
        assert not default.allows(origin), origin
    mine = CorsPolicy.parse("https://app.example.org, http://localhost:3000")
    assert mine.allows("https://app.example.org") and mine.allows("http://localhost:3000")
    assert not mine.allows("http://localhost:3001") and not mine.allows("http://app.example.org")
    assert CorsPolicy.parse("*").allows("https://anything.example")
    assert not CorsPolicy.parse("none").allows("http://localhost:3000")
    with pytest.raises(HomellmError, match="--cors-origins"):
        CorsPolicy.parse("localhost:3000")


@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=2, ctx=512), api_key=KEY))
    yield live
    live.close()


def test_preflight_and_response_headers(server):
    origin = {"Origin": "http://localhost:5173"}
    r = httpx.options(server.url + "/v1/chat/completions", headers={**origin, **PREFLIGHT})
    assert r.status_code == 204   # no key on a preflight: browsers never send one
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    r = httpx.options(server.url + "/api/chat", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    # the guard's own 401 carries the header, so the page can read why
    r = httpx.get(server.url + "/v1/models", headers=origin)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = httpx.get(server.url + "/v1/models", headers={**origin, **AUTH})
    assert r.status_code == 200 and r.headers["vary"] == "Origin"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example", **AUTH})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
    # the web app's own routes stay same-origin: a local page on another port cannot read them
    r = httpx.options(server.url + "/api/conversations", headers={**origin, **PREFLIGHT})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/api/me", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/api/tags", headers={**origin, **AUTH})
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_metrics_follow_the_traffic(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    before = httpx.get(server.url + "/metrics", headers=AUTH).text
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0})
    usage = r.json()["usage"]
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text

    def value(sample: str, body: str = text) -> float:
        return next((float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                     if line.startswith(sample + " ")), 0.0)

    model = 'model="smollm2"'
    assert value(f"homellm_prompt_tokens_total{{{model}}}") - value(
        f"homellm_prompt_tokens_total{{{model}}}", before) == usage["prompt_tokens"]
    assert value(f"homellm_completion_tokens_total{{{model}}}") - value(
        f"homellm_completion_tokens_total{{{model}}}", before) == usage["completion_tokens"] == 5
    assert value('homellm_requests_total{path="/v1/chat/completions",status="200"}') >= 1
    assert value('homellm_requests_total{path="/metrics",status="401"}') >= 1
    count = value(f"homellm_time_to_first_token_seconds_count{{{model}}}")
    assert count >= 1 and value(f'homellm_time_to_first_token_seconds_bucket{{{model},le="+Inf"}}') == count
    assert value(f"homellm_time_per_output_token_seconds_count{{{model}}}") >= 1
    assert value(f"homellm_model_loaded{{{model}}}") == 1
    assert value(f"homellm_queue_depth{{{model}}}") == 0
    for line in text.splitlines():   # every sample line: name{labels} number
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# -- a page on another origin, in Chromium ---------------------------------------------------

CHROMIUM = os.environ.get("HOMELLM_CHROMIUM", "/usr/bin/chromium")
PAGE = b"""<!doctype html><title>other origin</title><pre id=out>...</pre><script>
async function ask(api) {
  try {
    const r = await fetch(api + '/v1/chat/completions', {method: 'POST',
      headers: {'Authorization': 'Bearer cors-key', 'Content-Type': 'application/json'},
      body: JSON.stringify({model: 'smollm2', messages: [{role: 'user', content: 'Hi'}],
                            max_tokens: 4, temperature: 0})});
    const j = await r.json();
    return 'ok ' + r.status + ' ' + j.usage.completion_tokens;
  } catch (e) { return 'blocked ' + e.name; }
}
</script>"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_origin():
    """A static page on its own port of localhost: another origin than the API's 127.0.0.1."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
def test_a_page_on_another_origin_calls_the_api_in_chromium(server, page_origin, default_gguf):
    sync_api = pytest.importorskip("playwright.sync_api")
    closed = LiveServer(create_app(registry_for(default_gguf, max_batch=1, ctx=256), api_key=KEY,
                                   cors_origins="https://only.example.org"))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(page_origin + "/")
            assert page.evaluate("location.origin") != server.url
            assert page.evaluate(f"ask('{server.url}')") == "ok 200 4"
            assert page.evaluate(f"ask('{closed.url}')") == "blocked TypeError"
            browser.close()
    finally:
        closed.close()
