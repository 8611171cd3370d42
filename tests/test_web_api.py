"""The web app's JSON API over HTTP: a real server on 127.0.0.1 (uvicorn), a real SQLite
file, the default model, driven by httpx. Every route's success and error paths; replies
compared with the OpenAI route of the same server (the same engine path)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)

MAX = 8   # tokens per reply: keeps the file fast


class LiveServer:
    """create_app + web_router on a free port in a thread, as `homellm serve` runs them (the
    guarded uvicorn protocol); `.store` is the app's own store, `.app` the app. `serve`:
    create_app's keywords (api_key, allowed_hosts, ...); `timeouts`: the protocol's."""

    def __init__(self, db: Path, gguf: Path, auth: bool = False, auth_config=None,
                 setup_token: str | None = None, timeouts: dict | None = None,
                 models: dict | None = None, **serve):
        import uvicorn

        from homellm.serve import ModelRegistry, ServeConfig, create_app
        from homellm.serve.connections import server_config
        from homellm.serve.web import web_router
        from homellm.store import open_store
        self.store = open_store(db, auth=auth_config)
        registry = ModelRegistry(models or {"smollm2:135m": gguf},
                                 ServeConfig(ctx=512, max_batch=2, prefix_cache_bytes=0,
                                             keep_alive_s=-1))
        self.app = create_app(registry, extra_routers=[
            web_router(self.store, auth=auth, setup_token=setup_token)], **serve)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", self.port,
                                                   **(timeouts or {})))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, **kw) -> "Client":
        return Client(self.url, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.store.close()


class Client(httpx.Client):
    """httpx with the app's CSRF header filled in from GET /api/me (`**kw`: httpx.Client's,
    e.g. headers with an API key, or a transport from another loopback address)."""

    def __init__(self, url: str, **kw):
        super().__init__(base_url=url, timeout=120, **kw)
        self.csrf = ""
        self.refresh()

    def refresh(self) -> dict:
        me = self.get("/api/me").json()
        self.csrf = me["csrf_token"]
        return me

    def build_request(self, method, url, **kw):
        headers = dict(kw.pop("headers", None) or {})
        if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
            headers.setdefault("X-CSRF-Token", self.csrf)
        return super().build_request(method, url, headers=headers, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse(response) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a text/event-stream body."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        out.append((event, json.loads(data)))
    return out


def new_conversation(c: Client, **settings) -> str:
    body = {"sampling": {"max_tokens": MAX, "temperature": 0}, **settings}
    r = c.post("/api/conversations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["conversation"]["id"]


def say(c: Client, cid: str, text: str, parent_id=None) -> str:
    r = c.post(f"/api/conversations/{cid}/messages", json={"content": text, "parent_id": parent_id})
    assert r.status_code == 201, r.text
    return r.json()["message"]["id"]


def reply(c: Client, cid: str, parent_id: str) -> tuple[list, dict]:
    r = c.post(f"/api/conversations/{cid}/generate", json={"parent_id": parent_id})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[0][0] == "start" and events[-1][0] == "done", events
    return events, events[-1][1]["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("web") / "web.db", default_gguf)
    yield s
    s.close()


@pytest.fixture
def c(server):
    client = server.client()
    yield client
    client.close()


# ------------------------------------------------------------------ the page
def test_page_is_offline_and_has_a_strict_csp(c):
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        a = c.get(f"/static/{name}")
        assert a.status_code == 200 and a.headers["content-type"].startswith(kind)
        assert "http://" not in a.text and "https://" not in a.text  # nothing from a CDN
        assert a.headers["content-security-policy"] == csp
    assert "<script>" not in r.text and "http" not in r.text.replace('http-equiv', '')
    js = c.get("/static/app.js").text   # no HTML parsing of strings anywhere in the page
    assert not re.search(r"\.(inner|outer)HTML\s*[+]?=|insertAdjacentHTML|document\.write|"
                         r"\beval\(|new Function", js)
    for bad in ("/static/nope.js", "/static/..%2Fcontext.py", "/static/__init__.py"):
        e = c.get(bad)
        assert e.status_code == 404 and "error" in e.json()


def test_csrf_header_required_on_every_state_change(c):
    me = c.get("/api/me").json()
    assert me["auth"] is False and me["user"]["username"] == "local" and me["csrf_token"]
    before = len(c.get("/api/conversations").json()["conversations"])
    for headers in ({"X-CSRF-Token": ""}, {"X-CSRF-Token": "wrong"}):
        r = c.post("/api/conversations", json={"title": "x"}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    assert len(c.get("/api/conversations").json()["conversations"]) == before
    cid = new_conversation(c, title="keep me")
    r = c.delete(f"/api/conversations/{cid}", headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    assert c.get(f"/api/conversations/{cid}").status_code == 200


def test_accounts_routes_are_off_without_auth(c):
    for path in ("/api/login", "/api/setup"):
        r = c.post(path, json={"username": "a", "password": "password1"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "auth_disabled"


# ------------------------------------------------------------------ conversations
def test_conversation_settings_rename_delete(c):
    r = c.post("/api/conversations", json={"title": "  Colors  ", "model": "smollm2:135m",
                                           "system_prompt": "Be brief.",
                                           "sampling": {"temperature": 0.5, "top_k": 10}})
    assert r.status_code == 201
    conv = r.json()["conversation"]
    assert conv["title"] == "Colors" and conv["model"] == "smollm2:135m"
    assert conv["system_prompt"] == "Be brief."
    assert conv["sampling"] == {"temperature": 0.5, "top_k": 10}
    cid = conv["id"]
    assert cid in [x["id"] for x in c.get("/api/conversations").json()["conversations"]]
    r = c.patch(f"/api/conversations/{cid}", json={"title": "Hues", "sampling": {"seed": 3}})
    assert r.status_code == 200
    got = c.get(f"/api/conversations/{cid}").json()["conversation"]
    assert got["title"] == "Hues" and got["sampling"] == {"seed": 3}
    assert got["system_prompt"] == "Be brief."     # untouched fields stay
    # bad input: 400 naming the field, nothing changed
    for body, param in (({"sampling": {"temperature": 5}}, "sampling.temperature"),
                        ({"sampling": {"top_p": -1}}, "sampling.top_p"),
                        ({"sampling": {"bogus": 1}}, "sampling.bogus"),
                        ({"model": "no-such-model"}, "model"),
                        ({"colour": "red"}, "colour")):
        e = c.patch(f"/api/conversations/{cid}", json=body)
        assert e.status_code == 400, (body, e.text)
        assert e.json()["error"]["param"] == param, e.json()
    assert c.get(f"/api/conversations/{cid}").json()["conversation"] == got
    e = c.post("/api/conversations", content=b"{not json", headers={"Content-Type": "application/json"})
    assert e.status_code == 400 and e.json()["error"]["code"] == "invalid_json"
    assert c.delete(f"/api/conversations/{cid}").json() == {"deleted": cid}
    for method in ("get", "delete"):
        e = getattr(c, method)(f"/api/conversations/{cid}")
        assert e.status_code == 404 and e.json()["error"]["code"] == "not_found"
    assert c.patch(f"/api/conversations/{cid}", json={"title": "x"}).status_code == 404


def test_message_errors(c):
    cid = new_conversation(c)
    assert c.post(f"/api/conversations/{cid}/messages", json={"content": ""}).status_code == 400
    q = say(c, cid, "Hello")
    # two user messages in a row: roles alternate
    e = c.post(f"/api/conversations/{cid}/messages", json={"content": "again", "parent_id": q})
    assert e.status_code == 400 and "alternate" in e.json()["error"]["message"]
    e = c.post(f"/api/conversations/{cid}/messages", json={"content": "x", "parent_id": "nope"})
    assert e.status_code == 400
    assert c.post("/api/conversations/nope/messages", json={"content": "x"}).status_code == 404
    assert c.post("/api/messages/nope/edit", json={"content": "x"}).status_code == 404
    assert c.post("/api/messages/nope/select").status_code == 404
    # the conversation got its title from the first message
    assert c.get(f"/api/conversations/{cid}").json()["conversation"]["title"] == "Hello"


# ------------------------------------------------------------------ replies and branches
def test_streamed_reply_matches_the_openai_route_and_is_saved(c):
    cid = new_conversation(c, system_prompt="You are brief.")
    q = say(c, cid, "Name three colors.")
    events, done = reply(c, cid, q)
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["incomplete"] and start["parent_id"] == q
    text = "".join(d["text"] for e, d in events if e == "delta")
    assert text and done["content"] == text and not done["incomplete"]
    assert done["finish_reason"] in ("stop", "length") and done["completion_tokens"] <= MAX
    assert done["model"] == "smollm2:135m" and done["seed"] is not None
    assert done["timings"]["predicted_n"] == done["completion_tokens"]
    # the same request through /v1/chat/completions: the same greedy text and token counts
    ref = c.post("/v1/chat/completions", json={
        "model": "smollm2:135m", "temperature": 0, "max_tokens": MAX,
        "messages": [{"role": "system", "content": "You are brief."},
                     {"role": "user", "content": "Name three colors."}]}).json()
    assert ref["choices"][0]["message"]["content"] == text
    assert ref["usage"]["prompt_tokens"] == done["prompt_tokens"]
    assert ref["usage"]["completion_tokens"] == done["completion_tokens"]
    # reload: the same branch, and the context use shown
    d = c.get(f"/api/conversations/{cid}").json()
    assert [t["message"]["id"] for t in d["turns"]] == [q, done["id"]]
    assert d["turns"][1]["message"]["content"] == text
    assert d["context"] == {"used": done["prompt_tokens"] + done["completion_tokens"],
                            "ctx": 512, "model": "smollm2:135m", "estimate": False,
                            "left_out": 0}
    models = c.get("/api/models").json()
    assert models["default"] == "smollm2:135m" and models["models"][0]["ctx"] == 512


def test_regenerate_edit_and_walk_branches(c, server):
    cid = new_conversation(c, sampling={"max_tokens": 4, "temperature": 1.0, "seed": 7})
    q = say(c, cid, "Tell me a word.")
    _, a1 = reply(c, cid, q)
    _, a2 = reply(c, cid, q)                     # regenerate: a sibling, not a replacement
    # the conversation's seed is the same, so the same text: nothing was overwritten
    assert a2["id"] != a1["id"] and a2["content"] == a1["content"] and a2["seed"] == 7
    d = c.get(f"/api/conversations/{cid}").json()
    assert d["turns"][1]["sibling_ids"] == [a1["id"], a2["id"]] and d["turns"][1]["index"] == 1
    # regenerate by naming an assistant message: refused, it must be the user message
    e = c.post(f"/api/conversations/{cid}/generate", json={"parent_id": a1["id"]})
    assert e.status_code == 400 and e.json()["error"]["param"] == "parent_id"
    # edit the user message: a new branch
    r = c.post(f"/api/messages/{q}/edit", json={"content": "Tell me a number."})
    assert r.status_code == 201
    q2 = r.json()["message"]["id"]
    _, b1 = reply(c, cid, q2)
    d = c.get(f"/api/conversations/{cid}").json()
    assert [t["message"]["id"] for t in d["turns"]] == [q2, b1["id"]]
    assert d["turns"][0]["sibling_ids"] == [q, q2] and d["turns"][0]["index"] == 1
    # walk back (< 1/2): the first question with its newest reply; remembered on reload
    r = c.post(f"/api/messages/{q}/select")
    assert [t["message"]["id"] for t in r.json()["turns"]] == [q, a2["id"]]
    c.post(f"/api/messages/{a1['id']}/select")
    d = c.get(f"/api/conversations/{cid}").json()
    assert [t["message"]["id"] for t in d["turns"]] == [q, a1["id"]]
    assert d["turns"][0]["index"] == 0 and d["turns"][1]["index"] == 0
    # every message is still there, with its original text
    msgs = {m.id: m for m in server.store.messages(server.store.local_user(), cid)}
    assert len(msgs) == 5 and msgs[q].content == "Tell me a word."
    # a reply edited: the user's own version, a sibling marked not synthetic (OA's meaning)
    r = c.post(f"/api/messages/{a1['id']}/edit", json={"content": "Seven."})
    assert r.status_code == 201
    a3 = r.json()["message"]
    assert a3["parent_id"] == q and a3["content"] == "Seven." and a3["model"] is None
    assert a3["meta"] == {"synthetic": False} and r.json()["turns"][1]["sibling_ids"] == \
        [a1["id"], a2["id"], a3["id"]]
    assert msgs[a1["id"]].content == a1["content"]   # the model's own stays
    # generate errors
    assert c.post("/api/conversations/nope/generate", json={}).status_code == 404
    e = c.post(f"/api/conversations/{cid}/generate", json={"parent_id": "nope"})
    assert e.status_code == 400
    empty = new_conversation(c)
    e = c.post(f"/api/conversations/{empty}/generate")   # no body: the current leaf
    assert e.status_code == 400 and "no message" in e.json()["error"]["message"]


def test_context_overflow_is_refused_before_anything_is_stored(c, server):
    cid = new_conversation(c)
    q = say(c, cid, "word " * 600)          # more than the 512-token context
    e = c.post(f"/api/conversations/{cid}/generate", json={"parent_id": q})
    assert e.status_code == 400 and e.json()["error"]["code"] == "context_length_exceeded"
    assert [m.role for m in server.store.messages(server.store.local_user(), cid)] == ["user"]


def test_stop_keeps_what_was_streamed(c, server):
    cid = new_conversation(c, sampling={"max_tokens": 400, "temperature": 1.0, "seed": 1,
                                        "min_p": 0, "top_k": 0})
    q = say(c, cid, "Write a long story about a dragon.")
    streamed, mid = [], None
    with c.stream("POST", f"/api/conversations/{cid}/generate", json={"parent_id": q}) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "start":
                    mid = data["message"]["id"]
                elif event == "delta":
                    streamed.append(data["text"])
                    if len(streamed) == 3:
                        s = c.post(f"/api/replies/{mid}/stop")
                        assert s.json() == {"stopped": True, "message_id": mid}
                elif event == "done":
                    done = data["message"]
    assert done["id"] == mid and done["finish_reason"] == "stopped" and done["incomplete"]
    assert done["content"] == "".join(streamed) and len(streamed) >= 3
    assert done["completion_tokens"] < 400
    saved = server.store.get_message(server.store.local_user(), mid)
    assert saved.content == done["content"] and saved.finish_reason == "stopped"
    # stopping a finished reply: nothing to stop; unknown: 404
    assert c.post(f"/api/replies/{mid}/stop").json()["stopped"] is False
    assert c.post("/api/replies/nope/stop").status_code == 404


def test_a_client_that_goes_away_leaves_the_reply_running(c, server):
    """The reply runs on the server: a reload or another chat does not stop it (as chat-ui's
    background generations); it is saved to its end and can be watched again meanwhile."""
    cid = new_conversation(c, sampling={"max_tokens": 24, "temperature": 1.0, "seed": 2,
                                        "min_p": 0, "top_k": 0})
    q = say(c, cid, "Write a long poem.")
    with c.stream("POST", f"/api/conversations/{cid}/generate", json={"parent_id": q}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"message"' in line:
                mid = json.loads(line[6:])["message"]["id"]
            if line.startswith("event: delta"):
                break
    again = c.get(f"/api/replies/{mid}/events")   # watched again (or already finished)
    assert again.status_code in (200, 409)
    if again.status_code == 200:
        events = sse(again)
        assert events[0][0] == "start" and events[-1][0] == "done"
    user = server.store.local_user()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replies = [m for m in server.store.messages(user, cid) if m.role == "assistant"]
        if replies and replies[0].finish_reason:
            break
        time.sleep(0.1)
    assert replies[0].finish_reason in ("length", "stop") and not replies[0].incomplete
    assert replies[0].content and replies[0].completion_tokens <= 24
    assert c.get(f"/api/replies/{mid}/events").status_code == 409   # over: nothing to watch


# ------------------------------------------------------------------ ratings and search
def test_ratings(c):
    cid = new_conversation(c)
    q = say(c, cid, "Hi")
    _, a = reply(c, cid, q)
    r = c.put(f"/api/messages/{a['id']}/rating", json={"value": 1, "comment": "clear"})
    assert r.status_code == 200 and r.json()["rating"] == {"value": 1, "comment": "clear"}
    d = c.get(f"/api/conversations/{cid}").json()
    assert d["turns"][1]["rating"] == {"value": 1, "comment": "clear"}
    r = c.put(f"/api/messages/{a['id']}/rating", json={"value": -1})
    assert r.json()["rating"] == {"value": -1, "comment": None}
    for body in ({"value": 2}, {"value": "up"}, {}):
        assert c.put(f"/api/messages/{a['id']}/rating", json=body).status_code == 400
    e = c.put(f"/api/messages/{q}/rating", json={"value": 1})
    assert e.status_code == 400 and "assistant" in e.json()["error"]["message"]
    assert c.put("/api/messages/nope/rating", json={"value": 1}).status_code == 404
    assert c.put(f"/api/messages/{a['id']}/rating", json={"value": 0}).json()["rating"] is None
    assert c.get(f"/api/conversations/{cid}").json()["turns"][1]["rating"] is None


def test_search(c):
    cid = new_conversation(c, title="Weekend plans")
    say(c, cid, "Where do zebrafish live?")
    hits = c.get("/api/search", params={"q": "zebrafish"}).json()["hits"]
    assert [h["conversation_id"] for h in hits] == [cid]
    assert "zebrafish" in hits[0]["snippet"] and hits[0]["title"] == "Weekend plans"
    hits = c.get("/api/search", params={"q": "weekend"}).json()["hits"]
    assert cid in [h["conversation_id"] for h in hits]
    assert c.get("/api/search", params={"q": "xylophonequartz"}).json()["hits"] == []
    assert c.get("/api/search", params={"q": ""}).json()["hits"] == []
    assert c.get("/api/search").status_code == 400


# ------------------------------------------------------------------ export and import
def _shape(d: dict) -> list:
    """A conversation's tree without ids: (depth, role, content, rating) in order."""
    from homellm.data.oasst import tree_from_dict
    out = []

    def walk(m, depth):
        out.append((depth, m.role, m.text, m.emojis))
        for r in m.replies:
            walk(r, depth + 1)
    walk(tree_from_dict(d).prompt, 0)
    return out


def test_export_import_round_trip(c, server):
    from homellm.data.oasst import parse_trees
    cid = new_conversation(c, title="Round trip", system_prompt="Be kind.")
    q = say(c, cid, "Hello <b>there</b>")
    _, a1 = reply(c, cid, q)
    _, a2 = reply(c, cid, q)
    c.put(f"/api/messages/{a1['id']}/rating", json={"value": 1, "comment": "good"})
    c.put(f"/api/messages/{a2['id']}/rating", json={"value": -1})
    r = c.get(f"/api/conversations/{cid}/export")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    trees = parse_trees(r.text.splitlines())
    assert len(trees) == 1
    original = [json.loads(x) for x in r.text.splitlines()]
    n_before = len(c.get("/api/conversations").json()["conversations"])
    imp = c.post("/api/import", content=r.content, headers={"X-Filename": "one.jsonl"})
    assert imp.status_code == 201 and imp.json()["imported"] == 1
    new = imp.json()["conversations"][0]
    assert new["id"] != cid and new["title"] == "Round trip" and new["system_prompt"] == "Be kind."
    again = c.get(f"/api/conversations/{new['id']}/export").text
    assert [_shape(json.loads(x)) for x in again.splitlines()] == [_shape(d) for d in original]
    assert _shape(original[0])[1][3] == {"+1": 1}
    # export all holds both
    every = c.get("/api/export").text
    titles = {t.homellm.get("title") for t in parse_trees(every.splitlines())}
    assert {"Round trip"} <= titles
    assert len(c.get("/api/conversations").json()["conversations"]) == n_before + 1
    # bad files: 400 naming the line, nothing imported
    for content, words in ((b'{"message_tree_id": "t"}\n', "one.jsonl:1"),
                           (b"\n\nnot json\n", "one.jsonl:3"),
                           (b"", "no conversation trees"),
                           (b"\xff\xfe\x00bad", "UTF-8")):
        e = c.post("/api/import", content=content, headers={"X-Filename": "one.jsonl"})
        assert e.status_code == 400 and words in e.json()["error"]["message"], e.text
    assert len(c.get("/api/conversations").json()["conversations"]) == n_before + 1
    assert c.get("/api/conversations/nope/export").status_code == 404
    # shared feedback: only for admins (the local user is one)
    assert c.get("/api/export", params={"shared": "true"}).status_code == 200


# ------------------------------------------------------------------ --auth
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, default_gguf):
    from homellm.store import AuthConfig
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1,
                        max_failures=3)
    s = LiveServer(tmp_path_factory.mktemp("auth") / "auth.db", default_gguf, auth=True,
                   auth_config=config)
    yield s
    s.close()


def test_auth_setup_login_isolation_and_shared_feedback(auth_server):
    auth_flow(auth_server)


@pytest.mark.slow
def test_auth_on_postgresql(pg_url, default_gguf):
    """The same people, sessions and isolation with the store on a real PostgreSQL server."""
    from homellm.store import AuthConfig
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
    s = LiveServer(pg_url, default_gguf, auth=True, auth_config=config)
    try:
        auth_flow(s)
    finally:
        s.close()


def auth_flow(auth_server):
    alice, bob, anon = (auth_server.client() for _ in range(3))
    me = anon.refresh()
    assert me["auth"] and me["user"] is None and me["needs_setup"]
    assert anon.get("/api/conversations").status_code == 401
    assert anon.post("/api/conversations", json={}).status_code == 401
    # the first account, from the setup page: an admin, with an HttpOnly SameSite cookie
    e = alice.post("/api/setup", json={"username": "alice", "password": "short"})
    assert e.status_code == 400 and e.json()["error"]["param"] == "password"
    r = alice.post("/api/setup", json={"username": "alice", "password": "alice-pass-1"})
    assert r.status_code == 200 and r.json()["user"]["is_admin"]
    cookie = r.headers["set-cookie"].lower()
    assert "homellm_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert alice.refresh()["user"]["username"] == "alice"
    assert anon.post("/api/setup", json={"username": "eve", "password": "eve-pass-12"}
                     ).status_code == 409
    assert anon.refresh()["needs_setup"] is False
    # accounts come from the admin
    assert alice.post("/api/users", json={"username": "bob", "password": "bob-pass-12"}
                      ).status_code == 201
    e = alice.post("/api/users", json={"username": "bob", "password": "bob-pass-12"})
    assert e.status_code == 409
    assert [u["username"] for u in alice.get("/api/users").json()["users"]] == ["alice", "bob"]
    # login: wrong password 401, right one a session
    assert bob.post("/api/login", json={"username": "bob", "password": "nope-nope"}
                    ).status_code == 401
    r = bob.post("/api/login", json={"username": "bob", "password": "bob-pass-12"})
    assert r.status_code == 200 and not r.json()["user"]["is_admin"]
    bob.refresh()
    assert bob.post("/api/users", json={"username": "x", "password": "x-pass-123"}
                    ).status_code == 403
    assert bob.get("/api/export", params={"shared": "true"}).status_code == 403
    # alice's conversation: bob cannot read or change it (404, like a missing one)
    cid = new_conversation(alice, title="Alice's secret")
    q = say(alice, cid, "my secret plan")
    _, a = reply(alice, cid, q)
    for method, path, body in (
            ("GET", f"/api/conversations/{cid}", None),
            ("PATCH", f"/api/conversations/{cid}", {"title": "mine now"}),
            ("DELETE", f"/api/conversations/{cid}", None),
            ("POST", f"/api/conversations/{cid}/messages", {"content": "hi", "parent_id": a["id"]}),
            ("POST", f"/api/conversations/{cid}/generate", {"parent_id": q}),
            ("POST", f"/api/messages/{q}/edit", {"content": "changed"}),
            ("POST", f"/api/messages/{a['id']}/select", None),
            ("PUT", f"/api/messages/{a['id']}/rating", {"value": -1}),
            ("POST", f"/api/replies/{a['id']}/stop", None),
            ("GET", f"/api/conversations/{cid}/export", None)):
        e = bob.request(method, path, json=body)
        assert e.status_code == 404, (method, path, e.text)
    assert bob.get("/api/conversations").json()["conversations"] == []
    assert bob.get("/api/search", params={"q": "secret"}).json()["hits"] == []
    assert bob.get("/api/export").text == ""
    d = alice.get(f"/api/conversations/{cid}").json()
    assert d["conversation"]["title"] == "Alice's secret" and len(d["turns"]) == 2
    assert d["turns"][1]["rating"] is None
    # CSRF: bob's cookie with alice's token is refused
    e = bob.post("/api/conversations", json={}, headers={"X-CSRF-Token": alice.csrf})
    assert e.status_code == 403
    # the admin's export: only the rated conversations of those who opted in
    bcid = new_conversation(bob, title="Bob shares")
    bq = say(bob, bcid, "hello")
    _, ba = reply(bob, bcid, bq)
    bob.put(f"/api/messages/{ba['id']}/rating", json={"value": 1})
    alice.put(f"/api/messages/{a['id']}/rating", json={"value": 1})
    assert alice.get("/api/export", params={"shared": "true"}).text == ""
    assert bob.patch("/api/me", json={"share_feedback": True}).json()["user"]["share_feedback"]
    shared = alice.get("/api/export", params={"shared": "true"}).text.splitlines()
    assert [json.loads(x)["homellm"]["title"] for x in shared] == ["Bob shares"]
    # logout ends the session
    assert bob.post("/api/logout").status_code == 200
    assert bob.get("/api/conversations").status_code == 401
    assert bob.refresh()["user"] is None


def test_login_rate_limit(auth_server):
    admin = auth_server.store.user_by_name("carol") or auth_server.store.create_user(
        "carol", "carol-pass-1")
    assert admin is not None
    c = auth_server.client()
    for _ in range(3):   # max_failures
        assert c.post("/api/login", json={"username": "carol", "password": "wrong-pass"}
                      ).status_code == 401
    e = c.post("/api/login", json={"username": "carol", "password": "carol-pass-1"})
    assert e.status_code == 429 and int(e.headers["retry-after"]) > 0
    assert e.json()["error"]["code"] == "login_locked"
    assert c.get("/api/conversations").status_code == 401
    # login needs the page's CSRF token too
    e = c.post("/api/login", json={"username": "carol", "password": "x"},
               headers={"X-CSRF-Token": "nope"})
    assert e.status_code == 403


# ------------------------------------------------------------------ the command
@pytest.mark.slow
def test_homellm_serve_db_auth(tmp_path, default_gguf):
    db = tmp_path / "served.db"
    port = free_port()
    env = {**os.environ, "HOMELLM_HOME": str(tmp_path / "home")}
    p = subprocess.Popen([sys.executable, "-m", "homellm", "serve", "-m", str(default_gguf),
                          "--port", str(port), "--db", str(db), "--auth"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline, me = time.monotonic() + 60, None
        while time.monotonic() < deadline and p.poll() is None:
            try:
                me = httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert me is not None, p.stdout.read() if p.poll() is not None else "no answer"
        assert me["auth"] is True and me["needs_setup"] is True
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "app.js" in page.text
        assert db.exists()
    finally:
        p.terminate()
        p.wait(timeout=30)
