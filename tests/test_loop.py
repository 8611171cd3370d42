"""`homellm loop` end to end: feedback given through the web app's API on a live server (two
replies to each question, one thumbed up and one down), a DPO round (data, tune, merge, the
judge, the reward-free eval), both versions served side by side (OpenAI API and the arena),
arena votes promoting the winner, the history listing the round, and the next round leaving out
the pairs the first one used. A PPO round on a store filled through the Python API.

The models are a random tiny Llama on a tokenizer trained here (tests/rl_fixtures.py); the judge
is the small OpenAI-compatible server of test_eval_judge.py, preferring the longer answer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rl_fixtures import PROMPTS, tiny_model, tiny_tokenizer  # noqa: E402
from test_eval_judge import JudgeServer, longer  # noqa: E402
from test_serve import LiveServer  # noqa: E402
from test_web_api import Client, sse  # noqa: E402


class Server:
    """create_app + the web app over `models` ({id: path}) on a free port, in a thread."""

    def __init__(self, db: Path, models: dict):
        from homellm.serve import ModelRegistry, ServeConfig, create_app
        from homellm.serve.web import web_router
        from homellm.store import open_store
        self.store = open_store(db)
        registry = ModelRegistry(models, ServeConfig(ctx=256, max_batch=2, prefix_cache_bytes=0,
                                                     keep_alive_s=-1, threads=1))
        self.app = create_app(registry, extra_routers=[web_router(self.store)])
        self.live = LiveServer(self.app, served=True)
        self.url = self.live.url

    def close(self):
        self.live.close()
        self.store.close()


def cli(capsys, *args) -> tuple[int, str, str]:
    from homellm.cli.main import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def base(tmp_path, homellm_home):
    """The tiny model in the catalog as `tinybase`."""
    from homellm.catalog import pull
    tok = tiny_tokenizer(tmp_path / "tok")
    pull(str(tiny_model(tmp_path / "tiny", tok)), name="tinybase")
    return "tinybase"


def give_feedback(url: str, prompts: list[str]) -> int:
    """Through the web app's API: each question answered twice (a regeneration), the first reply
    thumbed up with a comment, the second down. Returns how many make a pair: two replies with
    text that differ (an empty reply, sampled at temperature 1, makes none)."""
    differ = 0
    c = Client(url)
    try:
        for p in prompts:
            r = c.post("/api/conversations", json={"sampling": {"max_tokens": 8, "temperature": 1.0, "top_k": 0,
                                                                  "top_p": 1.0, "min_p": 0.0}})
            assert r.status_code == 201, r.text
            cid = r.json()["conversation"]["id"]
            r = c.post(f"/api/conversations/{cid}/messages", json={"content": p, "parent_id": None})
            q = r.json()["message"]["id"]
            replies = []
            for _ in range(2):
                r = c.post(f"/api/conversations/{cid}/generate", json={"parent_id": q})
                assert r.status_code == 200, r.text
                replies.append(sse(r)[-1][1]["message"])
            for reply, value in zip(replies, (1, -1)):
                r = c.put(f"/api/messages/{reply['id']}/rating",
                          json={"value": value, "comment": "good" if value > 0 else None})
                assert r.status_code == 200, r.text
            a, b = (r["content"].strip() for r in replies)
            differ += bool(a and b and a != b)
    finally:
        c.close()
    return differ


def battle(c: Client, store, prompt: str, prefer: str) -> None:
    """One arena battle through the web API, voted for the side that `prefer` answered."""
    from homellm.store.arena import Battles
    r = c.post("/api/arena/battles", json={"prompt": prompt, "max_tokens": 8, "temperature": 2.0})
    assert r.status_code == 200, r.text
    events = sse(r)
    assert events[0][0] == "start" and events[-1][0] == "done", events
    bid = events[0][1]["battle"]["id"]
    b = Battles(store.db).get(store.local_user(), bid)
    side = "a" if b.model_a == prefer else "b"
    r = c.post(f"/api/arena/battles/{bid}/vote", json={"vote": side})
    assert r.status_code == 200, r.text


MORE_PROMPTS = [f"Say one word about {t}." for t in ("bread", "rain", "a cat", "music", "the moon", "a tree")]


def arena_votes(store) -> int:
    from homellm.store.arena import Battles
    return len(Battles(store.db).voted(store.local_user()))


def arena_pairs(store) -> int:
    """Voted battles whose two replies both finished with text, and differ (as a pair's checks ask)."""
    from homellm.data.arena import dpo_pairs
    from homellm.store.arena import Battles
    voted = Battles(store.db).voted(store.local_user())
    texts = [(p["chosen"][0]["content"].strip(), p["rejected"][0]["content"].strip()) for p in dpo_pairs(voted)]
    return sum(bool(a and b and a != b) for a, b in texts)


@pytest.mark.slow
def test_the_loop_from_web_feedback_to_a_promoted_version(base, tmp_path, homellm_home, capsys):
    from homellm.catalog.library import find
    db = tmp_path / "web.db"
    # 1. people use the web app: two replies a question, one thumbed up
    server = Server(db, {base: find(base).path})
    try:
        differ = give_feedback(server.url, PROMPTS[:12])
    finally:
        server.close()
    assert differ >= 8

    # 2. one round: data, DPO, merge, the judge
    with JudgeServer(longer) as judge:
        code, _, err = cli(capsys, "loop", "-m", "tinybot", "--base", base, "--db", db, "--steps", "6",
                           "--threads", "1", "--device", "cpu", "--max-length", "64",
                           "--answer-tokens", "8", "--judge", judge.url)
        assert code == 0, err
        assert judge.prompts  # the judge was asked
    assert "data: " in err and "tune (dpo): 6 steps" in err and "merge: tinybot:v1 registered" in err
    assert "eval: judge: tinybot:v1 wins" in err and "homellm loop serve -m tinybot" in err
    entry = find("tinybot:v1")
    assert entry is not None and entry.source["kind"] == "merge"
    rounds = homellm_home / "loop" / "tinybot" / "rounds"
    r1 = json.loads((rounds / "0001" / "round.json").read_text())
    assert r1["status"] == "evaluated" and r1["from"]["model"] == base and r1["to"]["model"] == "tinybot:v1"
    d = r1["steps"]["data"]
    assert d["pairs"] + d["val_pairs"] == differ and d["pairs_by_source"] == {"chat": differ}
    assert d["counts"]["thumbs_up"] == 12 and d["counts"]["thumbs_down"] == 12
    assert d["counts"]["comments"] == 12 and d["counts"]["conversations"] == 12
    for name in ("pairs.jsonl", "val_pairs.jsonl", "prompts.jsonl", "questions.jsonl", "stats.json"):
        assert (rounds / "0001" / "data" / name).is_file(), name
    assert (rounds / "0001" / "tune" / "adapter_model.safetensors").is_file()
    assert json.loads((rounds / "0001" / "tune" / "training_config.json").read_text())["method"] == "dpo"
    j = r1["steps"]["eval"]["judge"]
    assert j["questions"] == d["questions"] > 0 and j["runs"] and 0 <= j["win_rate"] <= 1
    from homellm.eval.results import load_runs
    assert {r.id for r in load_runs("judge")} >= set(j["runs"])  # kept as eval runs

    # 3. both versions served side by side; the arena between them
    server = Server(db, {base: find(base).path, "tinybot:v1": entry.path})
    try:
        import httpx
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert {m["id"] for m in models} == {base, "tinybot:v1"}
        for m in (base, "tinybot:v1"):
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == m, r.text
        c = Client(server.url)
        for p in PROMPTS[12:16]:
            battle(c, server.store, p, prefer="tinybot:v1")
        # a sampled reply of 8 tokens can be blank (no pair): battle on until one pair is made
        for p in MORE_PROMPTS:
            if arena_pairs(server.store):
                break
            battle(c, server.store, p, prefer="tinybot:v1")
        c.close()
        votes = arena_votes(server.store)
    finally:
        server.close()

    # 4. promotion: the arena's votes decide
    code, _, err = cli(capsys, "loop", "--promote", "-m", "tinybot", "--db", db, "--min-votes", "3")
    assert code == 0, err
    assert "promoted v1" in err and f"arena: {votes} votes for tinybot:v1" in err
    latest = find("tinybot:latest")
    assert latest is not None and latest.source == {"kind": "promote", "from": "tinybot:v1"}
    weights = next(latest.folder.glob("*.safetensors"))
    assert weights.stat().st_ino == next(entry.folder.glob("*.safetensors")).stat().st_ino  # a hard link

    # 5. the history lists the round, its data, training, evals and promotion
    code, out, err = cli(capsys, "loop", "history", "-m", "tinybot", "--json")
    h = json.loads(out)["tinybot"]
    assert h["default"] == 1 and [v["model"] for v in h["versions"]] == [base, "tinybot:v1"]
    (row,) = h["rounds"]
    assert row["round"] == 1 and row["method"] == "dpo" and row["pairs"] == d["pairs"]
    assert row["judge"]["win_rate"] == j["win_rate"] and row["promoted"]["winner"] == "tinybot:v1"
    code, out, _ = cli(capsys, "loop", "history")
    assert "round 1" in out and "tinybot:v1" in out and "promoted tinybot:v1" in out

    # 6. the next round takes what people said since: the arena votes, not round 1's pairs
    code, _, err = cli(capsys, "loop", "data", "-m", "tinybot", "--db", db)
    assert code == 0, err
    r2 = json.loads((rounds / "0002" / "round.json").read_text())
    assert r2["from"]["model"] == "tinybot:v1" and r2["to"]["model"] == "tinybot:v2"
    d2 = r2["steps"]["data"]
    from homellm.store import open_store
    store = open_store(db)
    voted, made = arena_votes(store), arena_pairs(store)
    store.close()
    assert voted == votes and made >= 1
    assert d2["pairs_used_before"] == differ and d2["pairs_by_source"] == {"arena": made}
    code, _, err = cli(capsys, "loop", "merge", "-m", "tinybot", "--db", db)
    assert code == 1 and "run `homellm loop tune -m tinybot` first" in err


def test_a_ppo_round_and_clear_errors(base, tmp_path, homellm_home, capsys):
    from homellm.store import open_store
    db = tmp_path / "api.db"
    # no feedback yet: a clear error, nothing registered
    open_store(db).close()
    code, _, err = cli(capsys, "loop", "-m", "tinybot", "--base", base, "--db", db)
    assert code == 1 and "no preference pairs" in err and "arena" in err and "Traceback" not in err
    code, _, err = cli(capsys, "loop", "history", "-m", "nobody")
    assert code == 1 and "no loop named nobody" in err
    store = open_store(db)
    me = store.local_user()
    for p in PROMPTS[:10]:
        conv = store.create_conversation(me, title=p, model=base)
        q = store.add_message(me, conv.id, "user", p, parent_id=None)
        for k, text in enumerate(("thanks, " + p.lower(), "no.")):
            with store.start_reply(me, conv.id, q.id, model=base, seed=k) as w:
                w.append(text)
                w.finish(finish_reason="stop", prompt_tokens=5, completion_tokens=3)
        up, down = [m for m in store.messages(me, conv.id) if m.role == "assistant"]
        store.rate(me, up.id, 1)
        store.rate(me, down.id, -1)
    # a volunteer-ranked tree, ready for export (Open Assistant's collection)
    from homellm.data.oasst import tree_from_dict
    from homellm.data.oasst_collect import import_collect
    tree = tree_from_dict({"message_tree_id": "p1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p1", "role": "prompter", "text": "Name a bird.", "review_result": True,
        "replies": [
            {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "No.", "rank": 1,
             "review_result": True},
            {"message_id": "a0", "parent_id": "p1", "role": "assistant", "text": "A sea bird, thanks.",
             "rank": 0, "review_result": True}]}})
    import_collect(store.db, [tree])
    store.close()
    code, _, err = cli(capsys, "loop", "-m", "tinybot", "--db", db, "--method", "ppo", "--steps", "2",
                       "--rm-steps", "4", "--max-new-tokens", "6", "--threads", "1", "--device", "cpu",
                       "--max-length", "64", "--answer-tokens", "6")
    assert code == 0, err
    assert "reward model on" in err and "tune (ppo): 2 steps" in err and "eval: reward model: tinybot:v1 wins" in err
    r1 = json.loads((homellm_home / "loop" / "tinybot" / "rounds" / "0001" / "round.json").read_text())
    t, e = r1["steps"]["tune"], r1["steps"]["eval"]
    assert r1["steps"]["data"]["pairs_by_source"] == {"chat": 10, "volunteers": 1}
    pairs = [json.loads(x) for f in ("pairs.jsonl", "val_pairs.jsonl")
             for x in (homellm_home / "loop" / "tinybot" / "rounds" / "0001" / "data" / f).read_text().splitlines()]
    assert {"prompt": [{"role": "user", "content": "Name a bird."}],
            "chosen": [{"role": "assistant", "content": "A sea bird, thanks."}],
            "rejected": [{"role": "assistant", "content": "No."}]} in pairs
    assert t["reward_model"]["folder"].endswith("rm") and t["config"]["method"] == "ppo"
    assert e["reward"]["questions"] > 0 and 0 <= e["reward"]["win_rate"] <= 1
    # no new feedback: the next round says so
    code, _, err = cli(capsys, "loop", "-m", "tinybot", "--db", db)
    assert code == 1 and "no new preference pairs since round 1" in err and "--all" in err
    # promote a version by hand
    code, _, err = cli(capsys, "loop", "promote", "v0", "-m", "tinybot")
    assert code == 0 and "promoted v0" in err
    code, _, err = cli(capsys, "loop", "--promote", "v7", "-m", "tinybot")
    assert code == 1 and "no version v7" in err
