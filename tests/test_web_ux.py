"""The web app tried as a new user would (issue 18), in real headless Chromium against a live
server with the default model: a cold model says it is loading; a conversation longer than
the context goes on (its oldest turns left out, marked) and a reply that failed never blocks
the next message; streaming follows the reader and the reply keeps going when they leave;
search lands on the hit's branch; settings stick; markdown as models write it (with KaTeX
math, loaded only when needed); message actions; the phone's list; a household with --auth.
The kill -9 and Ctrl+C cases (a real `homellm serve`) are in test_web_crash.py, axe-core in
test_web_a11y.py."""
from __future__ import annotations

import json
import time

import pytest

from test_web_api import LiveServer
from test_web_browser import (CHROMIUM, TIMEOUT_MS, assistant, browser, open_page,  # noqa: F401
                              send, settings, wait_reply_done)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not __import__("os").path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("webux") / "ux.db", default_gguf)
    yield s
    s.close()


def stored_replies(server, cid):
    return [m for m in server.store.messages(server.store.local_user(), cid) if m.role == "assistant"]


def finished(server, cid, n):
    """Wait until the conversation has `n` finished replies, and the page has settled."""
    return wait_for(lambda: len([m for m in stored_replies(server, cid) if m.finish_reason]) >= n, 120)


def settle(page):
    page.wait_for_function("() => !S.streaming && !document.querySelector('.cursor, .pending')")


def wait_replies(page, n):
    """Until the page shows `n` replies and none is growing."""
    page.wait_for_function(f"""() => !S.streaming && !document.querySelector('.cursor, .pending')
        && document.querySelectorAll('.msg.assistant').length >= {n}""")


def wait_for(fn, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def conversation(server, turns, title="Long one"):
    """A conversation made in the store (as an import makes it): [(user, reply), ...]."""
    store, user = server.store, server.store.local_user()
    conv = store.create_conversation(user, title=title, model="smollm2:135m")
    parent = None
    for q, a in turns:
        parent = store.add_message(user, conv.id, "user", q, parent_id=parent).id
        if a is not None:
            parent = store.add_message(user, conv.id, "assistant", a, parent_id=parent).id
    return conv.id


# ------------------------------------------------------------------ 1. cold and busy
def test_a_cold_model_says_it_is_loading_with_progress(browser, tmp_path, default_gguf):
    s = LiveServer(tmp_path / "cold.db", default_gguf)
    registry = s.app.state.registry
    load = registry._load

    def slow_load(mid):  # a slow disk: the load takes two seconds more
        time.sleep(2)
        return load(mid)
    registry._load = slow_load
    try:
        ctx, page, watch = open_page(browser, s.url)
        settings(page, max_tokens=3, temperature=0)
        send(page, "Hello there")
        slot = page.wait_for_selector(".msg.pending .loading >> text=Loading model smollm2:135m")
        assert "s" in slot.inner_text()
        wait_reply_done(page)
        assert page.locator(".msg.pending").count() == 0
        # the next cold load knows how long the last one took: a progress bar with its max
        registry.unload("smollm2:135m")
        page.locator(".msg.assistant .regenerate").click()
        bar = page.wait_for_selector(".msg.pending .loading progress[max]")
        assert float(bar.get_attribute("max")) > 0
        wait_reply_done(page)
        assert watch.errors == [] and watch.dialogs == []
        ctx.close()
    finally:
        s.close()


# ------------------------------------------------------------------ 3. context overflow
def test_a_long_conversation_goes_on_and_a_failed_reply_never_blocks(browser, server):
    import httpx
    # near the context (80% or more): a warning before the limit, from the start
    httpx.get(f"{server.url}/api/models")              # as the page does first: the contexts
    for k in range(80, 130, 3):
        near = conversation(server, [("Write about bread.", " ".join(["Yeast makes gas."] * k))],
                            title="Near")
        ctx_use = httpx.get(f"{server.url}/api/conversations/{near}").json()["context"]
        if 0.82 * ctx_use["ctx"] <= ctx_use["used"] < 0.98 * ctx_use["ctx"]:
            break
    else:
        raise AssertionError(f"no conversation near the context: {ctx_use}")
    ctx, page, watch = open_page(browser, f"{server.url}/#{near}")
    page.wait_for_selector("#context-use.near")
    assert "near the model's context" in page.locator("#context-warning").inner_text()
    ctx.close()
    long = " ".join(["The bread rises because yeast makes gas in the dough."] * 25)
    cid = conversation(server, [("Write something very long.", long),
                                ("And again, longer.", long),
                                ("One more time.", long)])
    ctx, page, watch = open_page(browser, f"{server.url}/#{cid}")
    page.wait_for_selector("#context-use.over")           # shown from the start, imported too
    assert page.locator("#context-use").inner_text().endswith("/ 512 tokens")
    assert "oldest messages" in page.locator("#context-warning").inner_text()
    settings(page, max_tokens=8, temperature=0)
    send(page, "Now write a short poem about it.")
    finished(server, cid, 1)            # the imported replies have no finish_reason
    settle(page)
    assert page.locator("#error").inner_text() == ""
    marker = page.locator(".left-out")
    assert "not sent to the model" in marker.inner_text()
    reply = stored_replies(server, cid)[-1]
    left = reply.meta["context"]
    assert reply.content and not reply.incomplete and left["left_out"] >= 2
    # the marker sits right above the first message the model saw
    assert page.evaluate("document.querySelector('.left-out').nextElementSibling.dataset.id") == \
        left["first_sent"]
    assert reply.prompt_tokens <= 512 - 8
    # a message whose reply failed (the server refused it, or was down) never blocks the next
    cid2 = conversation(server, [("Tell me about okapis.", None)], title="Unanswered")
    page.goto(f"{server.url}/#{cid2}")
    page.wait_for_selector(".msg.user .answer")
    send(page, "Short, please.")
    finished(server, cid2, 1)
    page.wait_for_selector(".msg.user .pos >> text=2/2")
    settle(page)
    assert page.locator("#error").inner_text() == ""
    user = page.locator(".msg.user")
    assert user.locator(".body").inner_text() == "Tell me about okapis.\n\nShort, please."
    assert user.locator(".pos").inner_text() == "2/2"           # the first is kept, as 1/2
    assert stored_replies(server, cid2)[0].content
    assert watch.errors == [] and watch.dialogs == []
    ctx.close()


# ------------------------------------------------------------------ 5. streaming and the reader
def test_streaming_follows_the_reader_and_the_reply_outlives_the_page(browser, server):
    long = "\n\n".join(f"Paragraph {i}: the dough rests, the yeast works." for i in range(40))
    cid = conversation(server, [("Write forty paragraphs.", long)], title="Tall")
    ctx, page, watch = open_page(browser, f"{server.url}/#{cid}")
    page.wait_for_selector(".msg.assistant")
    settings(page, max_tokens=120, temperature=1, seed=3)
    send(page, "Write a long story about a dragon.")
    page.wait_for_function("""() => { const a = document.querySelectorAll('.msg.assistant:not(.pending)');
        return a.length === 2 && a[1].querySelector('.body').textContent.length > 5; }""")
    page.evaluate("""() => { const b = document.getElementById('messages');
        b.scrollTop = 0; b.dispatchEvent(new Event('scroll')); }""")
    page.wait_for_timeout(1500)
    assert page.evaluate("document.getElementById('messages').scrollTop") < 50   # left alone
    page.wait_for_selector("#to-bottom:not([hidden])")
    page.click("#to-bottom")
    assert page.evaluate("""() => { const b = document.getElementById('messages');
        return b.scrollHeight - b.scrollTop - b.clientHeight; }""") < 60
    # another chat while it streams: allowed; the reply goes on on the server
    page.click("#new-chat")
    assert page.locator("#conv-title").inner_text() == "New chat"
    assert page.is_visible("#send")
    page.locator(f"#conversations li[data-id='{cid}'] .open").click()
    page.wait_for_selector(f".msg.assistant >> nth=1")
    done = wait_for(lambda: [m for m in stored_replies(server, cid) if m.finish_reason], 120)
    assert done[-1].finish_reason in ("length", "stop") and not done[-1].incomplete
    wait_reply_done(page)
    # a reload mid-reply: the page watches the same reply again, which ends on its own
    assistant(page).locator(".regenerate").click()
    page.wait_for_selector("#stop:not([hidden])")
    page.reload()
    page.wait_for_selector(".msg.assistant .body.cursor")
    wait_reply_done(page)
    last = stored_replies(server, cid)[-1]
    assert last.finish_reason in ("length", "stop") and not last.incomplete
    assert assistant(page).get_attribute("data-id") == last.id
    assert watch.errors == [] and watch.dialogs == []
    ctx.close()


# ------------------------------------------------------------------ 6. search
def test_search_opens_the_branch_of_the_hit_and_the_list_pages(browser, server):
    store, user = server.store, server.store.local_user()
    conv = store.create_conversation(user, title="Greens", first_message="Line one\nLine two: name a fruit.")
    q1 = store.get_conversation(user, conv.id).current_leaf_id
    store.add_message(user, conv.id, "assistant", "An apple.", parent_id=q1)
    q2 = store.edit_message(user, q1, "Name a vegetable instead.")
    store.add_message(user, conv.id, "assistant", "A leek.", parent_id=q2.id)
    store.select(user, q1)                                  # the hit's branch is hidden
    for i in range(205):
        store.create_conversation(user, title=f"Filler {i}")
    total = len(store.list_conversations(user, limit=10**6))
    ctx, page, watch = open_page(browser, server.url)
    page.fill("#search", "vegetable")
    page.wait_for_selector("#conversations[data-mode='search'] .snippet")
    page.locator(f"#conversations li[data-id='{conv.id}'] .open").click()
    hit = page.wait_for_selector(".msg.hit")
    assert hit.get_attribute("data-id") == q2.id
    assert "vegetable" in page.locator(".msg.hit .body").inner_text()
    assert page.locator(".msg.user .pos").inner_text() == "2/2"
    assert page.evaluate("CSS.highlights.has('search-hit') && CSS.highlights.get('search-hit').size") == 1
    page.fill("#search", "zzqxnothing")
    page.wait_for_selector("#conversations .no-results >> text=No results")
    page.fill("#search", "")
    page.wait_for_selector("#conversations[data-mode='all'] .group >> text=Today")
    while page.is_visible("#list-more"):
        n = page.locator("#conversations li[data-id]").count()
        page.click("#list-more")
        page.wait_for_function(f"() => document.querySelectorAll('#conversations li[data-id]').length > {n}")
    assert page.locator("#conversations li[data-id]").count() == total > 200
    assert watch.errors == []
    ctx.close()


# ------------------------------------------------------------------ 7. settings that stick
def test_settings_stick_as_defaults_and_apply_on_change(browser, tmp_path, default_gguf):
    s = LiveServer(tmp_path / "settings.db", default_gguf)
    try:
        ctx, page, watch = open_page(browser, s.url)
        page.click("#settings-toggle")
        assert page.get_attribute("#set-temperature", "placeholder") == "0.8"  # homellm chat's
        assert page.locator("#set-model").input_value() == "smollm2:135m"
        page.fill("#set-system", "You are a pirate.")
        page.fill("#set-temperature", "0.3")
        page.fill("#set-max_tokens", "5")
        page.click("#settings-save")                     # "Use for new chats"
        page.wait_for_selector("#settings-status >> text=defaults")
        assert s.store.user_settings(s.store.local_user()) == {
            "model": "smollm2:135m", "system_prompt": "You are a pirate.",
            "sampling": {"temperature": 0.3, "max_tokens": 5}}
        page.reload()                                    # a new chat starts from them
        page.wait_for_selector("#app:not([hidden])")
        page.click("#settings-toggle")
        assert page.locator("#set-system").input_value() == "You are a pirate."
        assert page.locator("#set-temperature").input_value() == "0.3"
        send(page, "Ahoy")
        wait_replies(page, 1)
        cid = page.evaluate("location.hash").lstrip("#")
        conv = s.store.get_conversation(s.store.local_user(), cid)
        assert conv.system_prompt == "You are a pirate." and conv.sampling["temperature"] == 0.3
        # an edit applies as it is made, even if Enter follows at once
        page.fill("#set-temperature", "1.5")
        page.fill("#prompt", "Again")
        page.press("#prompt", "Enter")
        wait_replies(page, 2)
        replies = stored_replies(s, cid)
        assert replies[-1].sampling["temperature"] == 1.5
        assert s.store.get_conversation(s.store.local_user(), cid).sampling["temperature"] == 1.5
        assert watch.errors == [] and watch.dialogs == []
        ctx.close()
    finally:
        s.close()


def test_the_default_model_is_the_catalogs_then_the_last_used(browser, tmp_path, default_gguf):
    """Not the alphabetically (or first) served one: the catalog's default, then the model of
    the user's last chat, on a new chat right away and after a reload."""
    s = LiveServer(tmp_path / "models.db", default_gguf,
                   models={"aaa-first": default_gguf, "smollm2:135m": default_gguf})
    try:
        ctx, page, watch = open_page(browser, s.url)
        page.click("#settings-toggle")
        assert page.locator("#set-model option").all_inner_texts() == ["aaa-first", "smollm2:135m"]
        assert page.locator("#set-model").input_value() == "smollm2:135m"
        page.select_option("#set-model", "aaa-first")
        settings(page, max_tokens=2, temperature=0)
        send(page, "Hi")
        wait_replies(page, 1)
        assert stored_replies(s, page.evaluate("S.conv.id"))[0].model == "aaa-first"
        page.click("#new-chat")
        assert page.locator("#set-model").input_value() == "aaa-first"     # the last used
        page.goto(s.url)
        page.wait_for_selector("#app:not([hidden])")
        page.click("#settings-toggle")
        assert page.locator("#set-model").input_value() == "aaa-first"
        assert watch.errors == [] and watch.dialogs == []
        ctx.close()
    finally:
        s.close()


# ------------------------------------------------------------------ 8. markdown
MARKDOWN = {
    "nested": ("1. a\n2. b\n   - nested\n3. c",
               "<ol><li>a</li><li>b<ul><li>nested</li></ul></li><li>c</li></ol>"),
    "continued": ("1. **Flour**: the base\n   of every bread.\n2. Water",
                  "<ol><li><strong>Flour</strong>: the base<br>of every bread.</li><li>Water</li></ol>"),
    "strike, rule": ("~~old~~ new\n\n---", "<p><s>old</s> new</p><hr>"),
    "escapes, entities": ("\\*not em\\* &amp; &copy;", "<p>*not em* &amp; ©</p>"),
    "autolink": ("see https://example.org/a.", '<p>see <a href="https://example.org/a" '
                 'target="_blank" rel="noopener noreferrer nofollow">https://example.org/a</a>.</p>'),
    "not a link": ("run main.py", "<p>run main.py</p>"),
    "setext": ("Title\n=====", "<h2>Title</h2>"),
    "raw html": ("<b>x</b>", "<p>&lt;b&gt;x&lt;/b&gt;</p>"),
}


def test_markdown_as_models_write_it(browser, server):
    ctx, page, watch = open_page(browser, server.url)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    for name, (text, html) in MARKDOWN.items():
        got = page.evaluate("""(t) => { const d = document.createElement('div');
            d.appendChild(markdown(t)); return d.innerHTML; }""", text)
        assert got == html, (name, got)
    # task lists, table alignment, images, a fence inside a list, math: in a conversation
    reply = ("- [ ] todo\n- [x] done\n\n| l | c | r |\n|:--|:-:|--:|\n| 1 | 2 | 3 |\n\n"
             "![dot](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
             "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==) ![far](https://example.org/x.png)\n\n"
             "1. Code:\n\n   ```python\n   x = 1\n   ```\n")
    cid = conversation(server, [("Show me things.", reply)], title="Markdown")
    page.goto(f"{server.url}/#{cid}")
    page.wait_for_selector(".msg.assistant .body")
    assert page.locator(".msg.assistant li.task input[type=checkbox]").count() == 2
    assert page.locator(".msg.assistant li.task input:checked").count() == 1
    assert page.locator(".msg.assistant th").evaluate_all("a => a.map((t) => t.className)") == \
        ["al-left", "al-center", "al-right"]
    assert page.locator(".msg.assistant img[alt='dot']").get_attribute("src").startswith("data:image/png")
    far = page.locator(".msg.assistant img[alt='far']")
    assert far.get_attribute("src") is None                 # nothing from elsewhere unasked
    page.click(".msg.assistant .load-image")
    assert far.get_attribute("src") == "https://example.org/x.png"
    code = page.locator(".msg.assistant li .codeblock code")
    assert code.inner_text() == "x = 1"                     # without the list's indent
    code.locator("xpath=../..").locator(".copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == "x = 1"
    assert page.locator("script[src*='katex']").count() == 0   # no math yet: no KaTeX
    # math: KaTeX loads for the first message with math, and draws it (no CSP violation)
    cid = conversation(server, [("Math?", "Euler: $e^{i\\pi} + 1 = 0$ and\n\n$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\n"
                                 "Costs $5 and $10. Bad: $\\frac{$")], title="Math")
    page.goto(f"{server.url}/#{cid}")
    page.wait_for_selector(".msg.assistant .math.drawn .katex")
    assert page.locator(".msg.assistant .math.display.drawn .katex-display").count() == 1
    assert page.locator(".msg.assistant .math").count() == 3    # "$5 and $10" stays text
    assert page.locator(".msg.assistant .math.tex-error").inner_text() == "\\frac{"  # as TeX
    assert "Costs $5 and $10." in page.locator(".msg.assistant .body").inner_text()
    assert page.evaluate("getComputedStyle(document.querySelector('.katex')).fontFamily").startswith("KaTeX")
    # nothing refused by the CSP (KaTeX styles through the CSSOM); the image asked for is
    # offline here
    assert [e for e in watch.errors if "ERR_NAME_NOT_RESOLVED" not in e] == []
    assert watch.dialogs == []
    ctx.close()


def test_the_page_is_small(server):
    """Under 60 KB gzipped without math: the page, its script, style and markdown parser."""
    import httpx
    total = 0
    for path in ("/", "/static/app.js", "/static/app.css", "/static/markdown-it.min.js"):
        with httpx.stream("GET", server.url + path, headers={"Accept-Encoding": "gzip"}) as r:
            r.read()
            assert r.headers["content-encoding"] == "gzip" and r.headers["etag"]
            total += r.num_bytes_downloaded
        again = httpx.get(server.url + path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
    assert total < 60_000, total


# ------------------------------------------------------------------ 9. message actions
def test_message_actions(browser, server):
    ctx, page, watch = open_page(browser, server.url)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    settings(page, max_tokens=4, temperature=0)
    send(page, "Count from one to twenty.")
    wait_replies(page, 1)
    cid = page.evaluate("location.hash").lstrip("#")
    first = stored_replies(server, cid)[0]
    assert first.finish_reason == "length"
    # copy a whole message (its markdown source)
    assistant(page).locator(".copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()") == first.content
    # continue after max tokens: the same reply grows
    assistant(page).locator(".continue").click()
    page.wait_for_function(f"() => document.querySelector('.msg.assistant .body').textContent.length > "
                           f"{len(first.content.strip())}")
    finished(server, cid, 1)
    settle(page)
    grown = server.store.get_message(server.store.local_user(), first.id)
    assert grown.content.startswith(first.content) and len(grown.content) > len(first.content)
    assert grown.completion_tokens > 4 and len(stored_replies(server, cid)) == 1
    # the user's own version of the reply: a sibling, marked as written by them
    assistant(page).locator(".more-toggle").click()
    assistant(page).locator(".edit-reply").click()
    page.fill(".edit-text", "One, two, three.")
    page.press(".edit-text", "Control+Enter")
    page.wait_for_selector(".msg.assistant .pos >> text=2/2")
    assert "written by you" in assistant(page).locator(".info").inner_text()
    mine = stored_replies(server, cid)[-1]
    assert mine.content == "One, two, three." and mine.meta == {"synthetic": False}
    # which is better? a preference pair, exported as DPO
    assistant(page).locator(".prefer-this").click()
    page.wait_for_selector(".compare >> text=You prefer this reply (2) to 1")
    pairs = server.store.preference_pairs(server.store.local_user())
    assert pairs[-1]["chosen"] == [{"role": "assistant", "content": "One, two, three."}]
    assert pairs[-1]["rejected"][0]["content"] == grown.content
    exported = page.evaluate("fetch('/api/preferences/export').then((r) => r.text())")
    assert json.loads(exported.splitlines()[-1]) == pairs[-1]
    # a comment without a thumb: Enter saves it, and says so
    assistant(page).locator(".comment-toggle").click()
    page.fill(".msg.assistant .comment", "Too short")
    page.press(".msg.assistant .comment", "Enter")
    page.wait_for_selector(".msg.assistant .saved >> text=Saved")
    r = server.store.ratings(server.store.local_user(), cid)[mine.id]
    assert r.value == 0 and r.comment == "Too short"
    # delete a branch: two clicks, the first says how much goes
    assistant(page).locator(".more-toggle").click()
    assistant(page).locator(".delete-branch").click()
    page.wait_for_selector(".msg.assistant .delete-branch >> text=Delete 1 message?")
    assistant(page).locator(".delete-branch").click()
    page.wait_for_function("() => !document.querySelector('.msg.assistant .pos')")
    assert [m.id for m in stored_replies(server, cid)] == [first.id]
    # write a reply yourself under the question
    assistant(page).locator(".more-toggle").click()
    assistant(page).locator(".write-reply").click()
    assert page.locator(".edit-text").input_value() == ""
    page.fill(".edit-text", "My own answer.")
    page.click(".save-edit")
    page.wait_for_selector(".msg.assistant .body >> text=My own answer.")
    # editing keeps the Escape convention
    page.locator(".msg.user .edit").click()
    page.press(".edit-text", "Escape")
    assert page.locator(".edit-text").count() == 0
    assert watch.errors == [] and watch.dialogs == []
    ctx.close()


# ------------------------------------------------------------------ 10. phone
def test_phone_list_closes_every_way_and_the_composer_grows(browser, server):
    ctx, page, watch = open_page(browser, server.url, viewport={"width": 390, "height": 844},
                                 is_mobile=True, has_touch=True)
    assert page.evaluate("document.getElementById('sidebar').inert")   # closed: out of Tab order
    sidebar_x = lambda: page.locator("#sidebar").bounding_box()["x"]   # noqa: E731
    for close in ("backdrop", "escape", "button"):
        page.click("#menu")
        page.wait_for_function("() => document.getElementById('app').classList.contains('side-open')")
        assert not page.evaluate("document.getElementById('sidebar').inert")
        if close == "backdrop":
            page.mouse.click(375, 400)                      # the strip of chat beside the list
        elif close == "escape":
            page.keyboard.press("Escape")
        else:
            page.click("#side-close")
        page.wait_for_function("() => !document.getElementById('app').classList.contains('side-open')")
        page.wait_for_timeout(250)
        assert sidebar_x() < 0 and page.evaluate("document.getElementById('sidebar').inert")
    before = page.locator("#prompt").bounding_box()["height"]
    page.fill("#prompt", "\n".join(f"line {i}" for i in range(10)))
    page.dispatch_event("#prompt", "input")
    assert page.locator("#prompt").bounding_box()["height"] > before + 60
    assert watch.errors == []
    ctx.close()


# ------------------------------------------------------------------ 12. a household with --auth
def test_a_household_with_auth(browser, tmp_path, default_gguf):
    from homellm.store import AuthConfig
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
    s = LiveServer(tmp_path / "house.db", default_gguf, auth=True, auth_config=config)
    try:
        ctx, page, watch = open_page(browser, s.url)
        assert page.locator("#gate-title").inner_text() == "Set up homellm"
        assert "at least 8 characters" in page.locator("#gate-rule").inner_text()  # up front
        page.fill("#gate-user", "mum")
        page.fill("#gate-pass", "mum-pass-1")
        page.click("#gate-submit")
        page.wait_for_selector("#app:not([hidden])")
        page.click("#users-box summary")
        for name in ("kid", "guest"):
            page.fill("#new-username", name)
            page.fill("#new-password", f"{name}-pass-1")
            page.click("#add-user button")
            page.wait_for_selector(f"#users li[data-username='{name}']")
        kid_session = s.store.login("kid", "kid-pass-1")
        # a new password for kid: kid's sessions end, the new one works
        page.click("#users li[data-username='kid'] .reset")
        page.fill("#users li[data-username='kid'] .reset-form input", "kid-new-pass")
        page.press("#users li[data-username='kid'] .reset-form input", "Enter")
        page.wait_for_selector("#users-status >> text=New password set for kid")
        assert s.store.session(kid_session.token) is None
        assert s.store.login("kid", "kid-new-pass") is not None
        # remove guest: two clicks
        page.click("#users li[data-username='guest'] .remove")
        page.click("#users li[data-username='guest'] .remove")
        page.wait_for_selector("#users li[data-username='guest']", state="detached")
        assert s.store.user_by_name("guest") is None
        assert page.locator("#users li[data-username='mum'] .remove").count() == 0   # not oneself
        # my own password
        page.click("#password-box summary")
        page.fill("#my-password", "wrong-one-1")
        page.fill("#my-new-password", "mum-pass-2")
        page.fill("#my-new-password2", "mum-pass-2")
        page.click("#password-form button")
        page.wait_for_selector("#password-status >> text=current password is wrong")
        page.fill("#my-password", "mum-pass-1")
        page.click("#password-form button")
        page.wait_for_selector("#password-status >> text=Password changed")
        assert s.store.login("mum", "mum-pass-2") is not None
        # the session ends (another tab logged out): the next action shows the login form
        page.fill("#prompt", "Keep this text")
        s.store.end_sessions(s.store.user_by_name("mum"))
        page.click("#new-chat")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#gate:not([hidden])")
        assert "session has ended" in page.locator("#gate-hint").inner_text()
        assert "POST /api/login" not in page.content()
        page.fill("#gate-user", "mum")
        page.fill("#gate-pass", "mum-pass-2")
        page.click("#gate-submit")
        page.wait_for_selector("#app:not([hidden])")
        assert page.locator("#prompt").input_value() == "Keep this text"
        assert watch.dialogs == []
        ctx.close()
    finally:
        s.close()
