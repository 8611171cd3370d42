"""`homellm data export / export-trees / import-trees` on real databases and files."""
import json
import subprocess
import sys

import pytest

from homellm.cli.main import main
from homellm.store import open_store

from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)
from test_store import A, FAST, SYS, U, build_rated_conversation


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = f"sqlite:///{tmp_path}/app.db" if request.param == "sqlite" else \
        request.getfixturevalue("pg_url")
    with open_store(url, auth=FAST) as s:
        build_rated_conversation(s, s.local_user())
    return url


SFT = [{"messages": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")]},
       {"messages": [SYS, U("What is 2+2?"), A("4"), U("Why?"), A("Because.")]}]
DPO = [{"prompt": [SYS, U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]},
       {"prompt": [SYS, U("What is 2+2?"), A("4"), U("And 3+3?")],
        "chosen": [A("6")], "rejected": [A("7")]}]


def test_export_sft_and_dpo(db, tmp_path, capsys):
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    code, out, err = run(capsys, "data", "export", "--sft", str(sft), "--dpo", str(dpo),
                         "--db", db)
    assert code == 0, err
    assert lines(sft) == SFT and lines(dpo) == DPO
    assert "2 SFT examples" in err and "2 DPO pairs" in err and "trees/s" in err


def test_trees_out_in_out(db, tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    assert run(capsys, "data", "export-trees", str(first), "--db", db)[0] == 0
    other = f"sqlite:///{tmp_path}/other.db"
    code, out, err = run(capsys, "data", "import-trees", str(first), "--db", other)
    assert code == 0 and "1 conversations (2 trees)" in err, err
    assert run(capsys, "data", "export-trees", str(second), "--db", other)[0] == 0
    import gzip
    a = lines(first)
    b = [json.loads(x) for x in gzip.open(second, "rt").read().splitlines()]
    for t in a + b:
        t["homellm"].pop("conversation_id")
    assert a == b and len(a) == 2
    # one conversation by id; SFT/DPO from the trees file equal those from the database
    cid = json.loads(first.read_text().splitlines()[0])["homellm"]["conversation_id"]
    only = tmp_path / "one.jsonl"
    assert run(capsys, "data", "export-trees", str(only), "--db", db, "--conversation", cid)[0] == 0
    assert len(lines(only)) == 2
    sft = tmp_path / "sft.jsonl"
    assert run(capsys, "data", "export", "--trees", str(first), "--sft", str(sft))[0] == 0
    assert lines(sft) == SFT


def test_shared_feedback_export_needs_admin(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/app.db"
    with open_store(url, auth=FAST) as s:
        alice = s.create_user("alice", share_feedback=True)
        build_rated_conversation(s, alice)
        s.create_user("bob")
    out = tmp_path / "dpo.jsonl"
    code, _, err = run(capsys, "data", "export", "--dpo", str(out), "--db", url, "--shared",
                       "--user", "bob")
    assert code == 1 and "admin" in err and not out.exists()
    # the local user is the admin of a single-user install
    assert run(capsys, "data", "export", "--dpo", str(out), "--db", url, "--shared")[0] == 0
    assert lines(out) == DPO
    assert run(capsys, "data", "export", "--dpo", str(out), "--db", url)[0] == 0
    assert lines(out) == []  # the local user has no conversations of their own


def test_errors(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/app.db"
    with open_store(url, auth=FAST) as s:
        build_rated_conversation(s, s.local_user())
    out = tmp_path / "x.jsonl"
    cases = [
        (["export", "--sft", str(out), "--db", "mysql://h/db"], "unknown scheme 'mysql'"),
        (["export", "--sft", str(out), "--db", str(tmp_path / "none.db")], "no database at"),
        (["export", "--db", url], "nothing to write"),
        (["export", "--sft", str(tmp_path / "no" / "dir" / "x.jsonl"), "--db", url],
         "cannot write"),
        (["export", "--sft", str(tmp_path), "--db", url], "cannot write"),
        (["export", "--sft", str(out), "--db", url, "--user", "ghost"], "no user 'ghost'"),
        (["export-trees", str(out), "--db", url, "--conversation", "nope"], "no conversation nope"),
        (["export-trees", str(tmp_path / "no" / "t.jsonl"), "--db", url], "cannot write"),
        (["export-trees", str(tmp_path), "--db", url], "it is a folder"),
        (["import-trees", str(tmp_path / "missing.jsonl"), "--db", url], "cannot read"),
        (["export", "--sft", str(out), "--db", "postgresql://u:pw@/db?host=/nonexistent"],
         "cannot connect"),
    ]
    for argv, message in cases:
        code, stdout, err = run(capsys, "data", *argv)
        assert code == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err and "pw@" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    # a malformed import names the file and line, and imports nothing (not even good lines)
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"message_tree_id": "g1", "prompt": {"message_id": "g1", "role":
                                                          "prompter", "text": "fine"}})
    bad.write_text(good + "\n" + '{"message_tree_id": "b", "prompt": {"message_id": "b", '
                   '"role": "user", "text": "x"}}\n')
    code, _, err = run(capsys, "data", "import-trees", str(bad), "--db", url)
    assert code == 1 and f"{bad}:2: " in err and "field 'role'" in err
    with open_store(url, auth=FAST) as s:
        assert len(s.list_conversations(s.local_user())) == 1


def test_default_database(homellm_home, tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    code, _, err = run(capsys, "data", "export", "--sft", str(out))
    assert code == 1 and f"no database at {homellm_home / 'homellm.db'}" in err
    assert not (homellm_home / "homellm.db").exists()
    trees = tmp_path / "t.jsonl"
    trees.write_text(json.dumps({"message_tree_id": "q", "prompt": {
        "message_id": "q", "role": "prompter", "text": "Hi", "replies": [
            {"message_id": "r", "role": "assistant", "text": "Hello!"}]}}) + "\n")
    assert run(capsys, "data", "import-trees", str(trees))[0] == 0  # creates the database
    assert run(capsys, "data", "export", "--sft", str(out))[0] == 0
    assert lines(out) == [{"messages": [U("Hi"), A("Hello!")]}]


def test_command_line_entry(tmp_path):
    """The installed command: exit status and the error line, from a real process."""
    (tmp_path / "x.jsonl").write_text("")
    p = subprocess.run([sys.executable, "-m", "homellm", "data", "import-trees",
                        str(tmp_path / "x.jsonl"), "--db", "ftp://x"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("error: database URL 'ftp://x'")
