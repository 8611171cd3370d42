"""The volunteer collection in Open Assistant's export formats (issue 15), on SQLite and
PostgreSQL: `homellm data collect-export` trees and messages (plain and gzipped) load with
the `datasets` JSON loader and have the oasst2 fields with oasst-data's types;
export -> import -> export gives the same bytes; oasst1/oasst2 files (the README's own
examples) import; bad files are refused naming FILE:LINE with nothing written; `homellm data
export --collect` makes SFT (the best-ranked path), DPO and reward-model pairs, with the
language, minimum-review, deleted, flagged and synthetic filters."""
from __future__ import annotations

import gzip
import json
from datetime import datetime

import pytest
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)
from test_collect import FAST, Crowd

from homellm.cli.main import main
from homellm.store import open_store

SETTINGS = dict(goal_tree_size=4, max_tree_depth=1, max_children_count=3)

# the message fields of oasst-data (oasst_data/schemas.py, ExportMessageNode; README
# "Individual Messages") and the types `datasets` gives them from JSON lines
MESSAGE_SCHEMA = {
    "message_id": "string", "parent_id": "string", "user_id": "string",
    "created_date": "string", "text": "string", "role": "string", "lang": "string",
    "review_count": "int64", "review_result": "bool", "deleted": "bool", "rank": "int64",
    "synthetic": "bool", "model_name": "string",
    "message_tree_id": "string", "tree_state": "string",
}
# `labels` and `emojis` are {name: ...} objects whose names differ from line to line:
# `datasets` keeps them as mappings (its Json feature), each label {"value": float, "count":
# int} and each emoji a count


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/collect.db"
    return request.getfixturevalue("pg_url")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(x) for x in f.read().splitlines()]


def build(url) -> dict:
    """A ready tree (a synthetic reply, three ranked replies, a red flag, a thumbs up), a
    German tree still growing with a deleted reply, and a rejected prompt."""
    c = Crowd(url, seed=3, **SETTINGS)
    tm = c.tm
    _, r = c.act("ann", "initial_prompt", text="Why is the sky blue?", lang="en",
                 tags=["science"])
    root = r["tree"]["id"]
    c.act("bob", "label_initial_prompt", spam=0, quality=1)
    c.act("cat", "label_initial_prompt", spam=0, quality=0.75, humor=0.25)
    synth = tm.add_synthetic(c.mod, root, "Rayleigh scattering.", "smollm2:135m")["message_id"]
    a = c.act("bob", "assistant_reply", text="Air scatters blue light most.")[1]["message_id"]
    b = c.act("cat", "assistant_reply", text="Because it reflects the sea.")[1]["message_id"]
    for who in ("ann", "dan"):
        for _ in range(3):
            c.act(who, "label_assistant_reply", spam=0, quality=0.5, helpfulness=1)
    c.act("ann", "rank_assistant_replies", order=[a, synth, b])
    c.act("dan", "rank_assistant_replies", order=[a, synth, b])
    assert c.state(root) == "ready_for_export"
    tm.emoji(c.u["cat"], a, "+1")
    tm.report(c.u["dan"], b, "factually wrong")
    _, r = c.act("dan", "initial_prompt", text="Warum ist der Himmel blau?", lang="de")
    de = r["tree"]["id"]
    c.act("ann", "label_initial_prompt", spam=0)
    c.act("bob", "label_initial_prompt", spam=0)
    gone = c.act("ann", "assistant_reply", text="Weil er blau ist.")[1]["message_id"]
    tm.delete_message(c.mod, gone)
    _, r = c.act("cat", "initial_prompt", text="zzzz", lang="en")
    c.act("ann", "label_initial_prompt", spam=1)
    c.act("dan", "label_initial_prompt", spam=1)
    ids = {"root": root, "a": a, "b": b, "synth": synth, "de": de, "gone": gone,
           "spam": r["tree"]["id"]}
    c.close()
    return ids


def test_exports_load_with_datasets_and_have_the_oasst2_fields(db_url, tmp_path, capsys,
                                                               monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ids = build(db_url)
    msgs, trees = tmp_path / "m.jsonl.gz", tmp_path / "t.jsonl"
    code, _, err = run(capsys, "data", "collect-export", str(msgs), "--messages", "--state",
                       "all", "--include-deleted", "--include-spam", "--db", db_url)
    assert code == 0 and "3 trees (7 messages)" in err and "as messages" in err, err
    assert run(capsys, "data", "collect-export", str(trees), "--db", db_url)[0] == 0
    cache = str(tmp_path / "hf")
    ds = datasets.load_dataset("json", data_files=str(msgs), split="train", cache_dir=cache)
    assert len(ds) == 7
    feats = ds.features
    assert set(feats) == set(MESSAGE_SCHEMA) | {"emojis", "labels"}
    for name, dtype in MESSAGE_SCHEMA.items():
        assert feats[name].dtype == dtype, (name, feats[name])
    assert isinstance(feats["labels"], datasets.Json) and isinstance(feats["emojis"],
                                                                      datasets.Json)
    rows = {r["message_id"]: r for r in ds}
    seen = set()
    for r in rows.values():
        for name, v in (r["labels"] or {}).items():
            assert set(v) == {"value", "count"} and isinstance(v["value"], float), v
            assert isinstance(v["count"], int) and not isinstance(v["count"], bool)
            seen.add(name)
        assert all(isinstance(n, int) for n in (r["emojis"] or {}).values())
    assert seen == {"spam", "quality", "humor", "helpfulness"}
    for r in rows.values():
        assert datetime.fromisoformat(r["created_date"]).tzinfo is not None
        assert r["role"] in ("prompter", "assistant")
    assert rows[ids["synth"]]["synthetic"] is True
    assert rows[ids["synth"]]["model_name"] == "smollm2:135m"
    assert [rows[ids[k]]["rank"] for k in ("a", "synth", "b")] == [0, 1, 2]
    assert rows[ids["gone"]]["deleted"] is True and rows[ids["spam"]]["review_result"] is False
    assert rows[ids["root"]]["labels"]["quality"] == {"value": 0.875, "count": 2}
    assert rows[ids["root"]]["labels"]["humor"] == {"value": 0.25, "count": 1}
    assert rows[ids["de"]]["tree_state"] == "growing" and rows[ids["de"]]["lang"] == "de"
    emojis = {r["message_id"]: r["emojis"] for r in read_lines(msgs)}
    assert emojis[ids["a"]] == {"+1": 1} and emojis[ids["b"]] == {"red_flag": 1}
    # the trees file: one ready tree, replies nested by rank, null fields left out
    t = datasets.load_dataset("json", data_files=str(trees), split="train", cache_dir=cache)
    assert len(t) == 1 and t[0]["message_tree_id"] == ids["root"]
    assert t.features["tree_state"].dtype == "string"
    prompt = t[0]["prompt"]
    assert [r["message_id"] for r in prompt["replies"]] == [ids["a"], ids["synth"], ids["b"]]
    raw = read_lines(trees)[0]
    assert raw["homellm"] == {"tags": ["science"]} and raw["origin"] == "homellm"
    assert "rank" not in raw["prompt"] and "model_name" not in raw["prompt"]
    assert list(raw["prompt"])[:8] == ["message_id", "parent_id", "user_id", "created_date",
                                       "text", "role", "lang", "review_count"]


def test_export_import_export_is_identical(db_url, tmp_path, capsys):
    build(db_url)
    other = f"sqlite:///{tmp_path}/other.db"
    for i, (name, opts) in enumerate((
            ("trees.jsonl", ["--state", "all", "--include-deleted", "--include-spam",
                             "--events"]),
            ("msgs.jsonl.gz", ["--messages", "--state", "all", "--include-spam"]),
            ("ready.jsonl.gz", []))):
        first, second = tmp_path / f"1-{name}", tmp_path / f"2-{name}"
        target = f"sqlite:///{tmp_path}/copy{i}.db"
        assert run(capsys, "data", "collect-export", str(first), *opts, "--db", db_url)[0] == 0
        code, _, err = run(capsys, "data", "collect-import", str(first), "--db", target)
        assert code == 0 and "imported" in err, err
        assert run(capsys, "data", "collect-export", str(second), *opts, "--db", target)[0] == 0
        a, b = (gzip.open(p).read() if name.endswith(".gz") else p.read_bytes()
                for p in (first, second))
        assert a == b and len(a) > 500, name
    # what the copy adds is merged in: a thumbs up on an imported message counts with them
    with open_store(f"sqlite:///{tmp_path}/copy0.db", auth=FAST) as s:
        from homellm.collect import TreeManager
        me = s.create_user("zed")
        tree = read_lines(tmp_path / "1-trees.jsonl")[0]
        first_reply = tree["prompt"]["replies"][0]
        TreeManager(s.db).emoji(me, first_reply["message_id"], "+1")
    out = tmp_path / "after.jsonl"
    assert run(capsys, "data", "collect-export", str(out), "--db",
               f"sqlite:///{tmp_path}/copy0.db")[0] == 0
    assert read_lines(out)[0]["prompt"]["replies"][0]["emojis"] == {"+1": 2}
    # importing the same trees again is refused before anything is written
    code, _, err = run(capsys, "data", "collect-import", str(tmp_path / "1-trees.jsonl"),
                       "--db", other)
    assert code == 0
    code, _, err = run(capsys, "data", "collect-import", str(tmp_path / "1-trees.jsonl"),
                       "--db", other)
    assert code != 0 and "in the collection already; nothing imported" in err


# the README's examples (oasst-data/README.md): a message with every property, and a tree
README_MESSAGE = {
    "message_id": "218440fd-5317-4355-91dc-d001416df62b",
    "parent_id": "13592dfb-a6f9-4748-a92c-32b34e239bb4",
    "user_id": "8e95461f-5e94-4d8b-a2fb-d4717ce973e4",
    "text": "It was the winter of 2035, and artificial intelligence (..)",
    "role": "assistant", "lang": "en", "review_count": 3, "review_result": True,
    "deleted": False, "rank": 0, "synthetic": True,
    "model_name": "oasst-sft-0_3000,max_new_tokens=400 (..)",
    "labels": {"spam": {"value": 0.0, "count": 3}, "lang_mismatch": {"value": 0.0, "count": 3},
               "pii": {"value": 0.0, "count": 3}, "not_appropriate": {"value": 0.0, "count": 3},
               "hate_speech": {"value": 0.0, "count": 3},
               "sexual_content": {"value": 0.0, "count": 3},
               "quality": {"value": 0.416, "count": 3}, "toxicity": {"value": 0.16, "count": 3},
               "humor": {"value": 0.0, "count": 3}, "creativity": {"value": 0.33, "count": 3},
               "violence": {"value": 0.16, "count": 3}}}
README_PROMPT = {"message_id": "13592dfb-a6f9-4748-a92c-32b34e239bb4",
                 "text": "Write a story about the winter of 2035.", "role": "prompter",
                 "lang": "en", "created_date": "2023-02-05T14:23:50.983374+00:00",
                 "review_count": 3, "review_result": True, "deleted": False,
                 "emojis": {"+1": 4, "_skip_labeling": 1}}


def test_oasst_files_import_and_feed_training_exports(db_url, tmp_path, capsys):
    tree = {"message_tree_id": README_PROMPT["message_id"], "tree_state": "ready_for_export",
            "prompt": {**README_PROMPT, "replies": [
                {**README_MESSAGE, "replies": []},
                {**README_MESSAGE, "message_id": "aa", "rank": 1, "synthetic": False,
                 "model_name": None, "text": "Snow fell on the servers.",
                 "detoxify": {"toxicity": 0.01}, "replies": []}]}}
    src = tmp_path / "oasst2.trees.jsonl"
    src.write_text(json.dumps(tree) + "\n")
    code, _, err = run(capsys, "data", "collect-import", str(src), "--db", db_url)
    assert code == 0 and "1 trees (3 messages)" in err, err
    with open_store(db_url, auth=FAST) as s:
        row = s.db.one("SELECT * FROM collect_messages WHERE id = ?", (README_MESSAGE[
            "message_id"],))
        assert (row["author"], row["review_count"], row["rank"], row["model_name"]) == \
            (README_MESSAGE["user_id"], 3, 0, README_MESSAGE["model_name"])
        assert row["user_id"] is None   # an imported author is not a local account
    out = tmp_path / "out.jsonl"
    assert run(capsys, "data", "collect-export", str(out), "--db", db_url)[0] == 0
    expected = json.loads(json.dumps(tree))
    expected["prompt"]["parent_id"] = None              # the root says so (as OA writes it)
    del expected["prompt"]["replies"][1]["model_name"]  # null fields are left out
    assert read_lines(out) == [expected]
    got = read_lines(out)[0]
    assert got["prompt"]["emojis"] == README_PROMPT["emojis"]
    assert got["prompt"]["replies"][0]["labels"] == README_MESSAGE["labels"]
    assert got["prompt"]["replies"][1]["detoxify"] == {"toxicity": 0.01}
    assert "created_date" not in got["prompt"]["replies"][0]   # absent stays absent
    # an oasst messages file (oasst-data's tree_to_messages): rebuilt into its trees
    flat = tmp_path / "oasst1.messages.jsonl"
    rows = [{**README_PROMPT, "parent_id": None}, {**README_MESSAGE, "message_id": "bb"}]
    flat.write_text("".join(json.dumps({**r, "message_tree_id": README_PROMPT["message_id"],
                                        "tree_state": "ready_for_export", "replies": None})
                            + "\n" for r in rows[::-1]))
    other = f"sqlite:///{tmp_path}/flat.db"
    code, _, err = run(capsys, "data", "collect-import", str(flat), "--db", other)
    assert code == 0 and "1 trees (2 messages)" in err, err
    # the training sets from the collection
    sft, dpo, rm = (tmp_path / f"{k}.jsonl" for k in ("sft", "dpo", "rm"))
    code, _, err = run(capsys, "data", "export", "--collect", "--db", db_url, "--sft", str(sft),
                       "--dpo", str(dpo), "--rm", str(rm))
    assert code == 0 and "1 SFT examples" in err and "1 RM pairs" in err, err
    user = {"role": "user", "content": README_PROMPT["text"]}
    best = {"role": "assistant", "content": README_MESSAGE["text"]}
    other_reply = {"role": "assistant", "content": "Snow fell on the servers."}
    assert read_lines(sft) == [{"messages": [user, best]}]
    assert read_lines(dpo) == [{"prompt": [user], "chosen": [best], "rejected": [other_reply]}]
    assert read_lines(rm) == [{"chosen": [user, best], "rejected": [user, other_reply],
                               "margin": 1.0}]
    code, _, err = run(capsys, "data", "export", "--collect", "--db", db_url, "--sft", str(sft),
                       "--no-synthetic")
    assert code == 0 and read_lines(sft) == [{"messages": [user, other_reply]}]


def test_training_exports_with_filters(db_url, tmp_path, capsys):
    build(db_url)
    sft, dpo, rm = (tmp_path / f"{k}.jsonl" for k in ("sft", "dpo", "rm"))

    def export(*opts):
        code, _, err = run(capsys, "data", "export", "--collect", "--db", db_url, "--sft",
                           str(sft), "--dpo", str(dpo), "--rm", str(rm), *opts)
        assert code == 0, err
        return ([m["messages"][-1]["content"] for m in read_lines(sft)],
                [(p["chosen"][0]["content"], p["rejected"][0]["content"])
                 for p in read_lines(dpo)], [p["margin"] for p in read_lines(rm)])
    a, s, b = ("Air scatters blue light most.", "Rayleigh scattering.",
               "Because it reflects the sea.")
    assert export() == ([a], [(a, s), (a, b), (s, b)], [1.0, 2.0, 1.0])
    assert export("--no-synthetic") == ([a], [(a, b)], [2.0])
    assert export("--no-flagged") == ([a], [(a, s)], [1.0])         # b has a red flag
    assert export("--lang", "de") == ([], [], [])                   # the German tree grows
    assert export("--lang", "de,en", "--min-reviews", "2") == ([a], [(a, s), (a, b), (s, b)],
                                                               [1.0, 2.0, 1.0])
    assert export("--min-reviews", "3") == ([], [], [])
    code, _, err = run(capsys, "data", "export", "--collect", "--db", db_url, "--sft", str(sft),
                       "--min-reviews", "-1")
    assert code != 0 and "--min-reviews -1" in err


def test_bad_export_files_are_refused_naming_the_line(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/x.db"
    cases = {
        "notjson.jsonl": ('{"message_tree_id": "t", "prompt": {"message_id": "a", "role": '
                          '"prompter", "text": "hi"}}\n{oops\n', ":2: not JSON"),
        "orphan.jsonl": ('{"message_id": "a", "parent_id": null, "role": "prompter", '
                         '"text": "x"}\n{"message_id": "b", "parent_id": "zz", "role": '
                         '"assistant", "text": "y"}\n', ":2: message b: its parent zz"),
        "dupe.jsonl": ('{"message_id": "a", "parent_id": null, "role": "prompter", "text": '
                       '"x"}\n{"message_id": "a", "parent_id": null, "role": "prompter", '
                       '"text": "y"}\n', ":2: message a: duplicate message_id"),
        "role.jsonl": ('{"message_tree_id": "t", "prompt": {"message_id": "a", "role": '
                       '"assistant", "text": "hi"}}\n', "field 'role': expected 'prompter'"),
        "gz.jsonl.gz": ("not gzip", "cannot read"),
    }
    for name, (text, want) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        code, _, err = run(capsys, "data", "collect-import", str(p), "--db", db)
        assert code != 0 and str(p) in err and want in err, (name, err)
        assert "Traceback" not in err
    with open_store(db, auth=FAST) as s:
        assert s.db.one("SELECT COUNT(*) AS n FROM collect_messages")["n"] == 0
    code, _, err = run(capsys, "data", "collect-export", str(tmp_path / "o.jsonl"), "--db", db,
                       "--state", "done")
    assert code != 0 and "--state 'done'" in err
