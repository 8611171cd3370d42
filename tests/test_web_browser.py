"""The web app in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's
sync API) against a live server with the default model: chat, stop, regenerate, edit and
walk branches, rate, reload and find it all; XSS shows as text and runs nothing; phone
width and dark mode; with --auth a second user cannot reach the first one's conversation;
the /evals view and the arena's notice on a one-model server (the arena itself, with two
models and two accounts: test_arena.py)."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from test_web_api import LiveServer

CHROMIUM = os.environ.get("HOMELLM_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)),
    reason=f"no Chromium at {CHROMIUM} (make sysdeps installs Debian's chromium)")

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("webb") / "web.db", default_gguf)
    yield s
    s.close()


class Watch:
    """What a page did that it must not: dialogs, page errors, CSP-blocked or console errors."""

    def __init__(self, page):
        self.dialogs, self.errors = [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)


def open_page(browser, url, **context_args):
    ctx = browser.new_context(**context_args)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    watch = Watch(page)
    page.goto(url)
    page.wait_for_selector("#app:not([hidden]), #gate:not([hidden])")
    return ctx, page, watch


def settings(page, **values):
    """Fill settings fields: they apply on change (a new chat's draft, or saved at once)."""
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.evaluate("document.getElementById('settings-status').textContent = ''")
    for k, v in values.items():
        page.fill(f"#set-{k}", str(v))
    page.locator(f"#set-{k}").press("Tab")                # change: applied
    page.wait_for_function("() => document.getElementById('settings-status').textContent !== ''")


def send(page, text):
    n = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    return n


def wait_reply_done(page):
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector(".msg.assistant .regenerate")


def assistant(page, i=-1):
    loc = page.locator(".msg.assistant")
    return loc.nth(loc.count() - 1 if i == -1 else i)


def test_chat_stop_regenerate_edit_branches_rate_and_reload(browser, server):
    ctx, page, watch = open_page(browser, server.url)
    settings(page, max_tokens=6, temperature=0)
    send(page, "Name three colors.")
    wait_reply_done(page)
    first = assistant(page).locator(".body").inner_text()
    assert first.strip()
    assert page.locator("#context-use").inner_text().endswith("/ 512 tokens")
    cid = page.evaluate("location.hash").lstrip("#")
    assert page.locator("#conversations li.active .open").inner_text().startswith("Name three")
    # the store has what the page shows (markdown rendered: list numbers are not text)
    user = server.store.local_user()
    saved = [m for m in server.store.messages(user, cid) if m.role == "assistant"]
    assert len(saved) == 1
    assert [w for w in saved[0].content.split() if not re.fullmatch(r"\d+[.)]", w)] == \
        [w for w in first.split() if not re.fullmatch(r"\d+[.)]", w)]

    # regenerate: a sibling, with the arrows at 2/2
    assistant(page).locator(".regenerate").click()
    page.wait_for_selector(".msg.assistant .pos >> text=2/2")
    wait_reply_done(page)

    # edit the question: a new branch 2/2 on the user message
    page.locator(".msg.user .edit").click()
    page.fill(".msg.user .edit-text", "Name two animals.")
    page.click(".msg.user .save-edit")
    page.wait_for_selector(".msg.user .pos >> text=2/2")
    wait_reply_done(page)
    assert page.locator(".msg.user .body").inner_text() == "Name two animals."

    # walk back to the first question: its newest reply shows, at 2/2
    page.locator(".msg.user .prev").click()
    page.wait_for_selector(".msg.user .pos >> text=1/2")
    assert page.locator(".msg.user .body").inner_text() == "Name three colors."
    assert assistant(page).locator(".pos").inner_text() == "2/2"
    assistant(page).locator(".prev").click()
    page.wait_for_selector(".msg.assistant .pos >> text=1/2")
    assert assistant(page).locator(".body").inner_text() == first

    # rate it, with a comment
    assistant(page).locator(".thumb.up").click()
    page.wait_for_selector(".msg.assistant .thumb.up.on")
    page.fill(".msg.assistant .comment", "short and right")
    page.click(".msg.assistant .save-comment")
    rid = assistant(page).get_attribute("data-id")
    for _ in range(50):
        r = server.store.ratings(user, cid).get(rid)
        if r is not None and r.comment:
            break
        page.wait_for_timeout(100)
    assert r.value == 1 and r.comment == "short and right"

    # stop a long reply: it keeps what was streamed, marked stopped
    settings(page, max_tokens=400, temperature=1)
    send(page, "Write a long story about a dragon.")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_function("() => (document.querySelector('.msg.assistant:last-child .body')"
                           " || {textContent: ''}).textContent.length > 10")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:last-child .badge.stopped")
    stopped_text = assistant(page).locator(".body").inner_text()
    assert stopped_text

    # reload: the same branch, arrows, rating, comment and stopped reply
    page.reload()
    page.wait_for_selector(".msg.assistant .badge.stopped")
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.user").first.locator(".pos").inner_text() == "1/2"
    a0 = page.locator(".msg.assistant").first
    assert a0.locator(".pos").inner_text() == "1/2" and a0.locator(".body").inner_text() == first
    assert a0.locator(".thumb.up").get_attribute("aria-pressed") == "true"
    assert a0.locator(".comment").input_value() == "short and right"
    assert assistant(page).locator(".body").inner_text() == stopped_text
    saved = server.store.get_message(user, assistant(page).get_attribute("data-id"))
    assert saved.finish_reason == "stopped" and saved.incomplete
    assert (saved.completion_tokens or 0) < 400
    assert watch.dialogs == [] and watch.errors == []
    ctx.close()


XSS_REPLY = ('Here: <script>window.__pwned = 1; alert("script")</script>\n\n'
             '<img src=x onerror="window.__pwned = 2; alert(2)">\n\n'
             '[click me](javascript:alert(3)) and [docs](https://example.org/a)\n\n'
             '**bold** `<b>code</b>`\n\n'
             '| name | markup |\n|---|:-:|\n| x | <b>y</b> |\n\n'
             '```python\ndef f(x):  # "<svg onload=alert(4)>"\n    return "<i>" + 42\n```')


def test_xss_shows_as_text_and_runs_nothing(browser, server):
    ctx, page, watch = open_page(browser, server.url)
    settings(page, max_tokens=2, temperature=0)
    payload = '<img src=x onerror="window.__pwned = 5; alert(5)"> <script>alert(6)</script>'
    send(page, payload)
    wait_reply_done(page)
    assert page.locator(".msg.user .body").inner_text() == payload
    # a model reply with markup (written into the store as the engine would)
    cid = page.evaluate("location.hash").lstrip("#")
    user = server.store.local_user()
    q = [m for m in server.store.messages(user, cid) if m.role == "user"][0]
    server.store.add_message(user, cid, "assistant", XSS_REPLY, parent_id=q.id)
    page.reload()
    page.wait_for_selector(".msg.assistant .codeblock")
    body = assistant(page).locator(".body")
    text = body.inner_text()
    assert '<script>window.__pwned = 1; alert("script")</script>' in text
    assert '<img src=x onerror="window.__pwned = 2; alert(2)">' in text
    assert "[click me](javascript:alert(3))" in text and "<b>code</b>" in text
    msgs = page.locator("#messages")
    assert msgs.locator("script, img, svg, iframe, b, i").count() == 0
    # the title (made from the message) in the list and the header: text too
    assert page.locator("img, svg, iframe").count() == 0
    scripts = page.evaluate("[...document.scripts].map((s) => new URL(s.src).pathname)")
    assert scripts[:2] == ["/static/markdown-it.min.js", "/static/app.js"]  # nothing inline:
    assert set(scripts[2:]) <= {"/static/more.js", "/static/math.js"}    # only the page's own
    assert page.locator("#conversations li.active .open").inner_text().startswith("<img src=x")
    assert page.locator("#conv-title").inner_text().startswith("<img src=x")
    assert msgs.locator("a[href^='javascript']").count() == 0
    assert msgs.locator("a[href='https://example.org/a']").get_attribute("rel") == \
        "noopener noreferrer nofollow"
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("table th").all_inner_texts() == ["name", "markup"]
    assert body.locator("table td").all_inner_texts() == ["x", "<b>y</b>"]
    # the code block: highlighted spans and a copy button
    code = body.locator(".codeblock code")
    assert code.inner_text() == 'def f(x):  # "<svg onload=alert(4)>"\n    return "<i>" + 42'
    assert code.locator(".tok-kw").first.inner_text() == "def"
    assert code.locator(".tok-com").inner_text() == '# "<svg onload=alert(4)>"'
    assert code.locator(".tok-str").inner_text() == '"<i>"'
    assert code.locator(".tok-num").inner_text() == "42"
    body.locator(".codeblock .copy").click()
    page.wait_for_selector(".codeblock .copy >> text=Copied")
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    assert watch.dialogs == []
    ctx.close()


def test_phone_width_and_dark_mode(browser, server):
    ctx, page, watch = open_page(browser, server.url, viewport={"width": 390, "height": 844},
                                 color_scheme="dark", is_mobile=True, has_touch=True)
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(24, 24, 27)"                      # dark from prefers-color-scheme
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.is_visible("#menu") and page.is_visible("#prompt") and page.is_visible("#send")
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 1                  # the list is off-screen ...
    page.click("#menu")
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] >= 0   # ... until ☰ opens it
    page.click("#theme-toggle")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    page.reload()
    page.wait_for_selector("#app:not([hidden])")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    assert watch.errors == []
    ctx.close()


def test_search_rename_delete_in_the_list(browser, server):
    user = server.store.local_user()
    conv = server.store.create_conversation(user, title="Okapi facts",
                                            first_message="Where do okapis live?")
    ctx, page, watch = open_page(browser, server.url)
    page.fill("#search", "okapis")
    page.wait_for_selector("#conversations[data-mode='search'] .snippet >> text=Where do okapis live?")
    assert page.locator("#conversations li").count() == 1
    page.locator("#conversations li .open").click()
    page.wait_for_selector(".msg.user >> text=Where do okapis live?")
    # export it, then import the file back: a second conversation with the same messages
    with page.expect_download() as info:
        page.click("#export-one")
    exported = info.value.path().read_text()
    assert json.loads(exported)["prompt"]["text"] == "Where do okapis live?"
    page.set_input_files("#import-file", files=[{"name": "okapi.trees.jsonl",
                                                 "mimeType": "application/x-ndjson",
                                                 "buffer": exported.encode()}])
    page.wait_for_selector("#import-status >> text=Imported 1 conversation")
    page.wait_for_selector("#conversations li >> nth=1")
    assert page.locator("#conversations li").count() == 2
    page.set_input_files("#import-file", files=[{"name": "bad.jsonl", "mimeType": "text/plain",
                                                 "buffer": b"not json\n"}])
    page.wait_for_selector("#error >> text=bad.jsonl:1")
    page.fill("#search", "")
    page.wait_for_selector(f"#conversations[data-mode='all'] li[data-id='{conv.id}']")
    item = page.locator(f"#conversations li[data-id='{conv.id}']")
    item.locator(".rename").click()
    page.fill(".rename-input", "Okapis")
    page.press(".rename-input", "Enter")
    page.wait_for_selector(f"#conversations li[data-id='{conv.id}'] .open >> text=Okapis")
    assert server.store.get_conversation(user, conv.id).title == "Okapis"
    item.locator(".delete").click()
    item.locator(".delete").click()          # the second click confirms
    page.wait_for_selector(f"#conversations li[data-id='{conv.id}']", state="detached")
    assert server.store.get_conversation(user, conv.id) is None
    assert watch.dialogs == []
    assert all("400" in e for e in watch.errors), watch.errors   # the refused bad file
    ctx.close()


# Payloads that made the old markdown renderer backtrack (issue 14: 10,000 backticks took
# 244 s), and others of the same kind for each pattern the renderer uses.
HOSTILE = {
    "10,000 backticks": "see " + "`" * 10_000 + "a",
    "a line of backticks": "`" * 10_000,
    "runs of every length": " ".join("`" * (1 + i % 7) + "x" for i in range(5000)),
    "open brackets": "[" * 50_000,
    "unclosed bold": "**a" * 20_000,
    "unclosed emphasis": "*a " * 30_000,
    "nested quotes": ">" * 20_000,
    "unterminated comment": "```c\n" + "/*" * 50_000 + "\n```",
    "hashes in js": "```js\n" + "#" * 50_000 + "\n```",
    "dashes in python": "```python\n" + "-" * 50_000 + "\n```",
    "table rule": "| a |\n|" + "-|" * 20_000 + "x",
}


def test_markdown_renders_hostile_text_in_linear_time(browser, server):
    ctx, page, watch = open_page(browser, server.url)
    for name, text in HOSTILE.items():
        ms = page.evaluate("""(t) => { const box = document.createElement('div');
            const t0 = performance.now(); box.appendChild(markdown(t));
            return performance.now() - t0; }""", text)
        assert ms < 1000, (name, ms)
    # what the code-span scanner makes (CommonMark): same-length runs pair, a lone run is text
    cases = {
        "``a`b``": "<p><code>a`b</code></p>",
        "`a` and `b`": "<p><code>a</code> and <code>b</code></p>",
        "a ``b": "<p>a ``b</p>",
        "`` ` ``": "<p><code>`</code></p>",
        "**bold `co*de` bold**": "<p><strong>bold <code>co*de</code> bold</strong></p>",
        "*a `*` b*": "<p><em>a <code>*</code> b</em></p>",
        "[`x`](https://e.org)": '<p><a href="https://e.org" target="_blank" '
                                'rel="noopener noreferrer nofollow"><code>x</code></a></p>',
        "x \ue0000\ue001 y": "<p>x \ue0000\ue001 y</p>",   # private-use marks are text
    }
    for text, html in cases.items():
        got = page.evaluate("""(t) => { const d = document.createElement('div');
            d.appendChild(markdown(t)); return d.innerHTML; }""", text)
        assert got == html, (text, got)
    ctx.close()
    # the whole page with such a reply in a conversation (the old page froze for minutes)
    user = server.store.local_user()
    conv = server.store.create_conversation(user, title="backticks", first_message="print them")
    q = server.store.get_conversation(user, conv.id).current_leaf_id
    server.store.add_message(user, conv.id, "assistant", HOSTILE["10,000 backticks"], parent_id=q)
    ctx, page, watch = open_page(browser, f"{server.url}/#{conv.id}")
    page.wait_for_selector(".msg.assistant .body", timeout=10_000)
    assert page.locator(".msg.assistant .body").inner_text().count("`") == 10_000
    assert watch.errors == []
    ctx.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("webkey") / "key.db", default_gguf, api_key="page-key-1")
    yield s
    s.close()


def test_the_page_asks_for_the_api_key(browser, keyed_server):
    ctx, page, watch = open_page(browser, keyed_server.url)
    assert page.locator("#gate-title").inner_text() == "API key"
    assert page.is_hidden("#gate-user-row") and page.is_hidden("#gate-token-row")
    page.fill("#gate-pass", "wrong-key")
    page.click("#gate-submit")
    page.wait_for_selector("#gate-error >> text=wrong API key")
    page.fill("#gate-pass", "page-key-1")
    page.click("#gate-submit")
    page.wait_for_selector("#app:not([hidden])")
    assert page.evaluate("document.cookie") == ""        # HttpOnly: not readable by script
    settings(page, max_tokens=2, temperature=0)
    send(page, "Hello behind a key")
    wait_reply_done(page)
    page.reload()                                        # the cookie keeps the page open
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_selector("#conversations li >> text=Hello behind a key")
    page.click("#logout")
    page.wait_for_selector("#gate:not([hidden])")
    assert page.locator("#gate-title").inner_text() == "API key"
    assert watch.dialogs == []
    ctx.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, default_gguf):
    from homellm.store import AuthConfig
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
    s = LiveServer(tmp_path_factory.mktemp("webauth") / "auth.db", default_gguf, auth=True,
                   auth_config=config)
    yield s
    s.close()


def test_auth_second_user_cannot_reach_the_first(browser, auth_server):
    ctx, page, watch = open_page(browser, auth_server.url)
    assert page.locator("#gate-title").inner_text() == "Set up homellm"
    page.fill("#gate-user", "alice")
    page.fill("#gate-pass", "alice-pass-1")
    page.click("#gate-submit")
    page.wait_for_selector("#app:not([hidden])")
    assert "alice (admin)" in page.locator("#whoami").inner_text()
    cookies = {c["name"]: c for c in ctx.cookies()}
    assert cookies["homellm_session"]["httpOnly"] and cookies["homellm_session"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""        # HttpOnly: not readable by script
    settings(page, max_tokens=3, temperature=0)
    send(page, "Alice's private question")
    wait_reply_done(page)
    cid = page.evaluate("location.hash").lstrip("#")
    page.click("#users-box summary")                     # the admin's Users (collapsed)
    page.fill("#new-username", "bob")
    page.fill("#new-password", "bob-pass-12")
    page.click("#add-user button")
    page.wait_for_selector("#add-user-status >> text=Added bob")
    ctx.close()

    ctx, page, watch = open_page(browser, auth_server.url)
    assert page.locator("#gate-title").inner_text() == "Log in"
    page.fill("#gate-user", "bob")
    page.fill("#gate-pass", "wrong-password")
    page.click("#gate-submit")
    page.wait_for_selector("#gate-error >> text=wrong username or password")
    page.fill("#gate-pass", "bob-pass-12")
    page.click("#gate-submit")
    page.wait_for_selector("#app:not([hidden])")
    assert page.locator("#conversations li").count() == 0
    page.goto(f"{auth_server.url}/#{cid}")
    page.wait_for_selector("#error >> text=not found")
    assert "Alice" not in page.locator("#messages").inner_text()
    # the same through the HTTP API with bob's session (page's fetch: cookie + CSRF token)
    status = page.evaluate("""async (cid) => {
        const me = await (await fetch('/api/me')).json();
        const h = {'X-CSRF-Token': me.csrf_token, 'Content-Type': 'application/json'};
        const out = [];
        out.push((await fetch('/api/conversations/' + cid)).status);
        out.push((await fetch('/api/conversations/' + cid, {method: 'PATCH', headers: h,
                  body: JSON.stringify({title: 'bob was here'})})).status);
        out.push((await fetch('/api/conversations/' + cid, {method: 'DELETE', headers: h})).status);
        out.push((await fetch('/api/conversations/' + cid + '/export')).status);
        return out; }""", cid)
    assert status == [404, 404, 404, 404]
    alice = auth_server.store.user_by_name("alice")
    assert auth_server.store.get_conversation(alice, cid).title == "Alice's private question"
    page.click("#logout")
    page.wait_for_selector("#gate:not([hidden])")
    assert watch.dialogs == []
    ctx.close()


def test_setup_token_and_the_admins_unlock(browser, tmp_path, default_gguf):
    from homellm.store import AuthConfig, LoginLocked
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1,
                        max_failures=2)
    s = LiveServer(tmp_path / "tok.db", default_gguf, auth=True, auth_config=config,
                   setup_token="from-the-console")
    try:
        ctx, page, watch = open_page(browser, s.url)
        assert page.locator("#gate-title").inner_text() == "Set up homellm"
        assert page.is_visible("#gate-token-row")
        page.fill("#gate-user", "root")
        page.fill("#gate-pass", "root-pass-1")
        page.fill("#gate-token", "a guess")
        page.click("#gate-submit")
        page.wait_for_selector("#gate-error >> text=setup token")
        page.fill("#gate-token", "from-the-console")
        page.fill("#gate-pass", "root-pass-1")
        page.click("#gate-submit")
        page.wait_for_selector("#app:not([hidden])")
        s.store.create_user("dora", "dora-pass-1")
        for _ in range(2):  # max_failures wrong passwords from one address ...
            assert s.store.login("dora", "wrong", client="10.9.9.9") is None
        page.reload()
        page.click("#users-box summary")
        page.wait_for_selector("#users li[data-username='dora']")
        assert page.locator("#users li[data-username='dora'] .unlock").count() == 0
        with pytest.raises(LoginLocked):  # ... and the next attempt there is refused
            s.store.login("dora", "dora-pass-1", client="10.9.9.9")
        page.reload()
        page.click("#users-box summary")
        page.wait_for_selector("#users li[data-username='dora'] .unlock")
        page.click("#users li[data-username='dora'] .unlock")
        page.wait_for_selector("#users li[data-username='dora'] .unlock", state="detached")
        assert s.store.login_locks() == {}
        assert s.store.login("dora", "dora-pass-1", client="10.9.9.9") is not None
        assert watch.dialogs == []
        ctx.close()
    finally:
        s.close()


def test_evals_page_shows_the_kept_runs(browser, server, tmp_path, monkeypatch):
    from homellm.eval.report import format_table, metric_text, report_rows
    from homellm.eval.results import load_runs, record
    monkeypatch.setenv("HOMELLM_HOME", str(tmp_path))     # the server reads it per request
    ctx, page, watch = open_page(browser, f"{server.url}/evals")
    page.wait_for_selector("#evals-summary >> text=No kept eval runs yet")
    assert page.title() == "homellm · Evals" and page.is_hidden("#chat-view")
    run = record("ppl", model="smollm2:135m", model_hash="0123456789abcdef", task="wiki.txt",
                 settings={"ctx": 512}, metrics={"ppl": 18.25, "ppl_err": 0.375, "bpb": 0.93})
    record("judge", model="smollm2:135m", model_hash="0123456789abcdef", task="mt.jsonl",
           settings={"opponent": "mine:sft"},
           metrics={"win_rate": 0.625, "win_rate_ci": [0.5, float("nan")], "wins": 5})
    page.click("#evals-refresh")
    page.wait_for_selector("#evals-table tbody tr >> nth=1")
    rows = report_rows(load_runs())                         # what `homellm eval report` prints
    table = format_table(rows)
    cells = page.locator(f"#evals-table tbody tr[data-id='{run.id}'] td").all_inner_texts()
    assert cells[:6] == [rows[0]["date"], "ppl", "smollm2:135m", "0123456789ab", "wiki.txt",
                         metric_text(rows[0])]
    assert cells[5] == "ppl 18.25 ± 0.375" and cells[5] in table and cells[6] == "bpb 0.93, ctx 512"
    judge = page.locator("#evals-table tbody tr").nth(1).locator("td").all_inner_texts()
    assert judge[1] == "judge" and judge[5].startswith("win_rate 0.625")   # NaN: no 500
    assert page.locator("#evals-summary").inner_text().startswith("2 kept runs")
    # the views are one page: the nav goes back to the chat, whose parts come back
    page.click("#views a[data-view='chat']")
    page.wait_for_selector("#chat-view:not([hidden])")
    assert page.evaluate("location.pathname") == "/" and page.locator("#set-model option").count() == 1
    assert watch.errors == [] and watch.dialogs == []
    ctx.close()


def test_arena_says_it_needs_two_models(browser, server):
    ctx, page, watch = open_page(browser, f"{server.url}/arena")
    page.wait_for_selector("#arena-unavailable:not([hidden])")
    assert "at least two served models; this server has 1" in \
        page.locator("#arena-unavailable").inner_text()
    assert page.is_disabled("#arena-send") and page.is_disabled("#arena-prompt")
    status = page.evaluate("""async () => { const me = await (await fetch('/api/me')).json();
        const r = await fetch('/api/arena/battles', {method: 'POST', body: '{"prompt": "hi"}',
            headers: {'X-CSRF-Token': me.csrf_token, 'Content-Type': 'application/json'}});
        return [r.status, (await r.json()).error.code]; }""")
    assert status == [409, "arena_needs_two_models"]
    page.click("#views a[data-view='leaderboard']")
    page.wait_for_selector("#leaderboard-summary >> text=No votes yet")
    assert page.evaluate("location.pathname") == "/leaderboard"
    page.click("#new-chat")                       # from any view: a new chat, on /
    page.wait_for_selector("#chat-view:not([hidden])")
    assert page.is_hidden("#leaderboard-view") and page.evaluate("location.pathname") == "/"
    page.wait_for_selector("#set-model option", state="attached")
    page.go_back()                                # history: the leaderboard again
    page.wait_for_selector("#leaderboard-view:not([hidden])")
    assert all("409" in e for e in watch.errors), watch.errors
    ctx.close()
