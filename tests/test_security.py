"""`homellm serve` as an attacker meets it (issue 14): the API key on every route, 401 before
any body is read, the first-run setup race, login limits per (user, address) and the
admin's unlock, body and prompt size limits while /health stays quick, the Host check
against DNS rebinding, read timeouts on idle connections, imports held to what the app
accepts, and `--auth` without argon2. Real servers on 127.0.0.1 (test_web_api.LiveServer:
the app and the uvicorn protocol `homellm serve` runs), the default model, httpx and raw
sockets."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.routing import APIRoute
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)
from test_web_api import LiveServer, free_port, new_conversation, say

from homellm.serve.guard import PUBLIC_EXACT, PUBLIC_PREFIXES, HostRule
from homellm.store import AuthConfig

KEY = "sesame-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
FAST = dict(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, default_gguf):
    """--api-key without --auth: the page asks for the key."""
    s = LiveServer(tmp_path_factory.mktemp("keyed") / "k.db", default_gguf, api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed_auth(tmp_path_factory, default_gguf):
    """--api-key with --auth: a login session stands for the key on /api/*."""
    s = LiveServer(tmp_path_factory.mktemp("keyauth") / "ka.db", default_gguf, api_key=KEY,
                   auth=True, auth_config=AuthConfig(**FAST))
    yield s
    s.close()


def concrete(path: str) -> str:
    """A route's path with each {parameter} filled in."""
    out, depth, name = "", 0, ""
    for ch in path:
        if ch == "{":
            depth, name = 1, ""
        elif ch == "}":
            depth, out = 0, out + "x1"
        elif not depth:
            out += ch
    return out


def _flat(routes, prefix=""):
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers whole
            yield from _flat(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            yield prefix, route


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app has, so that a new route is covered."""
    out = []
    for prefix, route in _flat(app.routes):
        assert isinstance(route, APIRoute), route  # a route of another kind: cover it here
        for method in sorted(route.methods - {"HEAD"}):
            out.append((method, concrete(prefix + route.path)))
    return out


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


@pytest.mark.parametrize("server_name", ["keyed", "keyed_auth"])
def test_the_key_guards_every_route_before_its_body_is_read(server_name, request):
    server = request.getfixturevalue(server_name)
    routes = every_route(server.app)
    paths = {p for _, p in routes}
    assert {"/api/conversations", "/api/import", "/api/export", "/api/users",
            "/v1/chat/completions", "/api/conversations/x1/generate"} <= paths
    guarded = [(m, p) for m, p in routes if not is_public(m, p)]
    assert len(guarded) >= 20
    with httpx.Client(base_url=server.url, timeout=30) as http:
        me = http.get("/api/me").json()
        for method, path in guarded + [("GET", "/v1/nope"), ("POST", "/api/nope")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
                # a broken JSON body and the page's CSRF token: only the key is missing
                r = http.request(method, path, content=b"{", headers={
                    **headers, "Content-Type": "application/json", "X-CSRF-Token": me["csrf_token"]})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        # the page and what it needs to show a login stay reachable, and say nothing more
        assert http.get("/").status_code == 200 and http.get("/static/app.js").status_code == 200
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/health", headers=BEARER).json()["models"][0]["id"] == "smollm2:135m"
        if server_name == "keyed":
            assert me["user"] is None and me["key_required"] is True
        # with the key, the same routes answer
        r = http.get("/api/conversations", headers=BEARER)
        assert r.status_code == (200 if server_name == "keyed" else 401), r.text
        assert http.post("/v1/chat/completions", content=b"{", headers={
            **BEARER, "Content-Type": "application/json"}).status_code == 400


def test_the_page_logs_in_with_the_key(keyed):
    c = keyed.client()
    assert c.refresh()["key_required"] is True
    assert c.post("/api/key-login", json={"key": "wrong"}).status_code == 401
    r = c.post("/api/key-login", json={"key": KEY})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"].lower()
    assert "homellm_key=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    me = c.refresh()
    assert me["key_required"] is False and me["user"]["username"] == "local" and me["key_cookie"]
    cid = new_conversation(c, title="behind the key")
    assert c.get(f"/api/conversations/{cid}").status_code == 200
    assert c.get("/v1/models").status_code == 401  # the cookie is the web app's, not the API's
    # a forged cookie opens nothing; logging out forgets the key
    forged = httpx.get(keyed.url + "/api/conversations", cookies={"homellm_key": "forged"})
    assert forged.status_code == 401
    assert c.post("/api/logout").status_code == 200
    assert c.get("/api/conversations").status_code == 401 and c.refresh()["key_required"]
    c.close()


def test_wrong_keys_on_the_page_are_throttled(tmp_path, default_gguf):
    s = LiveServer(tmp_path / "t.db", default_gguf, api_key=KEY)
    try:
        c = s.client()
        codes = [c.post("/api/key-login", json={"key": f"guess-{i}"}).status_code
                 for i in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429], codes
        assert c.post("/api/key-login", json={"key": KEY}).status_code == 429
        c.close()
    finally:
        s.close()


def test_with_auth_the_login_stands_for_the_key(keyed_auth):
    c = keyed_auth.client()
    me = c.refresh()
    assert me["auth"] and me["needs_setup"] and not me["key_required"]
    assert c.get("/api/conversations").json()["error"]["code"] == "invalid_api_key"
    r = c.post("/api/setup", json={"username": "root", "password": "root-pass-1"})
    assert r.status_code == 200, r.text
    c.refresh()
    cid = new_conversation(c, title="mine")
    assert say(c, cid, "hello")
    assert c.get("/v1/models").status_code == 401   # the session is not the API key
    assert httpx.get(keyed_auth.url + "/api/conversations", headers=BEARER).status_code == 401
    c.close()


# ------------------------------------------------------------------ --auth: setup and logins
def _race_setup(url: str, n: int = 6) -> list[int]:
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(n)]
    tokens = [c.get("/api/me").json()["csrf_token"] for c in clients]
    barrier = threading.Barrier(n)

    def setup(i):
        barrier.wait()
        return clients[i].post("/api/setup", headers={"X-CSRF-Token": tokens[i]}, json={
            "username": f"admin{i}", "password": f"password-{i}"}).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(setup, range(n)))
    for c in clients:
        c.close()
    return codes


def test_concurrent_setups_make_one_admin(tmp_path, default_gguf):
    s = LiveServer(tmp_path / "race.db", default_gguf, auth=True, auth_config=AuthConfig(**FAST))
    try:
        codes = _race_setup(s.url)
        assert sorted(codes) == [200] + [409] * 5, codes
        accounts = [u for u in s.store.list_users() if u.has_password]
        assert len(accounts) == 1 and accounts[0].is_admin
    finally:
        s.close()


@pytest.mark.slow
def test_concurrent_setups_make_one_admin_on_postgresql(pg_url, default_gguf):
    s = LiveServer(pg_url, default_gguf, auth=True, auth_config=AuthConfig(**FAST))
    try:
        codes = _race_setup(s.url)
        assert sorted(codes) == [200] + [409] * 5, codes
        assert sum(u.has_password for u in s.store.list_users()) == 1
    finally:
        s.close()


def test_setup_needs_the_console_token_when_given(tmp_path, default_gguf):
    s = LiveServer(tmp_path / "tok.db", default_gguf, auth=True, auth_config=AuthConfig(**FAST),
                   setup_token="console-token-1")
    try:
        c = s.client()
        me = c.refresh()
        assert me["needs_setup"] and me["setup_token_required"]
        for token in (None, "", "wrong"):
            body = {"username": "eve", "password": "eve-pass-12"}
            if token is not None:
                body["setup_token"] = token
            e = c.post("/api/setup", json=body)
            assert e.status_code == 403 and e.json()["error"]["param"] == "setup_token", e.text
        assert s.store.needs_setup()
        r = c.post("/api/setup", json={"username": "owner", "password": "owner-pass-1",
                                       "setup_token": "console-token-1"})
        assert r.status_code == 200 and r.json()["user"]["is_admin"]
        c.close()
    finally:
        s.close()


def _from(address: str):
    return {"transport": httpx.HTTPTransport(local_address=address)}


def test_failed_logins_lock_one_address_and_the_admin_unlocks(tmp_path, default_gguf):
    config = AuthConfig(**FAST, max_failures=3, lockout_s=60)
    s = LiveServer(tmp_path / "locks.db", default_gguf, auth=True, auth_config=config)
    try:
        s.store.create_first_admin("admin", "admin-pass-1")
        attacker = s.client(**_from("127.0.0.2"))
        for _ in range(3):
            assert attacker.post("/api/login", json={"username": "admin", "password": "guess"}
                                 ).status_code == 401
        e = attacker.post("/api/login", json={"username": "admin", "password": "admin-pass-1"})
        assert e.status_code == 429 and 55 <= int(e.headers["retry-after"]) <= 61, e.text
        # the real admin, elsewhere, is not locked out by someone else's failures
        admin = s.client(**_from("127.0.0.1"))
        r = admin.post("/api/login", json={"username": "admin", "password": "admin-pass-1"})
        assert r.status_code == 200, r.text
        admin.refresh()
        users = {u["username"]: u for u in admin.get("/api/users").json()["users"]}
        assert users["admin"]["locked_s"] > 50
        assert admin.post("/api/users/admin/unlock").json()["cleared"] >= 1
        assert admin.get("/api/users").json()["users"][0]["locked_s"] == 0
        assert admin.post("/api/users/nobody/unlock").status_code == 404
        assert attacker.post("/api/login", json={"username": "admin", "password": "admin-pass-1"}
                             ).status_code == 200
        # only an admin unlocks
        s.store.create_user("bob", "bob-pass-12")
        bob = s.client(**_from("127.0.0.3"))
        bob.post("/api/login", json={"username": "bob", "password": "bob-pass-12"})
        bob.refresh()
        assert bob.post("/api/users/admin/unlock").status_code == 403
        for c in (attacker, admin, bob):
            c.close()
    finally:
        s.close()


def test_concurrent_wrong_passwords_are_checked_at_most_the_limit(tmp_path, default_gguf):
    config = AuthConfig(**FAST, max_failures=3)
    s = LiveServer(tmp_path / "conc.db", default_gguf, auth=True, auth_config=config)
    try:
        s.store.create_first_admin("carol", "carol-pass-1")
        csrf = httpx.get(s.url + "/api/me").json()["csrf_token"]
        barrier = threading.Barrier(12)

        def attempt(_):
            with httpx.Client(base_url=s.url, timeout=60) as c:
                barrier.wait()
                return c.post("/api/login", headers={"X-CSRF-Token": csrf},
                              json={"username": "carol", "password": "wrong-pass"}).status_code

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(attempt, range(12)))
        assert codes.count(401) == 3 and codes.count(429) == 9, codes
    finally:
        s.close()


# ------------------------------------------------------------------ sizes and the event loop
def _raw(port: int, head: bytes, body_chunks=(), timeout: float = 30) -> bytes:
    """Send a raw request (head, then the body pieces); the response bytes until close or
    the end of a Content-Length response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and stopped reading: fine
            pass
        data = b""
        while True:
            try:
                piece = s.recv(65536)
            except OSError:
                break
            if not piece:
                break
            data += piece
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = [int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(data) >= head_end + 4 + length[0]:
                    break
        return data


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_oversized_bodies_get_413_before_they_are_read(keyed):
    port = keyed.port
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 << 20}\r\n\r\n").encode()
    t0 = time.monotonic()
    status, body = _status_and_json(_raw(port, head))  # no body sent at all
    assert status == 413 and time.monotonic() - t0 < 5
    assert body["error"]["code"] == "request_too_large" and set(body["error"]) == {
        "message", "type", "param", "code"}
    # a body without a Content-Length is counted as it comes
    def chunks():
        piece = b"x" * (1 << 20)
        for _ in range(12):
            yield piece
    r = httpx.post(keyed.url + "/v1/chat/completions", content=chunks(),
                   headers={**BEARER, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # the import has its own limit (64 MB): 9 MB of junk is read, and refused as junk
    c = keyed.client(headers=BEARER)
    r = c.post("/api/import", content=b"y" * (9 << 20))
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    head = (f"POST /api/import HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}"
            f"\r\nX-CSRF-Token: {c.csrf}\r\nContent-Length: {65 << 20}\r\n\r\n").encode()
    status, body = _status_and_json(_raw(port, head))
    assert status == 413 and "64 MB" in body["error"]["message"]
    c.close()


def _health_latencies(url: str, stop: threading.Event) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as http:
        while not stop.is_set() or len(out) < 3:
            t0 = time.monotonic()
            assert http.get(url + "/health").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.05)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("megabytes", [30, 6])
def test_health_answers_within_a_second_during_a_huge_request(keyed, megabytes):
    """30 MB: over the body cap (413). 6 MB: under it, and refused from its length before
    tokenizing (tokenizing it on the event loop blocked every client for seconds)."""
    text = "ab " * (megabytes * (1 << 20) // 3)
    body = json.dumps({"model": "smollm2:135m", "messages": [{"role": "user", "content": text}]})
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        latencies = pool.submit(_health_latencies, keyed.url, stop)
        time.sleep(0.2)
        t0 = time.monotonic()
        r = httpx.post(keyed.url + "/v1/chat/completions", content=body.encode(), timeout=120,
                       headers={**BEARER, "Content-Type": "application/json"})
        took = time.monotonic() - t0
        time.sleep(0.3)
        stop.set()
        worst = max(latencies.result())
    if megabytes == 30:
        assert r.status_code == 413, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least" in r.json()["error"]["message"]
    assert worst < 1.0, (worst, took)


def test_a_lone_surrogate_in_a_message_is_a_400(keyed):
    body = '{"model": "smollm2:135m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = httpx.post(keyed.url + "/v1/chat/completions", content=body.encode(),
                   headers={**BEARER, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------ Host, idle connections
def test_host_header_must_name_this_server(keyed, tmp_path, default_gguf):
    for host, ok in ((f"127.0.0.1:{keyed.port}", True), (f"localhost:{keyed.port}", True),
                     ("[::1]:80", True), ("app.localhost", True), ("evil.example", False),
                     (f"evil.example:{keyed.port}", False), ("10.0.0.8", False),
                     ("localhost.evil.example", False)):
        r = httpx.get(keyed.url + "/health", headers={"Host": host})
        assert (r.status_code == 200) == ok, (host, r.status_code, r.text)
        if not ok:
            assert r.json()["error"]["code"] == "host_not_allowed"
            assert "--allowed-hosts" in r.json()["error"]["message"]
    # before the key check too: a rebinding page gets nothing, not even a 401 that says why
    assert httpx.get(keyed.url + "/api/conversations", headers={"Host": "evil.example"}
                     ).json()["error"]["code"] == "host_not_allowed"
    s = LiveServer(tmp_path / "hosts.db", default_gguf, allowed_hosts=["llm.home.arpa",
                                                                      ".example.org"])
    try:
        for host, ok in (("llm.home.arpa", True), ("LLM.home.arpa.", True), ("a.example.org", True),
                         ("example.org", True), ("evil.example", False)):
            assert (httpx.get(s.url + "/health", headers={"Host": host}).status_code == 200) == ok
    finally:
        s.close()


def test_host_rule_for_each_bind_address():
    star = HostRule("127.0.0.1", ["*"])
    assert star.allows("anything.example")
    wild = HostRule("0.0.0.0", [])
    assert wild.allows("192.168.1.20:8080") and wild.allows("[fe80::1]:80")
    assert wild.allows(socket.gethostname()) and not wild.allows("evil.example")
    one = HostRule("192.168.1.20", [])
    assert one.allows("192.168.1.20") and not one.allows("192.168.1.21")
    assert one.allows("127.0.0.1") and not one.allows("evil.example")
    loop = HostRule("127.0.0.1", [])
    assert not loop.allows(socket.gethostname() + ".evil") and loop.allows(None)


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("idle") / "i.db", default_gguf,
                   timeouts={"header_timeout_s": 1.0, "body_timeout_s": 1.0})
    yield s
    s.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            piece = sock.recv(4096)
            if not piece:
                return data
            data += piece
    except socket.timeout:
        return None
    except ConnectionResetError:
        return data


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: 127.", b"POST /api/conver",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                                  b'{"model": '])
def test_idle_and_half_sent_requests_time_out(impatient, sent):
    with socket.create_connection(("127.0.0.1", impatient.port)) as s:
        s.sendall(sent)
        got = _closed_within(s, 6.0)
    assert got is not None, "the server kept a stalled connection open"
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
    assert httpx.get(impatient.url + "/health").status_code == 200


def test_a_slow_but_steady_body_and_a_long_request_are_not_cut(impatient):
    """Each piece within the body timeout: the request completes; a kept-alive connection
    serves a second request."""
    body = json.dumps({"title": "slow"}).encode()
    me = httpx.get(impatient.url + "/api/me").json()
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as s:
        s.sendall(f"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  f"application/json\r\nX-CSRF-Token: {me['csrf_token']}\r\nContent-Length: "
                  f"{len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 5):
            time.sleep(0.3)  # 1.5 s in all, more than the body timeout, each piece within it
            s.sendall(body[i:i + 5])
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 201"), data


# ------------------------------------------------------------------ imports
def _tree(text="Hi", mid="m-1", homellm=None, **message) -> bytes:
    d = {"message_tree_id": mid, "prompt": {"message_id": mid, "role": "prompter", "text": text,
                                           **message}}
    if homellm is not None:
        d["homellm"] = homellm
    return (json.dumps(d) + "\n").encode()


@pytest.mark.parametrize("content,words", [
    (_tree(text="x" * 200_001), "text: 200001 characters, at most 200000"),
    (_tree(mid="../../etc"), "message_tree_id: expected an id"),
    (_tree(mid="a" * 129), "message_tree_id: expected an id"),
    (_tree(mid="ok", replies=[{"message_id": "a/b?c", "role": "assistant", "text": "x"}]),
     "message_id: expected an id"),
    (_tree(homellm={"sampling": {"temperature": "hot"}}), "homellm.sampling.temperature"),
    (_tree(homellm={"sampling": {"seed": -1}}), "homellm.sampling.seed"),
    (_tree(homellm={"system_prompt": "s" * 200_001}), "homellm.system_prompt"),
    (_tree(labels={"quality": {"value": float("nan"), "count": 1}}), "labels.quality.value"),
    (b'{"message_tree_id": "t", "prompt": {"message_id": "t", "role": "prompter", '
     b'"text": "a\\ud800b"}}\n', "surrogate"),
])
def test_imports_are_held_to_what_the_app_accepts(keyed, content, words):
    c = keyed.client(headers=BEARER)
    n = len(c.get("/api/conversations").json()["conversations"])
    e = c.post("/api/import", content=content, headers={"X-Filename": "bad.jsonl"})
    assert e.status_code == 400 and words in e.json()["error"]["message"], e.text
    assert e.json()["error"]["param"] == "file"
    assert len(c.get("/api/conversations").json()["conversations"]) == n
    c.close()


@pytest.mark.parametrize("depth", [2000, pytest.param(50_000, marks=pytest.mark.slow)])
def test_an_import_of_a_deep_tree_is_never_a_500(keyed, depth):
    opening = "".join(f'{{"message_id": "d{i}", "role": "{"assistant" if i % 2 else "prompter"}", '
                      f'"text": "t", "replies": [' for i in range(depth))
    content = ('{"message_tree_id": "d0", "prompt": ' + opening + "]}" * depth + "}\n").encode()
    c = keyed.client(headers=BEARER)
    e = c.post("/api/import", content=content, headers={"X-Filename": "deep.jsonl"})
    assert e.status_code in (201, 400), e.text  # the reader may take it, or refuse it clearly
    if e.status_code == 400:
        assert "deep.jsonl" in e.json()["error"]["message"]
    c.close()


def test_an_imported_unknown_model_falls_back_to_the_default(keyed):
    c = keyed.client(headers=BEARER)
    r = c.post("/api/import", content=_tree(mid="mm-1", homellm={
        "model": "../../etc/passwd", "sampling": {"temperature": 0.5}}))
    assert r.status_code == 201, r.text
    assert "is not served here" in r.json()["warnings"][0]
    conv = r.json()["conversations"][0]
    assert conv["model"] is None and conv["sampling"] == {"temperature": 0.5}
    c.close()


# ------------------------------------------------------------------ the command
def _serve(args: list[str], tmp_path, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "HOMELLM_HOME": str(tmp_path / "home"), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "homellm", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def test_serve_auth_refuses_to_start_without_argon2(tmp_path, default_gguf):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoArgon2:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'argon2' or name.startswith('argon2.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'argon2'\", name=name)\n"
        "sys.meta_path.insert(0, _NoArgon2())\n")
    p = _serve(["-m", str(default_gguf), "--port", str(free_port()), "--auth",
                "--db", str(tmp_path / "a.db")], tmp_path,
               {"PYTHONPATH": f"{block}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    try:
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # it started serving: the check is missing
            p.kill()
            p.wait()
    assert p.returncode == 1, out
    assert "error: --auth needs argon2-cffi" in out and "pip install argon2-cffi" in out, out
    assert "Traceback" not in out


@pytest.mark.slow
def test_serve_off_loopback_prints_a_setup_token(tmp_path, default_gguf):
    port = free_port()
    p = _serve(["-m", str(default_gguf), "--host", "0.0.0.0", "--port", str(port), "--auth",
                "--db", str(tmp_path / "s.db")], tmp_path)
    try:
        token, deadline = None, time.monotonic() + 90
        while token is None and time.monotonic() < deadline:
            line = p.stdout.readline()
            assert line, "the server exited"
            if line.startswith("setup token: "):
                token = line.split()[2]
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                me = httpx.get(url + "/api/me", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert me["setup_token_required"]
        h = {"X-CSRF-Token": me["csrf_token"]}
        body = {"username": "owner", "password": "owner-pass-1"}
        assert httpx.post(url + "/api/setup", json=body, headers=h).status_code == 403
        r = httpx.post(url + "/api/setup", json={**body, "setup_token": token}, headers=h)
        assert r.status_code == 200, r.text
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 400
    finally:
        p.terminate()
        p.wait(timeout=30)
