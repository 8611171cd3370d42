"""`homellm eval judge` as a user runs it, against a real OpenAI-compatible judge on 127.0.0.1.

The judge server is a small stdlib HTTP server written here: it answers /v1/models and
/v1/chat/completions with a fixed policy that is the test's input ("always the first answer
shown", "the longer answer", ...), and records every prompt it was sent. The answering models
are the real default model (SmolLM2-135M-Instruct Q4_1) and a tiny random GGUF written in the
test (its answers are byte noise of a fixed length), run through `python -m homellm` with a
small --max-tokens. The statistics (bootstrap, length-controlled rate) and the parsing of the
judge's replies are checked on their own against numbers worked out here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from homellm.eval import stats
from homellm.eval.answers import load_questions
from homellm.eval.judge import parse_rating, parse_verdict

EXAMPLE = Path(__file__).parent.parent / "homellm" / "eval" / "questions" / "example.jsonl"
BLOCK = re.compile(r"\[Conversation with assistant ([AB])\]\n(.*?)\n\[End of the conversation "
                   r"with assistant \1\]", re.S)

# single-turn questions whose default-model answers (greedy, 48 tokens) are in part shorter and
# in part longer than the tiny model's 48 bytes of noise; two multi-turn ones at the end
QUESTIONS = [
    {"question_id": 1, "category": "short", "turns": ["What is 2 + 2? Answer with the number only."]},
    {"question_id": 2, "category": "short", "turns": ["What color is the sky? One word."]},
    {"question_id": 3, "category": "long", "turns": ["Write a short poem about the sea."]},
    {"question_id": 4, "category": "long", "turns": ["List three fruits."]},
    {"question_id": 5, "category": "long", "turns": ["Describe your ideal weekend in detail."]},
    {"question_id": 6, "category": "long", "turns": ["Explain how a bicycle works."]},
    {"question_id": "mt-1", "category": "multi", "turns": ["Name a famous painter.",
                                                           "Name one of their paintings."]},
    {"question_id": "mt-2", "category": "multi", "turns": ["What is the capital of Italy?",
                                                           "What river runs through it?"]},
]
MAX_TOKENS = "48"


# -- the judge server ----------------------------------------------------------------------

def first_shown(prompt: str) -> str:
    return "Assistant A is shown first, so it wins.\n[[A]]"


def longer(prompt: str) -> str:
    blocks = dict(BLOCK.findall(prompt))
    winner = "A" if len(blocks["A"]) > len(blocks["B"]) else "B" if len(blocks["B"]) > len(blocks["A"]) else "C"
    return f"The longer conversation is better.\n[[{winner}]]"


def mumbles(prompt: str) -> str:
    return "Both answers have merits."  # no verdict at all


class JudgeServer:
    """An OpenAI-compatible /v1 on 127.0.0.1 that replies with `policy(user prompt)`."""

    def __init__(self, policy, port: int = 0):
        self.policy = policy
        self.prompts: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "fixed-judge", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or body.get("model") != "fixed-judge":
                    self._json(404, {"error": {"message": f"no model {body.get('model')!r}"}})
                    return
                prompt = body["messages"][-1]["content"]
                server.prompts.append(prompt)
                reply = server.policy(prompt)
                self._json(200, {"id": "x", "object": "chat.completion", "created": 0,
                                 "model": "fixed-judge", "choices": [{
                                     "index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- running the command --------------------------------------------------------------------

def homellm(*args: str, home: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    env.pop("HOMELLM_DEBUG", None)
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "homellm", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def expect_error(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (after the lines that report the answers made)
    assert last.startswith("error: "), proc.stderr
    assert "unexpected" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in last, proc.stderr


def write_questions(path: Path, questions: list[dict]) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random model with room for a few chat turns of byte tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_fixtures import TINY_LLAMA, write_tiny_gguf
    args = dataclasses.replace(TINY_LLAMA, max_position_embeddings=1024)
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", args, "q8_0", seed=1)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    """One $HOMELLM_HOME for the tests that may share kept answers (made once, by the first)."""
    return tmp_path_factory.mktemp("judge-home")


def judge_json(*args: str, home: Path) -> dict:
    proc = homellm("eval", "judge", *args, "--json", home=home)
    return json.loads(proc.stdout)


def answer_lines(home: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in (home / "evals" / "answers").glob("*.jsonl"))


# -- the command end to end -------------------------------------------------------------------

@pytest.mark.slow
def test_a_judge_that_prefers_the_first_answer_gives_all_ties(shared_home, tmp_path, default_gguf,
                                                               tiny_model, monkeypatch):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    with JudgeServer(first_shown) as judge:
        out = judge_json("--models", f"{default_gguf},{tiny_model}", "--questions", str(qfile),
                         "--judge", judge.url, "--max-tokens", MAX_TOKENS,
                         "--out", str(tmp_path / "res.jsonl"), home=shared_home)
        assert len(judge.prompts) == 2 * len(QUESTIONS)  # both orders of every question
    m = out["metrics"][str(default_gguf)]
    assert (m["wins"], m["ties"], m["losses"], m["errors"]) == (0, len(QUESTIONS), 0, 0)
    assert m["inconsistent"] == len(QUESTIONS)
    assert m["tie_rate"] == 1.0 and m["tie_rate_ci"] == [1.0, 1.0]
    assert m["win_rate_raw"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [str(q["question_id"]) for q in QUESTIONS]
    for r in rows:
        assert [v["verdict"] for v in r["verdicts"]] == ["A", "A"]
        assert [v["winner"] for v in r["verdicts"]] == [str(default_gguf), str(tiny_model)]
        assert r["outcome"] == "tie" and r["winner"] == "tie"
        assert set(r["answers"]) == {str(default_gguf), str(tiny_model)}
    # kept: one run per model compared, with the models' file hashes
    from homellm.eval.results import model_identity
    runs = [json.loads((shared_home / "evals" / f"{run}.json").read_text()) for run in out["runs"]]
    assert len(runs) == 1 and runs[0]["kind"] == "judge"
    assert runs[0]["model_hash"] == out["model_hashes"][0]
    assert runs[0]["settings"]["opponent_hash"] == out["model_hashes"][1]
    monkeypatch.setenv("HOMELLM_HOME", str(shared_home))
    assert out["model_hashes"] == [model_identity(default_gguf), model_identity(tiny_model)]


@pytest.mark.slow
def test_a_judge_that_prefers_longer_answers_is_length_controlled(shared_home, tmp_path,
                                                                  default_gguf, tiny_model):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    with JudgeServer(longer) as judge:
        out = judge_json("--models", f"{default_gguf},{tiny_model}", "--questions", str(qfile),
                         "--judge", judge.url, "--judge-model", "fixed-judge", "--parallel", "4",
                         "--max-tokens", MAX_TOKENS, "--out", str(tmp_path / "res.jsonl"),
                         home=shared_home)
    rows = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
    a, b = str(default_gguf), str(tiny_model)
    longer_a = [r["lengths"][a] > r["lengths"][b] for r in rows]
    # the test needs both signs of the length difference; the default model gives them
    assert 0 < sum(longer_a) < len(rows), [r["lengths"] for r in rows]
    m = out["metrics"][a]
    assert m["wins"] == sum(longer_a) and m["losses"] == len(rows) - sum(longer_a)
    assert m["ties"] == 0 and m["inconsistent"] == 0 and m["errors"] == 0
    assert m["win_rate_raw"] == pytest.approx(sum(longer_a) / len(rows))
    # the judge follows the length and nothing else: controlling for it pulls the rate to 1/2
    assert m["lc_win_rate"] != pytest.approx(m["win_rate_raw"], abs=0.02)
    assert abs(m["lc_win_rate"] - 0.5) < abs(m["win_rate_raw"] - 0.5)
    # the same number as the length model fitted here on the per-question file
    y = np.array([1.0 if w else 0.0 for w in longer_a])
    x = np.tanh((np.array([r["lengths"][a] - r["lengths"][b] for r in rows], dtype=float)) /
                np.std([r["lengths"][a] - r["lengths"][b] for r in rows]))
    assert m["lc_win_rate"] == pytest.approx(stats.length_controlled_rate(y, x))


@pytest.mark.slow
def test_multi_turn_answers_feed_turn_two_with_the_models_own_first_answer(shared_home, tmp_path,
                                                                           default_gguf, tiny_model):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    with JudgeServer(first_shown) as judge:
        judge_json("--models", f"{default_gguf},{tiny_model}", "--questions", str(qfile),
                   "--judge", judge.url, "--max-tokens", MAX_TOKENS, "--out",
                   str(tmp_path / "res.jsonl"), home=shared_home)
        prompts = judge.prompts
    rows = {r["question_id"]: r for r in map(json.loads, (tmp_path / "res.jsonl").read_text().splitlines())}
    import homellm
    model = homellm.load(default_gguf)
    for q in QUESTIONS[-2:]:
        t1, t2 = q["turns"]
        kept = rows[q["question_id"]]["answers"][str(default_gguf)]

        def reply(messages):
            return "".join(s.text for s in model.chat(messages, max_tokens=int(MAX_TOKENS),
                                                      temperature=0.0))
        first = reply([{"role": "user", "content": t1}])
        second = reply([{"role": "user", "content": t1}, {"role": "assistant", "content": first},
                        {"role": "user", "content": t2}])
        assert kept == [first, second]
        assert second != reply([{"role": "user", "content": t2}])  # the history mattered
        # the judge saw the whole conversation, in order
        shown = [p for p in prompts if t2 in p][0]
        assert shown.index(t1) < shown.index(first) < shown.index(t2) < shown.index(second)


@pytest.mark.slow
def test_a_judge_that_is_down_keeps_the_answers_and_the_rerun_resumes(homellm_home, tmp_path,
                                                                      default_gguf, tiny_model):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2] + QUESTIONS[-1:])
    port = free_port()
    models = f"{default_gguf},{tiny_model}"
    common = ["eval", "judge", "--models", models, "--questions", str(qfile), "--max-tokens", "16",
              "--judge", f"http://127.0.0.1:{port}/v1", "--judge-model", "fixed-judge"]
    proc = homellm(*common, home=homellm_home, check_rc=None)
    expect_error(proc, f"http://127.0.0.1:{port}/v1 is unreachable", "answers are kept",
                 "run the same command again")
    kept = {f.name: f.read_text() for f in (homellm_home / "evals" / "answers").glob("*.jsonl")}
    assert len(kept) == 2 and all(len(t.splitlines()) == 3 for t in kept.values())
    assert not list((homellm_home / "evals").glob("*.json"))  # no result kept for a failed run

    # the judge comes up: the run completes from the kept answers, making none
    with JudgeServer(first_shown, port=port) as judge:
        proc = homellm(*common, "--json", home=homellm_home)
        assert len(judge.prompts) == 6
    out = json.loads(proc.stdout)
    assert out["answers"] == {**out["answers"], "made": 0, "kept": 6}
    assert {f.name: f.read_text() for f in (homellm_home / "evals" / "answers").glob("*.jsonl")} == kept
    assert out["judgments"]["made"] == 6 and out["metrics"][str(default_gguf)]["ties"] == 3

    # again: the judgments are kept too, so a judge that is down again is never asked
    out = json.loads(homellm(*common, "--json", home=homellm_home).stdout)
    assert out["judgments"]["made"] == 0 and out["judgments"]["kept"] == 6
    assert out["metrics"][str(default_gguf)]["ties"] == 3


@pytest.mark.slow
def test_unreadable_verdicts_are_errors_not_ties(homellm_home, tmp_path, default_gguf, tiny_model):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    with JudgeServer(mumbles) as judge:
        proc = homellm("eval", "judge", "--models", f"{tiny_model},{default_gguf}", "--questions",
                       str(qfile), "--judge", judge.url, "--max-tokens", "8", home=homellm_home)
    assert "errors: 2 of 2 questions had no readable verdict" in proc.stdout
    assert re.search(r"ties\s+0 ", proc.stdout), proc.stdout


@pytest.mark.slow
def test_a_catalog_model_as_the_judge_grades_single_answers(homellm_home, tmp_path, default_gguf,
                                                            tiny_model):
    from homellm import catalog
    catalog.pull(str(default_gguf), name="judge:small")
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = judge_json("--models", str(tiny_model), "--questions", str(qfile), "--mode", "single",
                     "--judge", "judge:small", "--judge-max-tokens", "24", "--max-tokens", "8",
                     "--out", str(tmp_path / "res.jsonl"), home=homellm_home)
    rows = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and out["judgments"]["made"] == 2
    m = out["metrics"][str(tiny_model)]
    for r in rows:  # every reply is the judge's greedy text, read as parse_rating reads it
        rating, why = parse_rating(r["reply"])
        assert r["rating"] == rating and (r["error"] is None) == (rating is not None)
        assert r["error"] == (why or None)
    rated = [r["rating"] for r in rows if r["rating"] is not None]
    assert m["n"] == len(rated) and m["errors"] == 2 - len(rated)
    assert m["mean_rating"] == (sum(rated) / len(rated) if rated else None)
    # the judge is the model itself, greedy: its reply is what homellm.load gives for the prompt
    import homellm
    from homellm.eval.answers import Question
    from homellm.eval.judge import single_prompt
    q = QUESTIONS[0]
    messages = single_prompt(Question(str(q["question_id"]), q["turns"]), rows[0]["answer"])
    model = homellm.load(default_gguf)
    assert rows[0]["reply"] == "".join(s.text for s in model.chat(messages, max_tokens=24,
                                                                  temperature=0.0))


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("content,fragments", [
    (None, ["no such question file"]),
    ("", ["no questions", "empty"]),
    ("\n\n", ["no questions"]),
    ('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": ["a"]\n', ["line 2", "not valid JSON"]),
    ('{"question_id": 1, "turns": ["hi"]}\n[1, 2]\n', ["line 2", "JSON object"]),
    ('{"question_id": 1, "prompt": "hi"}\n', ["line 1", 'no "turns"']),
    ('{"question_id": 1, "turns": []}\n', ["line 1", '"turns" must be a non-empty list']),
    ('{"question_id": 1, "turns": ["hi", 3]}\n', ["line 1", '"turns"[1] must be a non-empty string']),
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', ["line 2", "repeats line 1"]),
    ('{"question_id": 1, "turns": ["a"], "reference": ["x", "y"]}\n', ["line 1", '"reference" has 2 answers for 1 turns']),
])
def test_bad_question_files_name_the_line_and_field(tmp_path, content, fragments):
    from homellm.errors import HomellmError
    path = tmp_path / "q.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HomellmError) as e:
        load_questions(path)
    assert str(path) in str(e.value)
    for f in fragments:
        assert f in str(e.value)


def test_the_example_questions_load():
    questions = load_questions(EXAMPLE)
    assert len(questions) >= 5 and all(len(q.turns) == 2 for q in questions)
    assert any(q.reference for q in questions)


@pytest.mark.slow
def test_bad_input_on_the_command_line(homellm_home, tmp_path, default_gguf, tiny_model):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    run = ["eval", "judge", "--questions", str(qfile)]
    expect_error(homellm(*run, "--models", f"{default_gguf},no-such-model", "--judge", "http://127.0.0.1:9/v1",
                         home=homellm_home, check_rc=None), "no model named 'no-such-model'")
    expect_error(homellm(*run, "--models", str(default_gguf), "--judge", "http://127.0.0.1:9/v1",
                         home=homellm_home, check_rc=None), "pairwise judging takes exactly two models")
    expect_error(homellm(*run, "--models", f"{default_gguf},{default_gguf}", "--judge", "nor-this-judge",
                         home=homellm_home, check_rc=None), "no model named 'nor-this-judge'")
    expect_error(homellm("eval", "judge", "--questions", str(tmp_path / "none.jsonl"), "--models", "a,b",
                         "--judge", "http://127.0.0.1:9/v1", home=homellm_home, check_rc=None),
                 "none.jsonl: no such question file")
    assert not (homellm_home / "evals" / "answers").exists()  # nothing made before the errors
    with JudgeServer(first_shown) as judge:  # a judge that serves another model
        expect_error(homellm(*run, "--models", f"{default_gguf},{default_gguf}+{tmp_path}",
                             "--judge", judge.url, home=homellm_home, check_rc=None),
                     "is not a LoRA adapter folder")
        expect_error(homellm(*run, "--models", f"{tiny_model},{default_gguf}",
                             "--max-tokens", "4", "--judge", judge.url, "--judge-model", "gpt-9",
                             home=homellm_home, check_rc=None),
                     f"the judge at {judge.url} answered HTTP 404", "no model 'gpt-9'")


# -- the parts on their own ------------------------------------------------------------------

@pytest.mark.parametrize("reply,verdict", [
    ("A is better.\n[[A]]", "A"),
    ("[[B]]", "B"),
    ("They are equally good. [[C]]", "C"),
    ("Equal: [[ tie ]]", "C"),
    ("[[b]] ... as said, [[B]]", "B"),  # one verdict, repeated
    ("You asked for [[A]], [[B]] or [[C]]. My verdict:\n[[B]]", "B"),  # instructions quoted
    ("Verdict: A", None),
    ("[[A]] or maybe [[B]]", None),  # two verdicts, neither alone on the last line
    ("", None),
])
def test_parse_verdict(reply, verdict):
    got, why = parse_verdict(reply)
    assert got == verdict
    assert (why == "") == (verdict is not None)


@pytest.mark.parametrize("reply,rating", [
    ("Good answer.\nRating: [[7]]", 7.0),
    ("Rating: [[ 10 ]]", 10.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: 6", 6.0),
    ("Rating: [4]", 4.0),
    ("Rating: [[0]]", None),
    ("Rating: [[11]]", None),
    ("I would give it [[3]] or [[9]]", None),
    ("no number here", None),
])
def test_parse_rating(reply, rating):
    assert parse_rating(reply)[0] == rating


def test_bootstrap_interval_of_a_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, 400)
    low, high = stats.mean_interval(x)
    # the normal-theory 95% interval of the mean, mean +- 1.96 sd / sqrt(n)
    half = 1.96 * x.std() / np.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.03)
    assert high == pytest.approx(x.mean() + half, abs=0.03)
    assert (low, high) == stats.bootstrap_interval(x.size, lambda idx: x[idx].mean())
    assert stats.mean_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_length_controlled_rate_removes_a_pure_length_preference():
    rng = np.random.default_rng(0)
    n = 400
    delta = rng.normal(50, 100, n)  # A is longer on about 70% of the questions
    # a judge that prefers the longer answer and has no other preference
    outcomes = ["win" if d > 0 else "loss" for d in delta]
    s = stats.pairwise_summary(outcomes, 200 + delta, np.full(n, 200.0))
    assert s["win_rate_raw"] == pytest.approx(np.mean(delta > 0))
    assert s["win_rate_raw"] > 0.65
    assert abs(s["lc_win_rate"] - 0.5) < 0.1
    lo, hi = s["lc_win_rate_ci"]
    assert lo <= s["lc_win_rate"] <= hi


def test_length_controlled_rate_keeps_a_preference_unrelated_to_length():
    rng = np.random.default_rng(0)
    n = 400
    la, lb = rng.integers(20, 400, n), rng.integers(20, 400, n)
    outcomes = list(rng.choice(["win", "tie", "loss"], n, p=[0.6, 0.2, 0.2]))
    s = stats.pairwise_summary(outcomes, la, lb)
    assert s["wins"] + s["ties"] + s["losses"] == n
    assert s["win_rate_raw"] == pytest.approx((s["wins"] + s["ties"] / 2) / n)
    assert s["lc_win_rate"] == pytest.approx(s["win_rate_raw"], abs=0.02)
    # equal lengths: no length signal, the rate is the raw one (up to the small prior on theta)
    s = stats.pairwise_summary(outcomes, la, la)
    assert s["lc_win_rate"] == pytest.approx(s["win_rate_raw"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("client", ["openai", "httpx"])
def test_endpoint_judge_through_either_client(client, monkeypatch):
    from homellm.eval.judges import EndpointJudge, JudgeUnavailable, JudgmentError, open_judge
    if client == "httpx":
        monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    messages = [{"role": "system", "content": "judge"}, {"role": "user", "content": "[[?]]"}]
    with JudgeServer(lambda prompt: f"you said {prompt}") as server:
        judge = open_judge(server.url.removesuffix("/v1"))  # a bare host:port gets /v1
        assert isinstance(judge, EndpointJudge) and judge.base_url == server.url
        assert judge.complete(messages, 16) == "you said [[?]]"
        assert judge.model_name == "fixed-judge"  # the one model the server lists
        assert (judge._http is not None) == (client == "httpx")
        assert server.prompts == ["[[?]]"]
        wrong = open_judge(server.url, model="other")
        with pytest.raises(JudgeUnavailable, match="answered HTTP 404"):
            wrong.complete(messages, 16)
    down = open_judge(f"http://127.0.0.1:{free_port()}/v1", model="fixed-judge")
    with pytest.raises(JudgeUnavailable, match="is unreachable .*refused"):
        down.complete(messages, 16)
    assert issubclass(JudgmentError, Exception) and not issubclass(JudgmentError, JudgeUnavailable)


def test_kept_lines_survive_a_write_cut_short(tmp_path):
    from homellm.eval.answers import JsonlCache
    cache = JsonlCache(tmp_path / "kept.jsonl")
    cache.add({"key": "a", "reply": "first"})
    with open(cache.path, "a") as f:
        f.write('{"key": "b", "reply": "cut sh')  # a run killed in the middle of a line
    cache = JsonlCache(cache.path)
    assert set(cache.records) == {"a"}
    cache.add({"key": "c", "reply": "third"})
    assert set(JsonlCache(cache.path).records) == {"a", "c"}
    assert JsonlCache(cache.path).get("c") == {"key": "c", "reply": "third"}
