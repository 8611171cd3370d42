"""The web app's accessibility (issue 18, item 11) in real headless Chromium against a live
server with the default model: axe-core (from the axe-playwright-python package, which ships
axe.min.js) finds nothing on the main views in the light and the dark theme, WCAG 2.1 A/AA
and best practices; Import is reached and opened from the keyboard; focus stays on the
control after rating or switching branch; the branch arrows say what they do; a reply is
announced once, when it is done."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_web_api import LiveServer
from test_web_browser import (CHROMIUM, browser, open_page, send, settings,  # noqa: F401
                              wait_reply_done)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not __import__("os").path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]

AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


@pytest.fixture(scope="module")
def axe_js() -> str:
    axe = pytest.importorskip("axe_playwright_python", reason="pip install -e '.[test]'")
    return (Path(axe.__file__).parent / "axe.min.js").read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    s = LiveServer(tmp_path_factory.mktemp("a11y") / "a11y.db", default_gguf)
    yield s
    s.close()


def violations(page, axe_js) -> list[str]:
    """axe-core's findings on the page as it is now: 'rule: selector: why' per node."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(axe_js)        # through the debugger protocol: the page's CSP is not asked
    found = page.evaluate("""(tags) => axe.run(document, {runOnly: {type: 'tag', values: tags}})
        .then((r) => r.violations.flatMap((v) => v.nodes.map((n) =>
            `${v.id}: ${n.target.join(' ')}: ${n.failureSummary.replace(/\\s+/g, ' ')}`)))""",
                          AXE_TAGS)
    return found


def bread(server):
    """A conversation with what a reply can hold: markdown, code, a table, two branches, a rating."""
    store, user = server.store, server.store.local_user()
    conv = store.create_conversation(user, title="Bread", model="smollm2:135m")
    q = store.add_message(user, conv.id, "user", "How does bread rise?", parent_id=None).id
    store.add_message(user, conv.id, "assistant", "Because of yeast.", parent_id=q)
    a = store.add_message(user, conv.id, "assistant",
                          "Yeast makes **gas** (see https://example.org).\n\n```python\nx = 1\n```\n\n"
                          "| step | time |\n|:--|--:|\n| rise | 1 h |\n\n- [x] knead\n- [ ] bake\n\n"
                          "> proofing\n\n~~old~~ `code`", parent_id=q).id
    store.rate(user, a, 1, "clear")
    return conv.id


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_nothing_on_the_main_views(browser, server, axe_js, scheme):
    cid = bread(server)
    ctx, page, watch = open_page(browser, f"{server.url}/#{cid}", color_scheme=scheme)
    page.wait_for_selector(".msg.assistant .thumb.up.on")
    assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches") == (scheme == "dark")
    found = {"chat": violations(page, axe_js)}
    page.click("#settings-toggle")                                  # settings open
    page.locator(".msg.assistant .more-toggle").click()             # the more actions
    page.locator(".msg.assistant .comment-toggle").click()          # a rating comment
    found["chat, settings, actions, comment"] = violations(page, axe_js)
    page.click("#new-chat")
    page.wait_for_selector(".msg, .welcome")
    found["new chat"] = violations(page, axe_js)
    for view in ("arena", "leaderboard", "evals", "contribute", "contributors"):
        page.click(f"#views a[data-view='{view}']")
        page.wait_for_selector(f"#{view}-view:not([hidden])")
        page.wait_for_load_state("networkidle")
        found[view] = violations(page, axe_js)
    ctx.close()
    # the phone, its list open
    ctx, page, watch = open_page(browser, f"{server.url}/#{cid}", color_scheme=scheme,
                                 viewport={"width": 390, "height": 844}, is_mobile=True,
                                 has_touch=True)
    page.wait_for_selector(".msg.assistant")
    found["phone"] = violations(page, axe_js)
    page.click("#menu")
    page.wait_for_function("() => document.getElementById('app').classList.contains('side-open')")
    page.wait_for_timeout(300)                                      # the slide ends
    found["phone, list open"] = violations(page, axe_js)
    assert watch.errors == []
    ctx.close()
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_nothing_on_the_login(browser, tmp_path, default_gguf, axe_js, scheme):
    from homellm.store import AuthConfig
    config = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
    s = LiveServer(tmp_path / "gate.db", default_gguf, auth=True, auth_config=config)
    try:
        ctx, page, watch = open_page(browser, s.url, color_scheme=scheme)
        assert page.locator("#gate-title").inner_text() == "Set up homellm"
        found = {"setup": violations(page, axe_js)}
        page.fill("#gate-user", "mum")
        page.fill("#gate-pass", "mum-pass-1")
        page.click("#gate-submit")
        page.wait_for_selector("#app:not([hidden])")
        page.click("#users-box summary")
        page.click("#password-box summary")
        found["admin: users and password"] = violations(page, axe_js)
        ctx.close()
        assert {k: v for k, v in found.items() if v} == {}
    finally:
        s.close()


def test_keyboard_focus_labels_and_one_announcement(browser, server):
    cid = bread(server)
    ctx, page, watch = open_page(browser, f"{server.url}/#{cid}")
    choosers = []     # listening from the start (the interception is set up asynchronously)
    page.on("filechooser", lambda c: choosers.append(c.element.get_attribute("id")))
    reply = page.locator(".msg.assistant")
    reply.locator(".thumb.up.on").wait_for()
    # Import from the keyboard: Tab reaches it and Space opens the file chooser
    page.focus("#export-prefs")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "import-file"
    page.keyboard.press("Space")
    page.wait_for_function("() => true")            # a round trip: the event has come by now
    for _ in range(50):
        if choosers:
            break
        page.wait_for_timeout(100)
    assert choosers == ["import-file"]
    # the branch arrows say what they do
    assert reply.locator(".prev").get_attribute("aria-label") == "Previous reply (1 of 2)"
    assert reply.locator(".next").get_attribute("aria-label") == "Next reply"   # none after 2/2
    assert reply.locator(".next").is_disabled()
    # switching branch from the keyboard keeps focus on the arrows (the other reply now)
    reply.locator(".prev").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .pos >> text=1/2")
    assert page.evaluate("document.activeElement.closest('.msg.assistant') !== null && "
                         "document.activeElement.matches('.prev, .next')")
    page.keyboard.press("Enter")                     # the prev arrow is disabled: on next
    page.wait_for_selector(".msg.assistant .pos >> text=2/2")
    assert page.evaluate("document.activeElement.matches('.msg.assistant .prev, .msg.assistant .next')")
    # rating from the keyboard keeps focus on the thumb
    reply.locator(".thumb.down").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .thumb.down.on")
    assert page.evaluate("document.activeElement.matches('.msg.assistant .thumb.down.on')")
    # a reply is announced once, when it is done (not each piece as it streams)
    page.evaluate("""() => { window.announced = [];
        new MutationObserver(() => { const t = document.getElementById('announce').textContent;
            if (t) window.announced.push(t); })
          .observe(document.getElementById('announce'), {childList: true, characterData: true,
                                                         subtree: true}); }""")
    settings(page, max_tokens=12, temperature=0)
    send(page, "Name three breads.")
    page.wait_for_function("() => !S.streaming && S.turns.length === 4 && "
                           "S.turns[3].message.finish_reason && "
                           "document.getElementById('announce').textContent")
    page.wait_for_timeout(500)                       # a second announcement would be here now
    announced = page.evaluate("window.announced")
    last = page.evaluate("S.turns[S.turns.length - 1].message.content")
    assert len(announced) == 1 and announced[0].startswith("Reply done: "), announced
    assert announced[0] == f"Reply done: {last[:500]}"
    assert watch.errors == [] and watch.dialogs == []
    ctx.close()
