"""Hostile and broken data files (issue 14 item 9, the reliability review's L2 cases): a
conversation tree thousands deep, lone UTF-16 surrogates, deep junk, deep metadata. Each
either works or is a clear error naming the file and line, with nothing half-imported."""
from __future__ import annotations

import json
import random

import pytest

from homellm.cli.main import main
from homellm.data import deep_json
from homellm.data.conversations import read as read_training
from homellm.data.oasst import TreeFileError, parse_trees, read_trees, sft_examples, tree_to_dict
from homellm.errors import HomellmError
from homellm.store import open_store

DEPTH = 2000  # messages in one chain: JSON nests 4,000 levels (a message, its replies list)


def chain_line(depth: int = DEPTH, tree_id: str = "deep") -> str:
    """One oasst tree, a conversation `depth` messages long, written without recursion."""
    text = ""
    for i in reversed(range(depth)):
        role = "prompter" if i % 2 == 0 else "assistant"
        replies = f"[{text}]" if text else "[]"
        text = (f'{{"message_id": "{tree_id}-{i}", "role": "{role}", "text": "turn {i}", '
                f'"replies": {replies}}}')
    return f'{{"message_tree_id": "{tree_id}", "prompt": {text}}}'


def run(capsys, *argv):
    code = main(list(argv))
    _, err = capsys.readouterr()
    return code, err


def n_conversations(url) -> int:
    with open_store(url) as s:
        return len(s.list_conversations(s.local_user(), limit=10**6))


def test_a_tree_2000_deep_imports_exports_and_trains(tmp_path, capsys):
    line = chain_line()
    with pytest.raises(RecursionError):  # what the import used to meet
        json.loads(line)
    src = tmp_path / "deep.jsonl"
    src.write_text(line + "\n")
    url = f"sqlite:///{tmp_path}/app.db"
    code, err = run(capsys, "data", "import-trees", str(src), "--db", url)
    assert code == 0 and "1 conversations (1 trees)" in err, err
    out = tmp_path / "again.jsonl"
    code, err = run(capsys, "data", "export-trees", str(out), "--db", url)
    assert code == 0, err
    (tree,) = read_trees(out)
    chain = tree.messages()
    assert [m.text for m in chain] == [f"turn {i}" for i in range(DEPTH)]
    assert all(len(m.replies) == (m is not chain[-1]) for m in chain)
    # SFT: the whole chain is one example; the SFT reader takes the tree line as it is
    (example,) = sft_examples(read_trees(src)[0])
    assert [m["content"] for m in example["messages"]] == [f"turn {i}" for i in range(DEPTH)]
    data = read_training(src, "sft")
    assert data.records == [example] and not data.problems
    sft = tmp_path / "sft.jsonl"
    code, err = run(capsys, "data", "export", "--trees", str(src), "--sft", str(sft))
    assert code == 0 and json.loads(sft.read_text()) == example, err


def test_lone_surrogate_is_an_error_naming_file_line_message_and_field(tmp_path, capsys):
    good = chain_line(2, "ok")
    bad = json.dumps({"message_tree_id": "s", "prompt": {
        "message_id": "s1", "role": "prompter", "text": "fine", "replies": [
            {"message_id": "s2", "role": "assistant", "text": "broken \ud800 here"}]}})
    assert "\\ud800" in bad
    src = tmp_path / "surrogate.jsonl"
    src.write_text(good + "\n" + bad + "\n")
    url = f"sqlite:///{tmp_path}/app.db"
    code, err = run(capsys, "data", "import-trees", str(src), "--db", url)
    assert code == 1 and err.startswith(f"error: {src}:2: message s2: field 'text': "), err
    assert "lone UTF-16 surrogate (\\ud800)" in err and "unexpected" not in err
    assert n_conversations(url) == 0  # all or nothing: not even the good first line
    # valid surrogate pairs (an emoji escaped as \ud83d\ude00) are Unicode and import fine
    src.write_text(json.dumps({"message_tree_id": "e", "prompt": {
        "message_id": "e1", "role": "prompter", "text": "smile \U0001F600"}}) + "\n")
    assert "\\ud83d\\ude00" in src.read_text()
    code, err = run(capsys, "data", "import-trees", str(src), "--db", url)
    assert code == 0 and n_conversations(url) == 1, err


def test_reader_errors_are_homellm_errors_for_the_web_import():
    cases = [
        ('{"message_tree_id": "t", "prompt": {"message_id": "a", "role": "prompter", '
         '"text": "\\udc00"}}', "upload.jsonl:1: message a: field 'text': a lone UTF-16 surrogate"),
        ("[" * 100_000, "upload.jsonl:1: not JSON: Expecting value"),
        ('{"message_tree_id": "t", "prompt": {"message_id": "a", "role": "prompter", "text": "x", '
         '"meta": ' + "[" * 5000 + "]" * 5000 + "}}",
         "upload.jsonl:1: tree: prompt message a: field 'meta': nested more than 64 levels deep"),
        ('{"message_tree_id": "t", "extra": ' + '{"a": ' * 3000 + "1" + "}" * 3000 +
         ', "prompt": {"message_id": "a", "role": "prompter", "text": "x"}}',
         "upload.jsonl:1: tree: field 'extra': nested more than 64 levels deep"),
    ]
    for line, message in cases:
        with pytest.raises(TreeFileError) as e:
            parse_trees([line], "upload.jsonl")
        assert isinstance(e.value, HomellmError) and isinstance(e.value, ValueError)
        assert str(e.value).startswith(message), str(e.value)
        assert len(str(e.value)) < 300


def test_sft_and_dpo_files_with_a_lone_surrogate_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(ok) + "\n" + '{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b\\ud800"}]}\n' + json.dumps(ok) + "\n")
    data = read_training(path, "sft")
    assert len(data.records) == 2
    assert data.problems == [f"{path}:2: field 'messages[1].content': a lone UTF-16 surrogate "
                             "(\\ud800) is not valid Unicode text"]
    path.write_text('{"prompt": "\\udfff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(HomellmError, match=r"sft\.jsonl:1: field 'prompt': a lone UTF-16"):
        read_training(path, "dpo")


def test_web_import_of_deep_and_surrogate_files(tmp_path, default_gguf):
    from test_web_api import LiveServer
    server = LiveServer(tmp_path / "web.db", default_gguf)
    c = server.client()
    try:
        r = c.post("/api/import", content=(chain_line() + "\n").encode(),
                   headers={"X-Filename": "deep.jsonl"})
        assert r.status_code == 201 and r.json()["imported"] == 1, r.text
        bad = ('{"message_tree_id": "t", "prompt": {"message_id": "a", "role": "prompter", '
               '"text": "\\ud800"}}\n')
        r = c.post("/api/import", content=bad.encode(), headers={"X-Filename": "bad.jsonl"})
        assert r.status_code == 400 and "bad.jsonl:1: message a: field 'text': a lone UTF-16 " \
            "surrogate" in r.json()["error"]["message"], r.text
        assert len(c.get("/api/conversations").json()["conversations"]) == 1
    finally:
        c.close()
        server.close()


# ------------------------------------------------------------------ deep_json against json

def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 6 or r < 0.3:
        return rng.choice([0, -7, 3.25, 1e300, -0.0, 10**30, "é\"\\\n\u2028", "", True, False,
                           None, float("nan"), float("inf"), float("-inf")])
    if r < 0.65:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"{rng.choice('aü')}{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_deep_json_matches_json_where_json_works():
    rng = random.Random(0)
    for _ in range(2000):
        value = random_value(rng)
        text = json.dumps(value, ensure_ascii=False)
        assert deep_json._dumps_iteratively(value, {"ensure_ascii": False}) == text
        for form in (text, json.dumps(value, indent=1), json.dumps(value, separators=(",", ":"))):
            assert json.dumps(deep_json._loads_iteratively(form)) == json.dumps(json.loads(form))
    for bad in ["", "{", "[1,]", '{"a" 1}', '{"a":1,}', "[1 2]", "{1:2}", '"abc', "[1] x", "tru",
                '{"a":1}}', "[", "-", "01", '["\x01"]']:
        with pytest.raises(json.JSONDecodeError) as want:
            json.loads(bad)
        with pytest.raises(json.JSONDecodeError) as got:
            deep_json._loads_iteratively(bad)
        assert (got.value.msg, got.value.pos) == (want.value.msg, want.value.pos), bad


def test_deep_json_round_trips_what_json_cannot():
    value = {"end": [1, "x"]}
    for i in range(5000):
        value = {"level": i, "replies": [value, None]} if i % 2 else [value, {}]
    text = deep_json.dumps(value)
    assert deep_json.dumps(deep_json.loads(text)) == text
    assert text.startswith('{"level": 4999, "replies": [[{"level": 4997') and text.count("[") == 5001


def test_tree_text_round_trip_is_exact_at_depth():
    (tree,) = parse_trees([chain_line(DEPTH)])
    text = deep_json.dumps(tree_to_dict(tree))
    assert deep_json.dumps(tree_to_dict(parse_trees([text])[0])) == text
    chain = tree.messages()
    assert [m.parent_id for m in chain] == [None] + [m.message_id for m in chain[:-1]]


# ------------------------------------------------------------------ broken training files

GOOD_SFT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
GOOD_DPO = json.dumps({"prompt": "hi", "chosen": "yo", "rejected": "no"})
BROKEN = {  # a line -> words its problem must contain (after "FILE:2: ")
    "null": "expected a JSON object, got NoneType",
    "[]": "expected a JSON object, got list",
    '"text"': "expected a JSON object, got str",
    "1e999": "expected a JSON object, got float",
    "{": "not JSON",
    "[" * 100_000: "not JSON: Expecting value",
    '{"a": ' * 5_000 + "1" + "}" * 5_000: "unknown record",
    '{"messages": "x"}': "field 'messages': expected a non-empty list",
    '{"messages": [1]}': "field 'messages' message 0: expected an object",
    '{"messages": [{"role": "user", "content": {"a": 1}}]}': "'content' must be a string",
    '{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}':
        "field 'messages[0].content': a lone UTF-16 surrogate",
    '{"conversations": [{"from": "alien", "value": "x"}]}': "'from' must be one of",
    '{"prompt": 1, "response": 2}': "expected two strings",
    '{"message_tree_id": "t", "prompt": {"message_id": "a", "role": "assistant", "text": "x"}}':
        "field 'role': expected 'prompter'",
}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_every_broken_training_line_is_named_by_file_and_line(tmp_path, kind):
    good = GOOD_SFT if kind == "sft" else GOOD_DPO
    for i, (line, words) in enumerate(BROKEN.items()):
        path = tmp_path / f"{kind}{i}.jsonl"
        path.write_text(good + "\n" + line + "\n" + good + "\n")
        data = read_training(path, kind)
        assert len(data.records) == 2 and len(data.problems) == 1, (line[:60], data.problems)
        problem = data.problems[0]
        assert problem.startswith(f"{path}:2: ") and len(problem) < 400, problem
        if kind == "sft":  # (DPO reads prompt/chosen/rejected, and says so in other words)
            assert words in problem, (words, problem)
    # a file of nothing but broken lines is one DataError that lists them
    path = tmp_path / "all_bad.jsonl"
    path.write_text("\n".join(list(BROKEN)[:6]) + "\n")
    with pytest.raises(HomellmError, match=r"6 of 6 records are malformed") as e:
        read_training(path, kind)
    assert f"{path}:1: " in str(e.value) and f"{path}:5: " in str(e.value)
