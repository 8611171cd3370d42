"""homellm.data.oasst: oasst2 trees in and out, validation with FILE:LINE, SFT and DPO rules."""
import json

import pytest

from homellm.data.oasst import (Message, Tree, assign_ranks, dpo_pairs, rating_fields, ratings_of,
                                read_trees, sft_examples, tree_from_dict, tree_to_dict,
                                write_trees)


def msg(mid, role, text, *replies, ratings=None, **kw):
    m = Message(message_id=mid, role=role, text=text, **kw)
    for k, v in rating_fields(ratings or []).items():
        setattr(m, k, v)
    m.replies = list(replies)
    for r in m.replies:
        r.parent_id = mid
    assign_ranks([r for r in m.replies])
    return m


def up(n=1):
    return [{"user_id": f"u{i}", "value": 1, "comment": None} for i in range(n)]


def down(n=1):
    return [{"user_id": f"d{i}", "value": -1, "comment": "wrong"} for i in range(n)]


def hand_tree() -> Tree:
    """
    P1 What is 2+2?
    ├─ A1 4                 (+1 +1)      rank 0
    │  ├─ P2 And 3+3?
    │  │  ├─ A3 6           (+1)         rank 0
    │  │  └─ A4 7           (-1)         rank 1
    │  ├─ P3 Thanks                      (no reply)
    │  └─ P4 Why?
    │     └─ A7 Because.                 (unrated)
    ├─ A2 5                 (-1)         rank 1
    ├─ A5 four                           (unrated)
    └─ A6 Four, bec         (+1 +1 +1)   incomplete: never a target
    """
    a3 = msg("A3", "assistant", "6", ratings=up())
    a4 = msg("A4", "assistant", "7", ratings=down())
    p2 = msg("P2", "prompter", "And 3+3?", a3, a4)
    p3 = msg("P3", "prompter", "Thanks")
    p4 = msg("P4", "prompter", "Why?", msg("A7", "assistant", "Because."))
    a1 = msg("A1", "assistant", "4", p2, p3, p4, ratings=up(2))
    a2 = msg("A2", "assistant", "5", ratings=down())
    a5 = msg("A5", "assistant", "four")
    a6 = msg("A6", "assistant", "Four, bec", ratings=up(3), homellm={"incomplete": True})
    p1 = msg("P1", "prompter", "What is 2+2?", a1, a2, a5, a6)
    return Tree(message_tree_id="P1", prompt=p1, tree_state="ready_for_export",
                homellm={"system_prompt": "Be brief."})


def U(t):
    return {"role": "user", "content": t}


def A(t):
    return {"role": "assistant", "content": t}


SYS = {"role": "system", "content": "Be brief."}


def test_ranks_follow_scores():
    t = hand_tree()
    by = {m.message_id: m for m in t.messages()}
    # A6 (+3) is rated and ranks first by score, although incomplete
    assert [by[i].rank for i in ("A6", "A1", "A2", "A5")] == [0, 1, 2, None]
    assert by["A1"].emojis == {"+1": 2} and by["A2"].emojis == {"-1": 1}
    assert by["A1"].labels == {"quality": {"value": 1.0, "count": 2}}
    assert ratings_of(by["A2"]) == [{"user_id": "d0", "value": -1, "comment": "wrong"}]


def test_sft_examples_known_output():
    assert sft_examples(hand_tree()) == [
        {"messages": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")]},
        {"messages": [SYS, U("What is 2+2?"), A("4"), U("Why?"), A("Because.")]},
    ]


def test_dpo_pairs_known_output():
    assert dpo_pairs(hand_tree()) == [
        {"prompt": [SYS, U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]},
        {"prompt": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?")],
         "chosen": [A("6")], "rejected": [A("7")]},
    ]


def test_rank_only_oasst_tree():
    """oasst's own data carries ranks without +1/-1 counts: rank alone decides."""
    d = {"message_tree_id": "r", "tree_state": "ready_for_export", "prompt": {
        "message_id": "r", "parent_id": None, "text": "Hi", "role": "prompter", "lang": "en",
        "replies": [
            {"message_id": "x", "parent_id": "r", "text": "B", "role": "assistant", "rank": 1},
            {"message_id": "y", "parent_id": "r", "text": "A", "role": "assistant", "rank": 0},
            {"message_id": "z", "parent_id": "r", "text": "C", "role": "assistant", "rank": 2,
             "emojis": {"-1": 3}},
        ]}}
    t = tree_from_dict(d)
    assert sft_examples(t) == [{"messages": [U("Hi"), A("A")]}]
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in dpo_pairs(t)]
    assert got == [("B", "C"), ("A", "B"), ("A", "C")]


def test_negative_only_replies_give_no_sft():
    t = Tree("t", msg("t", "prompter", "Q", msg("a", "assistant", "bad", ratings=down(2))))
    assert sft_examples(t) == []
    assert dpo_pairs(t) == []


def test_write_read_round_trip(tmp_path):
    trees = [hand_tree(), Tree("solo", msg("solo", "prompter", "only a prompt"))]
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = tmp_path / name
        assert write_trees(trees, path) == 2
        assert read_trees(path) == trees
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["prompt"]["replies"][0]["parent_id"] == "P1"


OASST2_LINE = {  # the shape of a line of 2023-11-05_oasst2_all.trees.jsonl, shortened
    "message_tree_id": "6ab24d72-0181-4594-a9cd-deaf170242fb", "tree_state": "ready_for_export",
    "prompt": {
        "message_id": "6ab24d72-0181-4594-a9cd-deaf170242fb", "parent_id": None,
        "user_id": "c3fe8c76", "created_date": "2023-02-05T14:23:50.983374+00:00",
        "text": "Can you write a short introduction?", "role": "prompter", "lang": "en",
        "review_count": 3, "review_result": True, "deleted": False, "synthetic": False,
        "model_name": None, "detoxify": {"toxicity": 0.0004},
        "emojis": {"+1": 10, "_skip_reply": 1},
        "labels": {"spam": {"value": 0.0, "count": 3}, "quality": {"value": 0.83, "count": 3}},
        "replies": [{
            "message_id": "c8e83833", "parent_id": "6ab24d72-0181-4594-a9cd-deaf170242fb",
            "text": "Monopsony refers to...", "role": "assistant", "lang": "en", "rank": 0,
            "synthetic": False, "events": {"emoji": [{"type": "emoji", "emoji": "+1",
                                                      "user_id": None}]},
            "replies": []}]}}


def test_oasst2_line_kept_field_for_field(tmp_path):
    path = tmp_path / "oasst2.jsonl"
    path.write_text(json.dumps(OASST2_LINE) + "\n\n")
    (tree,) = read_trees(path)
    assert tree.prompt.extra == {"detoxify": {"toxicity": 0.0004}}
    expected = json.loads(json.dumps(OASST2_LINE))
    expected["prompt"].pop("model_name")  # nulls are not written back
    assert tree_to_dict(tree) == expected
    assert sft_examples(tree) == [{"messages": [U("Can you write a short introduction?"),
                                                A("Monopsony refers to...")]}]


def _bad(tmp_path, obj_or_text):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"message_tree_id": "g", "prompt": {"message_id": "g", "role": "prompter",
                                                            "text": "fine"}})
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    path.write_text(good + "\n\n" + text + "\n")
    with pytest.raises(ValueError) as e:
        read_trees(path)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    return str(e.value)


def _tree(**prompt):
    p = {"message_id": "m1", "role": "prompter", "text": "hi", **prompt}
    return {"message_tree_id": "t", "prompt": p}


def test_errors_name_file_line_message_and_field(tmp_path):
    assert "not JSON" in _bad(tmp_path, '{"message_tree_id": ')
    assert "field 'message_tree_id'" in _bad(tmp_path, {"prompt": {}})
    assert "field 'prompt'" in _bad(tmp_path, {"message_tree_id": "t"})
    e = _bad(tmp_path, _tree(role="user"))
    assert "message m1" in e and "field 'role'" in e and "'prompter' or 'assistant'" in e
    assert "field 'role'" in _bad(tmp_path, _tree(role="assistant"))
    assert "field 'text'" in _bad(tmp_path, _tree(text=None))
    assert "field 'rank'" in _bad(tmp_path, _tree(rank="first"))
    assert "field 'deleted'" in _bad(tmp_path, _tree(deleted="no"))
    assert "field 'emojis'" in _bad(tmp_path, _tree(emojis={"+1": -2}))
    assert "field 'labels'" in _bad(tmp_path, _tree(labels={"q": 0.5}))
    reply = {"message_id": "m2", "role": "assistant", "text": "x", "parent_id": "other"}
    e = _bad(tmp_path, _tree(replies=[reply]))
    assert "message m2" in e and "field 'parent_id'" in e
    reply = {"message_id": "m2", "role": "prompter", "text": "x"}
    assert "roles alternate" in _bad(tmp_path, _tree(replies=[reply]))
    dup = {"message_id": "m1", "role": "assistant", "text": "x"}
    assert "duplicate message_id" in _bad(tmp_path, _tree(replies=[dup]))
    assert "earlier tree" in _bad(tmp_path, _tree(message_id="g"))


def test_missing_file_and_binary_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_trees(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="UTF-8"):
        read_trees(tmp_path / "bin.jsonl")


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def broken():
        yield hand_tree()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_trees(broken(), path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_text_in_and_out_for_uploads(tmp_path):
    from homellm.data.oasst import dumps_trees, parse_trees
    trees = [hand_tree()]
    text = dumps_trees(trees)
    write_trees(trees, tmp_path / "t.jsonl")
    assert (tmp_path / "t.jsonl").read_text() == text
    assert parse_trees(text.splitlines(), "upload.jsonl") == trees
    with pytest.raises(ValueError, match=r"^upload.jsonl:2: not JSON"):
        parse_trees(text.splitlines() + ["{oops"], "upload.jsonl")
