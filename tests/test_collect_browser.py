"""The Contribute, Moderate and Contributors views in real headless Chromium (issue 15): three
volunteers and a moderator, each in their own browser context, take a conversation tree from
its prompt to ready_for_export through the page: the prompt and its reviews (OA's labels),
replies, a reply that fails review and leaves the tree, more reviews, a report from inside
a ranking task, the rankings; the moderator halts another tree from the Moderate view and
it hands out no more tasks; the leaderboard shows the points the store counts."""
from __future__ import annotations

import pytest
from test_collect import SMALL, CollectServer
from test_web_browser import CHROMIUM, open_page, pytestmark  # noqa: F401  (skip w/o Chromium)

from homellm.collect import CollectSettings, TreeManager

PEOPLE = [("vol1", "vol1-pass-123", "volunteer"), ("vol2", "vol2-pass-123", "volunteer"),
          ("vol3", "vol3-pass-123", "volunteer"), ("mod", "mod-pass-1234", "moderator")]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    s = CollectServer(str(tmp_path_factory.mktemp("cb") / "collect.db"), default_gguf,
                      CollectSettings(**SMALL), PEOPLE)
    yield s
    s.close()


def login(browser, server, name, password, path="/contribute"):
    ctx, page, watch = open_page(browser, server.url + path)
    page.fill("#gate-user", name)
    page.fill("#gate-pass", password)
    page.click("#gate-submit")
    page.wait_for_selector(f"#{path.strip('/')}-view:not([hidden])")
    return ctx, page, watch


def take(page, kind, expect=True):
    """Ask for a task of `kind`; with expect=False, check that there is none."""
    page.wait_for_selector(f"#collect-type option[value='{kind}']", state="attached")
    page.select_option("#collect-type", kind)
    page.evaluate("document.getElementById('collect-status').textContent = ''")
    page.click("#collect-next")
    if not expect:
        page.wait_for_selector(f"#collect-status >> text=no '{kind}' tasks")
        assert page.is_hidden("#collect-task")
        return None
    page.wait_for_selector("#collect-task:not([hidden])")
    return page.evaluate("S.collect.task")


def submit(page, then="Saved"):
    page.click("#collect-submit")
    page.wait_for_selector(f"#collect-status >> text={then}")
    assert page.is_hidden("#collect-task")
    return page.locator("#collect-status").inner_text()


def write(page, kind, text, tags=None):
    t = take(page, kind)
    page.fill("#collect-text", text)
    if tags:
        page.fill("#collect-task-tags", tags)
    return t, submit(page)


def label(page, kind, spam_if: str = "BUY"):
    """Review the next message of `kind`: spam when its text has `spam_if`, else fine."""
    t = take(page, kind)
    text = page.locator("#collect-conversation .cmsg").last.inner_text()
    page.check(f".label-row[data-label='spam'] input[value='{1 if spam_if in text else 0}']")
    page.check(".label-row[data-label='quality'] input[value='0.75']")   # 4 of 5
    if spam_if in text and t["type"] != "label_initial_prompt":
        page.check(".label-row[data-label='not_appropriate'] input")   # a flag: sends 1
    return t, submit(page)


def rank(page, best_text: str):
    """Put the reply with `best_text` first with the ▲ buttons, then submit."""
    t = take(page, "rank_assistant_replies")
    items = page.locator("#collect-ranking > li")
    for _ in range(items.count()):
        first = items.first.locator(".cmsg .body").inner_text()
        if best_text in first:
            break
        target = page.locator("#collect-ranking > li", has_text=best_text)
        target.locator("button.up").click()
    assert best_text in items.first.inner_text()
    return t, submit(page)


@pytest.mark.slow
def test_three_volunteers_and_a_moderator_grow_a_tree_in_chromium(browser, server):
    tm = TreeManager(server.store.db)
    pages = {}
    for name, password, _ in PEOPLE:
        pages[name] = login(browser, server, name, password)
    v1, v2, v3, mod = (pages[n][1] for n in ("vol1", "vol2", "vol3", "mod"))
    assert v1.title() == "homellm · Contribute" and v1.is_hidden("#moderate-link")
    mod.wait_for_selector("#moderate-link:not([hidden])")

    # the prompt, and its two reviews
    t, status = write(v1, "initial_prompt", "What is the capital of France?", "geography")
    tree = tm.trees.trees()[0]
    assert tree["tags"] == ["geography"] and tree["lang"] == "en"
    assert "initial prompt review" in status
    t, _ = label(v2, "label_initial_prompt")
    assert t["conversation"][0]["text"] == "What is the capital of France?"
    assert [lab["name"] for lab in t["labels"]][:3] == ["spam", "lang_mismatch", "quality"]
    _, status = label(v3, "label_initial_prompt")
    assert "growing" in status

    # replies: one is spam, fails review and leaves the tree; a third takes its place
    write(v1, "assistant_reply", "BUY CHEAP WATCHES at example.com")
    write(v2, "assistant_reply", "Paris is the capital of France.")
    take(v3, "assistant_reply", expect=False)   # root + two in review: the goal is reached
    for page in (v3, mod, v3, mod):
        label(page, "label_assistant_reply")
    ms = {m["text"]: m for m in tm.trees.tree_messages(tree["id"])}
    spam, paris = ms["BUY CHEAP WATCHES at example.com"], ms["Paris is the capital of France."]
    assert spam["review_result"] is False and paris["review_result"] is True
    flags = {"lang_mismatch": 0.0, "not_appropriate": 0.0, "pii": 0.0, "hate_speech": 0.0,
             "sexual_content": 0.0}   # flags left unchecked are sent as 0
    reviews = tm.trees.reviews([spam["id"], paris["id"]])
    assert reviews[paris["id"]] == [{"spam": 0.0, "quality": 0.75, **flags}] * 2
    assert reviews[spam["id"]] == [{"spam": 1.0, "quality": 0.75, **flags,
                                    "not_appropriate": 1.0}] * 2
    write(v3, "assistant_reply", "The capital of France is Paris, on the Seine.")
    for page in (v1, v2):
        label(page, "label_assistant_reply")
    assert tm.trees.tree(tree["id"])["state"] == "ranking"

    # rankings (the authors of the replies may not rank them); a report from inside one
    take(v2, "rank_assistant_replies", expect=False)
    t = take(v1, "rank_assistant_replies")
    assert {r["text"] for r in t["replies"]} == {"Paris is the capital of France.",
                                                 "The capital of France is Paris, on the Seine."}
    item = v1.locator("#collect-ranking > li", has_text="Paris is the capital of France.")
    item.locator("button.report").click()
    item.locator("input.report-reason").fill("too short")
    item.locator("button", has_text="Send").click()
    v1.wait_for_selector("#collect-status >> text=Reported")
    _, status = rank(v1, "on the Seine")      # the same task, resumed
    assert "ranking" in status
    _, status = rank(mod, "on the Seine")
    assert "ready for export" in status
    ms = {m["text"]: m for m in tm.trees.tree_messages(tree["id"])}
    assert ms["The capital of France is Paris, on the Seine."]["rank"] == 0
    assert ms["Paris is the capital of France."]["rank"] == 1
    assert ms["BUY CHEAP WATCHES at example.com"]["rank"] is None
    assert tm.trees.tree(tree["id"])["state"] == "ready_for_export"

    # the moderator: the report, the tree's messages, and halting another tree
    write(v2, "initial_prompt", "Tell me a joke about penguins.")
    mod.click("#views a[data-view='moderate']")
    mod.wait_for_selector("#moderate-reports li >> text=too short")
    row = mod.locator("#moderate-trees tbody tr", has_text="penguins")
    row.click()
    mod.wait_for_selector("#moderate-tree-state >> text=initial prompt review")
    mod.click("#moderate-halt")
    mod.wait_for_selector("#moderate-tree-state >> text=halted by moderator")
    penguins = next(t for t in tm.trees.trees() if "penguins" in (t["prompt"] or ""))
    assert penguins["state"] == "halted_by_moderator"
    for page in (v1, v3):
        take(page, "label_initial_prompt", expect=False)
    mod.locator("#moderate-trees tbody tr", has_text="capital of France").click()
    mod.wait_for_selector("#moderate-tree-state >> text=ready for export")
    assert mod.locator("#moderate-messages li.rejected").count() == 1
    # a volunteer's Moderate view is refused by the server
    v1.goto(server.url + "/moderate")
    v1.wait_for_selector("#moderate-error >> text=only a moderator")

    # the leaderboard shows what the store counts
    v3.click("#views a[data-view='contributors']")
    v3.wait_for_selector("#contributors-table tbody tr")
    board = tm.leaderboard("total")
    rows = v3.locator("#contributors-table tbody tr")
    assert rows.count() == len(board)
    for i, x in enumerate(board):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[:4] == [str(x["rank"]), x["username"], str(x["leader_score"]),
                             str(x["level"])]
    assert v3.is_hidden("#trollboard")
    mod.click("#views a[data-view='contributors']")
    mod.wait_for_selector("#trollboard:not([hidden]) #trollboard-table tbody tr")
    for name, (ctx, page, watch) in pages.items():
        assert watch.dialogs == [], name
        # only the refusal asked for on purpose (Chromium logs a 4xx as a console error)
        assert all("403" in e for e in watch.errors), (name, watch.errors)
        ctx.close()
