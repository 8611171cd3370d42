"""Reward models (`homellm tune rm`, `homellm score`): every pair format read against pairs written
out here, a clear signal learned (held-out accuracy >= 0.9), the saved folder scoring as the
trained model did, exact resume, DDP == one process, and clear errors for bad input.

The model is a random tiny Llama on a tokenizer trained here (tests/rl_fixtures.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from rl_fixtures import polite_pairs, tiny_model, tiny_tokenizer  # noqa: E402

from homellm.data.conversations import DataError  # noqa: E402
from homellm.data.pairs import pair_from_record, read_pairs  # noqa: E402
from homellm.train import reward  # noqa: E402
from homellm.train.config import LoraConfig, TuneConfig  # noqa: E402

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tok = tiny_tokenizer(root / "tok")
    return {"root": root, "tok": tok, "model": tiny_model(root / "policy", tok),
            "train": polite_pairs(root / "train.jsonl", 64, seed=0),
            "val": polite_pairs(root / "val.jsonl", 40, seed=1)}


def config(tiny, out, **kw) -> TuneConfig:
    base = dict(method="rm", model=str(tiny["model"]), data=str(tiny["train"]), val=str(tiny["val"]),
                out=str(out), lora=LoraConfig(rank=8, alpha=16), lr=3e-3, max_steps=24, batch_size=8,
                max_length=64, threads=1, seed=0)
    return TuneConfig(**{**base, **kw})


# -- formats -------------------------------------------------------------------------------------

FORMATS = [
    ({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
     [{"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]}]),
    ({"chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Go away.")], "margin": 2.0},
     [{"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]}]),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue.",
      "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: No."},
     [{"prompt": [U("Hi?"), A("Hello!"), U("Name a color.")], "chosen": [A("Blue.")],
       "rejected": [A("No.")]}]),
    ({"post_id": "x", "history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.",
      "human_ref_B": "It just is.", "labels": 0, "score_A": 3, "score_B": 9},
     [{"prompt": [U("Why is the sky blue?")], "chosen": [A("It just is.")],
       "rejected": [A("Rayleigh scattering.")]}]),
    ({"battle_id": "b", "model_a": "x", "model_b": "y", "winner": "model_b",
      "conversation_a": [U("Hi?"), A("Bye.")], "conversation_b": [U("Hi?"), A("Hello!")]},
     [{"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Bye.")]}]),
    ({"battle_id": "b", "model_a": "x", "model_b": "y", "winner": "tie",
      "conversation_a": [U("Hi?"), A("Bye.")], "conversation_b": [U("Hi?"), A("Hello!")]}, []),
    ({"message_tree_id": "t", "prompt": {
        "message_id": "p", "role": "prompter", "text": "Hi?", "replies": [
            {"message_id": "r1", "parent_id": "p", "role": "assistant", "text": "Go away.", "rank": 1},
            {"message_id": "r0", "parent_id": "p", "role": "assistant", "text": "Hello!", "rank": 0}]}},
     [{"prompt": [U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]}]),
]


@pytest.mark.parametrize("record,expected", FORMATS,
                         ids=["dpo", "implicit", "hh", "shp", "arena", "arena-tie", "oasst-tree"])
def test_every_pair_format_gives_the_pair_written_out_here(record, expected):
    assert pair_from_record(record, "f:1") == expected


BAD = [
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "same reply"),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Yes."},
     "same conversation"),
    ({"history": "Q", "human_ref_A": "Same", "human_ref_B": "Same", "labels": 1}, "same reply"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': empty"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"}, "empty prompt"),
    ({"chosen": "just text", "rejected": "other text"}, "not a transcript"),
    ({"history": "Q", "human_ref_A": "a", "human_ref_B": "b", "labels": "A"}, "'labels'"),
    ({"chosen": [U("Hi"), A("a")], "rejected": [U("Ho"), A("b")]}, "share no prompt"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "'chosen': empty reply"),
    ({"winner": "model_c", "conversation_a": [], "conversation_b": []}, "field 'winner'"),
]


@pytest.mark.parametrize("record,fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_bad_pair_names_what_is_wrong(record, fragment):
    with pytest.raises(ValueError, match=fragment):
        pair_from_record(record, "f:1")


def test_a_file_of_identical_pairs_stops_before_training_naming_the_lines(tmp_path, tiny):
    bad = tmp_path / "same.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": "x", "rejected": "x"}) + "\n"
                           for i in range(3)) + "{\n")
    with pytest.raises(DataError) as e:
        read_pairs(bad)
    text = str(e.value)
    assert f"{bad}:1:" in text and "same reply" in text and f"{bad}:4: not JSON" in text
    assert "4 of 4 records are malformed" in text
    with pytest.raises(DataError, match="same reply"):
        reward.train(config(tiny, tmp_path / "out", data=str(bad)))
    assert not (tmp_path / "out").exists()  # nothing half-written


# -- training ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_reward_model_learns_a_clear_signal_and_its_folder_scores_the_same(tiny, tmp_path):
    result = reward.train(config(tiny, tmp_path / "rm"))
    first_loss, last_val = result.losses[0], result.val[-1]
    assert abs(first_loss - 0.693) < 0.05  # log 2: no preference at the start
    assert last_val["accuracy"] >= 0.9, result.val  # held-out pairs: "thanks" is preferred
    assert last_val["loss"] < 0.3 and result.losses[-1] < first_loss
    files = load_file(tmp_path / "rm" / "adapter_model.safetensors")
    assert files[reward.HEAD_KEY].shape == (1, 64)
    assert any(k.endswith("lora_A.weight") for k in files)
    peft = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert peft["task_type"] == "SEQ_CLS" and peft["modules_to_save"] == ["score"]
    # the saved folder scores each held-out pair as the accuracy said
    rm = reward.load_reward_model(tmp_path / "rm")
    pairs = read_pairs(tiny["val"]).records
    chosen = rm.rewards([(p["prompt"], p["chosen"][0]["content"]) for p in pairs])
    rejected = rm.rewards([(p["prompt"], p["rejected"][0]["content"]) for p in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert accuracy == pytest.approx(last_val["accuracy"])
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)
    assert margin == pytest.approx(last_val["margin"], rel=1e-4, abs=1e-4)
    # batched scoring equals one by one
    one = [rm.rewards([(p["prompt"], p["chosen"][0]["content"])])[0] for p in pairs[:5]]
    torch.testing.assert_close(torch.tensor(one), torch.tensor(chosen[:5]), rtol=1e-5, atol=1e-5)


def test_resume_gives_the_same_reward_model_as_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(max_steps=6, lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    whole = reward.train(config(tiny, tmp_path / "whole", **kw))
    part = reward.train(config(tiny, tmp_path / "part", **kw), stop_after=3)
    assert part.stopped and len(part.losses) == 3
    rest = reward.train(config(tiny, tmp_path / "part", **kw), resume=True)
    assert rest.losses == whole.losses
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and reward.HEAD_KEY in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def cli(capsys, *args) -> tuple[int, str, str]:
    from homellm.cli.main import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tune_rm_and_score_on_the_command_line(tiny, tmp_path, homellm_home, capsys, monkeypatch):
    code, _, err = cli(capsys, "tune", "rm", "-m", tiny["model"], "--data", tiny["train"], "--val",
                       tiny["val"], "--steps", "4", "--threads", "1", "--max-length", "64",
                       "--dtype", "float32", "--device", "cpu")
    assert code == 0, err
    assert "held-out pair accuracy" in err and "reward model:" in err
    made = list((homellm_home / "rewards").iterdir())
    assert len(made) == 1 and (made[0] / "reward_config.json").is_file()
    rm = reward.load_reward_model(made[0].name)  # found by name under $HOMELLM_HOME/rewards
    lines = [{"prompt": "Say hello.", "reply": "hello thanks"}, {"prompt": [U("Say hello.")], "response": "sky"},
             {"messages": [U("Say hello."), A("hello sky")]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in lines))
    code, out, err = cli(capsys, "score", "-m", made[0].name, src, "--device", "cpu")
    assert code == 0, err
    scored = [json.loads(line) for line in out.splitlines()]
    expected = rm.rewards([([U("Say hello.")], "hello thanks"), ([U("Say hello.")], "sky"),
                           ([U("Say hello.")], "hello sky")])
    assert [d["score"] for d in scored] == pytest.approx(expected, abs=1e-5)
    assert scored[0]["reply"] == "hello thanks" and "replies/s" in err
    # bad input: clear errors, nothing scored
    src.write_text('{"prompt": "x", "reply": "y"}\n{"prompt": "x"}\n')
    code, out, err = cli(capsys, "score", "-m", made[0].name, src, "--device", "cpu")
    assert code == 1 and out == "" and f"{src}:2:" in err and "'reply'" in err
    code, _, err = cli(capsys, "score", "-m", tiny["model"], src)
    assert code == 1 and "not a reward model folder" in err


def test_a_reward_model_on_a_base_with_another_tokenizer_is_refused(tiny, tmp_path):
    from homellm.train.rl import ModelReward
    from homellm.train.reward import load_reward_model
    reward.train(config(tiny, tmp_path / "rm", max_steps=1))
    other_tok = tiny_tokenizer(tmp_path / "tok2", vocab_size=300)
    other = tiny_model(tmp_path / "other", other_tok)
    with pytest.raises(Exception, match="another tokenizer") as e:
        load_reward_model(tmp_path / "rm", base=str(other))
    assert "must share the tokenizer" in str(e.value)
    from homellm.tokenizer.train import load
    with pytest.raises(Exception, match="another tokenizer"):
        ModelReward(str(tmp_path / "rm"), load(other_tok), torch.device("cpu"), "float32")


@pytest.mark.slow
def test_two_processes_under_torchrun_train_the_reward_model_one_process_trains(tiny, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    common = ["tune", "rm", "-m", str(tiny["model"]), "--data", str(tiny["train"]), "--steps", "3",
              "--batch-size", "4", "--max-length", "64", "--rank", "4", "--lr", "3e-3", "--threads", "1",
              "--device", "cpu", "--seed", "1", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOMELLM_HOME": str(tmp_path / "home")}
    one = subprocess.run([sys.executable, "-m", "homellm", *common, "--grad-accum", "2", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "homellm", *common,
                          "--grad-accum", "1", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and reward.HEAD_KEY in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert (a[reward.HEAD_KEY] != 0).any()


def test_the_server_scores_with_a_reward_model(tiny, homellm_home):
    """POST /v1/score on a live server: the scores `load_reward_model` gives, and OpenAI-shaped
    errors for an unknown model, a path, and a bad item."""
    import httpx
    from test_loop import Server
    reward.train(config(tiny, homellm_home / "rewards" / "rm1", max_steps=3))
    rm = reward.load_reward_model("rm1")
    server = Server(homellm_home / "web.db", {"tiny": tiny["model"]})
    try:
        items = [{"prompt": "Say hello.", "reply": "hello thanks"},
                 {"messages": [U("Say hello."), A("sky sky")]}]
        r = httpx.post(f"{server.url}/v1/score", json={"model": "rm1", "input": items}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "rm1" and [d["index"] for d in body["data"]] == [0, 1]
        expected = rm.rewards([([U("Say hello.")], "hello thanks"), ([U("Say hello.")], "sky sky")])
        assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
        assert body["usage"]["prompt_tokens"] > 0
        for payload, status, param in (({"model": "nope", "input": items}, 404, "model"),
                                       ({"model": "../rm1", "input": items}, 400, "model"),
                                       ({"model": "rm1", "input": [{"prompt": "x"}]}, 400, "input"),
                                       ({"model": "rm1", "input": []}, 400, "input")):
            r = httpx.post(f"{server.url}/v1/score", json=payload, timeout=60)
            assert r.status_code == status, r.text
            assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    finally:
        server.close()
