"""The arena (issue 12, item 4): blind battles between two served models, one vote each, the
Bradley-Terry leaderboard and the votes' exports.

- The rating fit against references: the two-model closed form, Hunter's MM algorithm
  written out here, strengths recovered from synthetic votes, ties as half wins, and its
  bootstrap against eval/stats.py's resampling of battles.
- The store on SQLite and PostgreSQL: one vote per battle (also when votes race), a battle
  only its user sees, and `homellm data export --dpo` taking the A/B votes.
- A real server on 127.0.0.1 with two models (the default model and a tiny random GGUF),
  --auth and two accounts, on SQLite and PostgreSQL: battles streamed, names in no arena
  response or page before the vote and shown after it, a second vote 409, the other user's
  battle 404, the leaderboard following the votes, the exports; in headless Chromium too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pg_server import new_database, pg_server, pg_url  # noqa: F401  (fixtures)
from test_serve import LiveServer
from test_web_api import Client, sse

from homellm.eval.bradley_terry import leaderboard, ratings
from homellm.store import AuthConfig, open_store
from homellm.store.arena import AlreadyVoted, Battles, StillRunning

FAST = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8192, argon2_parallelism=1)
RIVAL = "zz-rival:q8"          # the second served model's id (distinctive: easy to search for)
MAX = 6                         # tokens per reply


def elo_diff(score: float, n: float) -> float:
    """The Bradley-Terry MLE of R_A - R_B for two models: A scored `score` of n (ties 1/2)."""
    return 400 * math.log10(score / (n - score))


# ---------------------------------------------------------------- the rating fit

def test_two_models_match_the_closed_form():
    votes = [("x", "y", "a")] * 6 + [("y", "x", "b")] * 3 + [("x", "y", "b")] * 2 + \
        [("x", "y", "tie")] * 2 + [("y", "x", "both_bad")]
    r = ratings(votes)
    # x scored 9 wins + 3 ties * 1/2 of 14 battles
    assert r["x"] - r["y"] == pytest.approx(elo_diff(10.5, 14), abs=1e-3)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000, abs=1e-9)
    board = leaderboard(votes, n_boot=200)
    x, y = board["models"]
    assert (x["model"], x["rank"], y["model"], y["rank"]) == ("x", 1, "y", 2)
    assert (x["votes"], x["wins"], x["ties"], x["losses"], x["both_bad"]) == (14, 9, 3, 2, 1)
    assert (y["votes"], y["wins"], y["ties"], y["losses"]) == (14, 2, 3, 9)
    assert x["unbounded"] is None and board["battles"] == 14
    assert x["ci"][0] < x["rating"] < x["ci"][1]


def test_ties_and_both_bad_count_half_a_win_each_way():
    tie = ratings([("p", "q", "tie")] + [("p", "q", "a")] * 3 + [("q", "p", "a")])
    split = ratings([("p", "q", "a"), ("q", "p", "a")] + [("p", "q", "a")] * 3 +
                    [("q", "p", "a")])
    bad = ratings([("q", "p", "both_bad")] + [("p", "q", "a")] * 3 + [("q", "p", "a")])
    # a tie is worth half of a (win, loss) pair: the same MLE as 2 ties = 1 win + 1 loss
    two_ties = ratings([("p", "q", "tie")] * 2 + [("p", "q", "a")] * 3 + [("q", "p", "a")])
    assert two_ties["p"] == pytest.approx(split["p"], abs=1e-6)
    assert tie["p"] == pytest.approx(bad["p"], abs=1e-9)
    assert tie["p"] - tie["q"] == pytest.approx(elo_diff(3.5, 5), abs=1e-3)
    assert ratings([("p", "q", "tie")] * 3) == pytest.approx({"p": 1000.0, "q": 1000.0})


def mm_reference(votes, models, iterations=20000):
    """Hunter (2004), "MM algorithms for generalized Bradley-Terry models", eq. (3): pi_i <-
    W_i / sum_j n_ij / (pi_i + pi_j), ties as half a win each way; to the Elo scale."""
    k = len(models)
    idx = {m: i for i, m in enumerate(models)}
    wins, n = np.zeros(k), np.zeros((k, k))
    for a, b, v in votes:
        i, j = idx[a], idx[b]
        n[i, j] += 1
        n[j, i] += 1
        wins[i] += {"a": 1, "b": 0}.get(v, 0.5)
        wins[j] += {"a": 0, "b": 1}.get(v, 0.5)
    pi = np.ones(k)
    for _ in range(iterations):
        pi = wins / (n / (pi[:, None] + pi[None, :])).sum(axis=1)
        pi /= np.exp(np.log(pi).mean())
    beta = np.log(pi)
    return {m: 1000 + 400 / math.log(10) * (beta[idx[m]] - beta.mean()) for m in models}


def synthetic_votes(true: dict, n: int, seed: int, tie_rate: float = 0.0):
    rng = np.random.default_rng(seed)
    names = list(true)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        ma, mb = names[a], names[b]
        p = 1 / (1 + 10 ** ((true[mb] - true[ma]) / 400))
        u = rng.random()
        if u < tie_rate:
            out.append((ma, mb, "tie" if u < tie_rate / 2 else "both_bad"))
        else:
            out.append((ma, mb, "a" if rng.random() < p else "b"))
    return out


def test_newton_fit_equals_hunters_mm_algorithm():
    true = {"m1": 1100.0, "m2": 1050.0, "m3": 980.0, "m4": 870.0}
    votes = synthetic_votes(true, 300, seed=3, tie_rate=0.2)
    ours = ratings(votes)
    reference = mm_reference(votes, sorted(true))
    for m in true:
        assert ours[m] == pytest.approx(reference[m], abs=0.01), m


def test_synthetic_votes_from_known_strengths_recover_them():
    true = {"best": 1250.0, "good": 1120.0, "mid": 1000.0, "weak": 900.0, "worst": 730.0}
    board = leaderboard(synthetic_votes(true, 6000, seed=7), n_boot=300)
    got = {r["model"]: r for r in board["models"]}
    assert [r["model"] for r in board["models"]] == list(true)      # the order
    centre = np.mean(list(true.values()))
    for m, t in true.items():
        assert got[m]["rating"] == pytest.approx(t - centre + 1000, abs=30), m
    covered = sum(got[m]["ci"][0] <= t - centre + 1000 <= got[m]["ci"][1] for m, t in true.items())
    assert covered >= 4
    small = leaderboard(synthetic_votes(true, 600, seed=7), n_boot=300)
    width = {r["model"]: r["ci"][1] - r["ci"][0] for r in small["models"]}
    for m in true:  # ten times the votes: about a third of the width (1/sqrt(10))
        assert got[m]["ci"][1] - got[m]["ci"][0] < 0.5 * width[m], m


def test_bootstrap_matches_resampling_battles_with_eval_stats():
    from homellm.eval.stats import bootstrap_interval
    true = {"u": 1080.0, "v": 1000.0, "w": 920.0}
    votes = synthetic_votes(true, 240, seed=11, tie_rate=0.1)
    ours = {r["model"]: r["ci"] for r in leaderboard(votes, n_boot=1000)["models"]}
    for m in ("u", "w"):  # the reference refits each resample of battles, drawn index by index
        low, high = bootstrap_interval(len(votes), lambda idx: ratings(
            [votes[i] for i in idx])[m], n_boot=300, seed=5)
        width = high - low
        assert ours[m][0] == pytest.approx(low, abs=0.2 * width), m
        assert ours[m][1] == pytest.approx(high, abs=0.2 * width), m
    assert leaderboard(votes, n_boot=50, seed=1) == leaderboard(votes, n_boot=50, seed=1)


def test_a_model_that_never_lost_is_marked_and_bad_votes_are_refused():
    board = leaderboard([("a1", "b1", "a"), ("b1", "a1", "b"), ("b1", "c1", "a")], n_boot=20)
    unbounded = {r["model"]: r["unbounded"] for r in board["models"]}
    assert unbounded == {"a1": "no losses", "b1": None, "c1": "no wins"}
    assert leaderboard([])["models"] == [] and ratings([]) == {}
    with pytest.raises(ValueError, match="vote 'maybe'"):
        ratings([("a1", "b1", "maybe")])
    with pytest.raises(ValueError, match="against itself"):
        ratings([("a1", "a1", "a")])


# ---------------------------------------------------------------- the store

@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "arena.db")
    return request.getfixturevalue("pg_url")


def finished_battle(battles, user, prompt, a_text, b_text, finish=("stop", "stop"),
                    models=("m-one", "m-two")):
    b = battles.create(user, prompt, *models, seeds=(1, 2), sampling={"max_tokens": 8})
    battles.finish(user, b.id, "a", a_text, finish[0], 3)
    battles.finish(user, b.id, "b", b_text, finish[1], 4)
    return b


def test_store_one_vote_per_battle_and_only_its_user(db_url):
    store = open_store(db_url, auth=FAST)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    battles = Battles(store.db)
    b = battles.create(alice, "Hi?", "m-one", "m-two", seeds=(5, 2**63 - 1),
                       sampling={"temperature": 0.7})
    assert (b.vote, b.finish_a, b.seed_b, b.sampling) == (None, None, 2**63 - 1,
                                                          {"temperature": 0.7})
    with pytest.raises(StillRunning):
        battles.vote(alice, b.id, "a")
    assert battles.finish(alice, b.id, "a", "Hello!", "stop", 3)
    assert not battles.finish(bob, b.id, "b", "mine now", "stop", 1)   # not bob's
    with pytest.raises(StillRunning):
        battles.vote(alice, b.id, "a")
    battles.finish(alice, b.id, "b", "Hey.", "length", 8)
    assert battles.get(bob, b.id) is None and battles.vote(bob, b.id, "b") is None
    assert battles.recent(bob) == [] and [x.id for x in battles.recent(alice)] == [b.id]
    # two votes at once (threads, one connection each): exactly one is kept
    results = []

    def try_vote(choice):
        try:
            results.append(battles.vote(alice, b.id, choice).vote)
        except AlreadyVoted:
            results.append("refused")
    threads = [threading.Thread(target=try_vote, args=(v,)) for v in ("a", "b", "tie", "both_bad")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("refused") == 3
    kept = battles.get(alice, b.id)
    assert [kept.vote] == [r for r in results if r != "refused"] and kept.voted_at
    with pytest.raises(AlreadyVoted):
        battles.vote(alice, b.id, "a")
    with pytest.raises(Exception, match="vote 'maybe'"):
        battles.vote(alice, b.id, "maybe")
    assert battles.outcomes() == [("m-one", "m-two", kept.vote)]
    store.close()


def test_dpo_pairs_and_battle_records_of_votes(db_url):
    from homellm.data.arena import battle_records, dpo_pairs
    store = open_store(db_url, auth=FAST)
    me = store.local_user()
    battles = Battles(store.db)
    b1 = finished_battle(battles, me, "Q1", "good one", "bad one")
    b2 = finished_battle(battles, me, "Q2", "meh", "fine", finish=("stop", "length"))
    b3 = finished_battle(battles, me, "Q3", "same", "same too")
    b4 = finished_battle(battles, me, "Q4", "cut sho", "whole", finish=("stopped", "stop"))
    b5 = finished_battle(battles, me, "Q5", "unvoted", "unvoted")
    for b, v in ((b1, "a"), (b2, "b"), (b3, "both_bad"), (b4, "b")):
        battles.vote(me, b.id, v)
    voted = battles.voted(me)
    assert [b.id for b in voted] == [b1.id, b2.id, b3.id, b4.id]
    pair = lambda q, c, r: {"prompt": [{"role": "user", "content": q}],  # noqa: E731
                            "chosen": [{"role": "assistant", "content": c}],
                            "rejected": [{"role": "assistant", "content": r}]}
    # b3: no preference; b4: a stopped reply is no training data; b5: not voted
    assert dpo_pairs(voted) == [pair("Q1", "good one", "bad one"), pair("Q2", "fine", "meh")]
    records = battle_records(voted, {me.id: "local"})
    assert [r["winner"] for r in records] == ["model_a", "model_b", "tie (bothbad)", "model_b"]
    assert records[0]["conversation_b"] == [{"role": "user", "content": "Q1"},
                                            {"role": "assistant", "content": "bad one"}]
    assert records[0]["judge"] == "local" and records[0]["model_a"] == "m-one"
    assert b5.id not in {r["battle_id"] for r in battle_records(battles.recent(me))}
    store.close()


def homellm_cli(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "homellm", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.slow
def test_data_export_dpo_takes_the_arena_votes(db_url, tmp_path):
    store = open_store(db_url, auth=FAST)
    me, alice = store.local_user(), store.create_user("alice")
    battles = Battles(store.db)
    battles.vote(me, finished_battle(battles, me, "Mine?", "yes", "no").id, "a")
    battles.vote(me, finished_battle(battles, me, "Tie?", "x", "y").id, "tie")
    battles.vote(alice, finished_battle(battles, alice, "Alice's", "p", "q").id, "b")
    store.close()
    out, without = tmp_path / "dpo.jsonl", tmp_path / "no-arena.jsonl"
    r = homellm_cli("data", "export", "--dpo", str(out), "--db", db_url, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 DPO pairs (1 from arena votes)" in r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"prompt": [{"role": "user", "content": "Mine?"}],
         "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]}]
    r = homellm_cli("data", "export", "--dpo", str(out), "--db", db_url, "--user", "alice",
                    home=tmp_path)
    assert json.loads(out.read_text())["chosen"][0]["content"] == "q"
    r = homellm_cli("data", "export", "--dpo", str(without), "--db", db_url, "--no-arena",
                    home=tmp_path)
    assert r.returncode == 0 and without.read_text() == ""


# ---------------------------------------------------------------- a live server, two models

class ArenaServer:
    """create_app + web_router on a free port (as test_web_api.LiveServer, with two models):
    the default model and a tiny random GGUF; --auth with alice (admin) and bob."""

    def __init__(self, db_url: str, models: dict):
        from homellm.serve import ModelRegistry, ServeConfig, create_app
        from homellm.serve.web import web_router
        self.store = open_store(db_url, auth=FAST)
        self.store.create_user("alice", "alice-pass-1", is_admin=True)
        self.store.create_user("bob", "bob-pass-12")
        registry = ModelRegistry(models, ServeConfig(ctx=512, max_batch=2, prefix_cache_bytes=0,
                                                     keep_alive_s=-1))
        self.app = create_app(registry, extra_routers=[web_router(self.store, auth=True)])
        self.live = LiveServer(self.app, served=True)
        self.url = self.live.url

    def login(self, username: str, password: str) -> Client:
        c = Client(self.url)
        r = c.post("/api/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        c.csrf = r.json()["csrf_token"]
        return c

    def close(self):
        self.live.close()
        self.store.close()


@pytest.fixture(scope="module")
def rival_gguf(tmp_path_factory) -> Path:
    """A tiny random model with room for a chat turn of byte tokens."""
    from gguf_fixtures import TINY_LLAMA, write_tiny_gguf
    args = dataclasses.replace(TINY_LLAMA, max_position_embeddings=1024)
    return write_tiny_gguf(tmp_path_factory.mktemp("rival") / "rival-model.gguf", args, "q8_0",
                           seed=1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def arena(request, tmp_path_factory, default_gguf, rival_gguf):
    if request.param == "sqlite":
        url = str(tmp_path_factory.mktemp("arena") / "arena.db")
    else:
        url = new_database(request.getfixturevalue("pg_server"))
    s = ArenaServer(url, {"smollm2:135m": default_gguf, RIVAL: rival_gguf})
    s.secrets = ["smollm2:135m", RIVAL, "smollm2", "zz-rival", default_gguf.name,
                 default_gguf.stem, rival_gguf.name, rival_gguf.stem, str(default_gguf)]
    yield s
    s.close()


def assert_blind(text: str, secrets: list[str], what: str):
    low = text.lower()
    for name in secrets:
        assert name.lower() not in low, f"{what} names {name!r}: {text[:500]}"


def run_battle(c: Client, prompt: str) -> tuple[str, list]:
    r = c.post("/api/arena/battles", json={"prompt": prompt, "max_tokens": MAX,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r.text, sse(r)


@pytest.mark.slow
def test_battles_votes_and_the_leaderboard_over_http(arena):
    alice, bob = arena.login("alice", "alice-pass-1"), arena.login("bob", "bob-pass-12")
    seen = []  # every arena response before the vote

    def get(c, path):
        r = c.get(path)
        seen.append((path, r.text))
        return r

    info = get(alice, "/api/arena").json()
    assert info["ready"] is True and info["models"] == 2
    before = Battles(arena.store.db).outcomes()        # votes of this module's other tests
    assert alice.get("/api/arena/leaderboard").json()["battles"] == len(before)
    raw, events = run_battle(alice, "Name three colors.")
    seen.append(("POST /api/arena/battles", raw))
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("side_done") == 2
    bid = events[0][1]["battle"]["id"]
    assert len(bid) == 32 and int(bid, 16) >= 0                      # random, says nothing
    final = events[-1][1]["battle"]
    for side in ("a", "b"):  # the streamed text is what was saved
        streamed = "".join(d["text"] for e, d in events if e == "delta" and d["side"] == side)
        assert final["replies"][side]["text"] == streamed
        assert final["replies"][side]["finish_reason"] in ("stop", "length")
        assert 1 <= final["replies"][side]["completion_tokens"] <= MAX
    assert get(alice, f"/api/arena/battles/{bid}").json() == final
    assert [b["id"] for b in get(alice, "/api/arena/battles").json()["battles"]] == [bid]
    r = alice.post(f"/api/arena/battles/{bid}/stop")                  # already over
    seen.append(("stop", r.text))
    assert r.json() == {"stopped": False, "battle_id": bid}
    # the other user: a 404 on every route of it, exactly as for a missing battle
    for method, path, body in (("GET", f"/api/arena/battles/{bid}", None),
                               ("POST", f"/api/arena/battles/{bid}/vote", {"vote": "b"}),
                               ("POST", f"/api/arena/battles/{bid}/stop", None),
                               ("GET", "/api/arena/battles/0123", None)):
        r = bob.request(method, path, json=body)
        seen.append((path, r.text))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert get(bob, "/api/arena/battles").json()["battles"] == []
    for path, text in seen:
        assert_blind(text, arena.secrets, path)

    # the vote: the answer names the two models; one vote per battle
    r = alice.post(f"/api/arena/battles/{bid}/vote", json={"vote": "a"})
    assert r.status_code == 200, r.text
    models = r.json()["models"]
    assert sorted(models.values()) == sorted(["smollm2:135m", RIVAL])
    assert r.json()["vote"] == "a" and r.json()["voted_at"]
    again = alice.post(f"/api/arena/battles/{bid}/vote", json={"vote": "b"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    assert alice.get(f"/api/arena/battles/{bid}").json()["models"] == models
    bad = alice.post(f"/api/arena/battles/{bid}/vote", json={"vote": "c"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "vote"
    board = alice.get("/api/arena/leaderboard").json()
    assert board["battles"] == len(before) + 1
    assert {r["model"]: r["rating"] for r in board["models"]} == pytest.approx(
        ratings(before + [(models["a"], models["b"], "a")]))
    if not before:
        top, second = board["models"]
        assert (top["model"], second["model"]) == (models["a"], models["b"])
        assert (top["wins"], second["losses"], top["unbounded"]) == (1, 1, "no losses")

    # bob's battle, voted "both bad": the leaderboard follows (a tie: half a win each)
    raw, events = run_battle(bob, "What is 2 + 2?")
    assert_blind(raw, arena.secrets, "bob's battle")
    bob_bid = events[0][1]["battle"]["id"]
    assert alice.get(f"/api/arena/battles/{bob_bid}").status_code == 404
    bob_models = bob.post(f"/api/arena/battles/{bob_bid}/vote",
                          json={"vote": "both_bad"}).json()["models"]
    board = bob.get("/api/arena/leaderboard").json()
    assert board["battles"] == len(before) + 2
    now = before + [(models["a"], models["b"], "a"), (bob_models["a"], bob_models["b"], "both_bad")]
    assert {r["model"]: r["rating"] for r in board["models"]} == pytest.approx(ratings(now))
    bad = sum(v == "both_bad" for _, _, v in now)
    assert {r["model"]: r["both_bad"] for r in board["models"]} == {"smollm2:135m": bad,
                                                                     RIVAL: bad}

    # the exports: alice's vote, as a battle record and as a DPO pair (her battle only)
    saved = alice.get(f"/api/arena/battles/{bid}").json()["replies"]
    r = alice.get("/api/arena/export?format=dpo")
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in r.headers["content-disposition"]
    pairs = [json.loads(x) for x in r.text.splitlines()]
    complete = all(saved[s]["text"].strip() for s in "ab")
    pair = {"prompt": [{"role": "user", "content": "Name three colors."}],
            "chosen": [{"role": "assistant", "content": saved["a"]["text"]}],
            "rejected": [{"role": "assistant", "content": saved["b"]["text"]}]}
    assert pairs.count(pair) == (1 if complete else 0)
    text = alice.get("/api/arena/export").text
    records = [json.loads(x) for x in text.splitlines()]
    mine = [x for x in records if x["battle_id"] == bid]
    assert [(x["winner"], x["model_a"], x["model_b"], x["judge"]) for x in mine] == \
        [("model_a", models["a"], models["b"], "alice")]
    assert all(x["judge"] == "alice" for x in records) and bob_bid not in text
    assert bob.get("/api/arena/export?shared=true").status_code == 403
    shared = alice.get("/api/arena/export?shared=true")   # nobody opted in to share
    assert shared.status_code == 200 and shared.text == ""
    alice.close()
    bob.close()


@pytest.mark.slow
def test_stop_and_a_client_gone_keep_both_replies_as_stopped(arena):
    alice, again = arena.login("alice", "alice-pass-1"), arena.login("alice", "alice-pass-1")
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": 300, "temperature": 1}
    with alice.stream("POST", "/api/arena/battles", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        start = json.loads(next(x for x in lines if x.startswith("data: "))[6:])
        bid = start["battle"]["id"]
        next(x for x in lines if x.startswith("event: delta"))
        assert again.post(f"/api/arena/battles/{bid}/stop").json() == {"stopped": True,
                                                                        "battle_id": bid}
        rest = "\n".join(lines)
    assert_blind(rest, arena.secrets, "a stopped battle")
    done = json.loads(rest.split("event: done\ndata: ")[1].split("\n")[0])["battle"]
    finish = {s: done["replies"][s]["finish_reason"] for s in "ab"}
    assert "stopped" in finish.values() and set(finish.values()) <= {"stopped", "stop"}
    assert all(done["replies"][s]["completion_tokens"] < 300 for s in "ab")
    # stopped replies can still be voted on, and are left out of the DPO export
    assert alice.post(f"/api/arena/battles/{bid}/vote", json={"vote": "b"}).status_code == 200
    assert bid not in alice.get("/api/arena/export?format=dpo").text
    # the client going away mid-stream: what was streamed is kept, marked stopped
    with alice.stream("POST", "/api/arena/battles", json=body) as r:
        lines = r.iter_lines()
        bid = json.loads(next(x for x in lines if x.startswith("data: "))[6:])["battle"]["id"]
        next(x for x in lines if x.startswith("event: delta"))
    user = arena.store.user_by_name("alice")
    for _ in range(100):
        b = Battles(arena.store.db).get(user, bid)
        if b.finished:
            break
        time.sleep(0.1)
    assert b.finished and "stopped" in (b.finish_a, b.finish_b) and b.vote is None
    # a prompt no model can take: refused before anything is stored, naming no model
    n = len(Battles(arena.store.db).recent(user))
    r = alice.post("/api/arena/battles", json={"prompt": "word " * 3000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert_blind(r.text, arena.secrets, "a refused battle")
    assert len(Battles(arena.store.db).recent(user)) == n
    alice.close()
    again.close()


def test_errors_of_a_side_name_no_model(rival_gguf, default_gguf):
    from homellm.serve import ModelRegistry
    from homellm.serve.errors import APIError
    from homellm.serve.web.arena import hidden
    registry = ModelRegistry({"smollm2:135m": default_gguf, RIVAL: rival_gguf},
                             aliases={"smollm2": "smollm2:135m", "rival": RIVAL})
    e = APIError(500, f"model {RIVAL!r} could not be loaded: {rival_gguf}: truncated; "
                 f"{rival_gguf.name} ({rival_gguf.stem}), not smollm2:135m or smollm2",
                 type="server_error", code="model_load_failed", headers={"Retry-After": "1"})
    h = hidden(e, registry, {"a": "smollm2:135m", "b": RIVAL})
    assert h.message == "model 'model B' could not be loaded: model B: truncated; model B " \
        "(model B), not model A or model A"
    assert (h.status, h.code, h.type, h.headers) == (500, "model_load_failed", "server_error",
                                                     {"Retry-After": "1"})


@pytest.mark.slow
def test_arena_in_chromium_with_two_accounts(arena):
    from test_web_browser import CHROMIUM
    if not (os.path.exists(CHROMIUM) or __import__("shutil").which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            _arena_in_chromium(browser, arena)
        finally:
            browser.close()


def _login(browser, arena, user, password):
    from test_web_browser import open_page
    ctx, page, watch = open_page(browser, arena.url + "/arena")
    bodies = []
    page.on("response", lambda r: bodies.append(r) if "/api/arena" in r.url else None)
    page.fill("#gate-user", user)
    page.fill("#gate-pass", password)
    page.click("#gate-submit")
    page.wait_for_selector("#arena-view:not([hidden])")
    return ctx, page, watch, bodies


def _battle_in_page(page, prompt):
    page.fill("#arena-max-tokens", str(MAX))
    page.fill("#arena-prompt", prompt)
    page.press("#arena-prompt", "Enter")
    page.wait_for_selector("#arena-votes:not([hidden])")
    return {s: page.locator(f"#arena-{s} .body").inner_text() for s in "ab"}


def _arena_in_chromium(browser, arena):
    before = Battles(arena.store.db).outcomes()        # votes of this module's other tests
    ctx, page, watch, bodies = _login(browser, arena, "alice", "alice-pass-1")
    assert page.url.endswith("/arena") and page.title() == "homellm · Arena"
    assert page.is_hidden("#arena-unavailable")
    shown = _battle_in_page(page, "Name two fruits.")
    # before the vote: no model name anywhere in the document (text, attributes, hidden
    # parts), nor in any arena response the page received
    assert_blind(page.content(), arena.secrets, "the page before the vote")
    assert page.locator("#arena-a .side-name").inner_text() == "Model A"
    for r in bodies:
        assert_blind(r.text(), arena.secrets, r.url)
    bid = page.evaluate("S.arena.battle.id")
    page.click("#vote-a")
    page.wait_for_selector("#arena-result >> text=You voted: A is better")
    names = {s: page.locator(f"#arena-{s} .side-name").inner_text() for s in "ab"}
    battle = Battles(arena.store.db).get(arena.store.user_by_name("alice"), bid)
    assert names == {"a": f"Model A: {battle.model_a}", "b": f"Model B: {battle.model_b}"}
    assert {battle.model_a, battle.model_b} == {"smollm2:135m", RIVAL}
    assert battle.vote == "a" and page.is_hidden("#arena-votes")
    assert page.locator("#arena-a.winner").count() == 1
    # the page shows what the store keeps (markdown rendered: compare the words)
    assert shown["a"].split() == page.locator("#arena-a .body").inner_text().split()
    # a second vote from this page's session: refused
    status = page.evaluate("""async (id) => (await fetch('/api/arena/battles/' + id + '/vote',
        {method: 'POST', headers: {'X-CSRF-Token': S.csrf, 'Content-Type': 'application/json'},
         body: JSON.stringify({vote: 'b'})})).status""", bid)
    assert status == 409
    # the leaderboard: both models, in the order of their ratings
    page.click("#views a[data-view='leaderboard']")
    page.wait_for_selector("#leaderboard-table tbody tr >> nth=1")
    now = ratings(before + [(battle.model_a, battle.model_b, "a")])
    rows = page.locator("#leaderboard-table tbody tr")
    assert [rows.nth(i).get_attribute("data-model") for i in range(2)] == \
        sorted(now, key=lambda m: -now[m])
    assert rows.nth(0).locator("td").nth(2).inner_text().split()[0] == \
        str(round(max(now.values())))
    assert page.locator("#leaderboard-summary").inner_text().startswith(
        f"{len(before) + 1} vote{'s' if before else ''} so far")
    with page.expect_download() as info:
        page.click("#arena-export-dpo")
    exported = [json.loads(x) for x in info.value.path().read_text().splitlines()]
    pair = {"prompt": [{"role": "user", "content": "Name two fruits."}],
            "chosen": [{"role": "assistant", "content": battle.reply_a}],
            "rejected": [{"role": "assistant", "content": battle.reply_b}]}
    assert exported.count(pair) == (1 if battle.reply_a.strip() and battle.reply_b.strip()
                                    else 0)
    # back to the arena (browser history): the voted battle still shows its names
    page.go_back()
    page.wait_for_selector("#arena-view:not([hidden])")
    assert page.locator("#arena-a .side-name").inner_text() == names["a"]

    # bob: alice's battle is a 404 for him; his own battle, voted B
    ctx2, page2, watch2, bodies2 = _login(browser, arena, "bob", "bob-pass-12")
    status = page2.evaluate("""async (id) => [
        (await fetch('/api/arena/battles/' + id)).status,
        (await fetch('/api/arena/battles/' + id + '/vote', {method: 'POST',
            headers: {'X-CSRF-Token': S.csrf, 'Content-Type': 'application/json'},
            body: JSON.stringify({vote: 'a'})})).status]""", bid)
    assert status == [404, 404]
    _battle_in_page(page2, "Say hello.")
    assert_blind(page2.content(), arena.secrets, "bob's page before the vote")
    for r in bodies2:
        assert_blind(r.text(), arena.secrets, r.url)
    page2.click("#vote-b")
    page2.wait_for_selector("#arena-result >> text=You voted: B is better")
    assert "Model B: " in page2.locator("#arena-b .side-name").inner_text()
    # alice's leaderboard follows bob's vote
    page.click("#views a[data-view='leaderboard']")
    page.wait_for_selector(f"#leaderboard-summary >> text={len(before) + 2} votes so far")
    votes = page.locator("#leaderboard-table tbody tr td:nth-child(5)").all_inner_texts()
    assert votes == [str(len(before) + 2)] * 2
    assert watch.dialogs == [] and watch2.dialogs == []
    # only the refused requests made on purpose (Chromium logs a 4xx as a console error)
    assert all("409" in e for e in watch.errors), watch.errors
    assert all("404" in e for e in watch2.errors), watch2.errors
    ctx.close()
    ctx2.close()
