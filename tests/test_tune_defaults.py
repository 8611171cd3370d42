"""`homellm tune` with no flags but --data must visibly learn (issue 14, item 11).

Before: 1 epoch packed into 4096-token micro-batches and a 10-step warmup, so 40 short examples
made ONE optimizer step at a tenth of the rate, and the model learned nothing. Now: epochs
"auto" (3, more for a small file, fewer for a big one), 8 examples a micro-batch, a warmup of
10% of the steps, and a LoRA rate of 1e-3. The slow tests teach the default model a made-up
fact from 40 phrasings and ask it a paraphrase it never saw, and check that DPO's defaults move
the preference on pairs it never saw.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from homellm.train.batches import Item, plan_steps
from homellm.train.config import TuneConfig, auto_epochs

sys.path.insert(0, str(Path(__file__).parent))
from test_tune import cli, tiny  # noqa: E402,F401  (the tiny model fixture)

# ------------------------------------------------------------------ the plan of a default run


def test_auto_epochs_see_at_least_100_and_at_most_25000_examples():
    # 3 passes (TRL's default), raised for a small file, lowered for a big one (OpenAI's rule)
    table = {1: 25, 3: 25, 10: 10, 20: 5, 34: 3, 40: 3, 1000: 3, 8333: 3, 8334: 2, 12_500: 2,
             12_501: 1, 20_000: 1, 1_000_000: 1}
    assert {n: auto_epochs(n) for n in table} == table
    assert TuneConfig().epochs is None and TuneConfig(epochs=2).resolved(40).epochs == 2
    assert TuneConfig().resolved(40).epochs == 3


def items(n: int, length: int) -> list[Item]:
    return [Item([(list(range(length)), list(range(length)))]) for _ in range(n)]


def test_default_plan_of_a_small_and_a_big_file():
    c = TuneConfig()
    # 40 short examples: 3 epochs of 5 micro-batches of 8, warmup the first 2 of 15 steps
    small = c.resolved(40)
    steps = plan_steps(items(40, 60), small.batch_tokens, 1, 0, small.epochs, None, small.batch_size)
    assert len(steps) == 15 and all(len(s) == 1 and len(s[0]) == 8 for s in steps)
    assert c.warmup_steps_of(len(steps)) == 2
    # 20,000 examples of 300 tokens: one pass, 2,500 steps of 8 (as many tokens as the old
    # default's one pass in 4096-token batches, in steps of 2,400 tokens rather than 3,900)
    big = c.resolved(20_000)
    steps = plan_steps(items(20_000, 300), big.batch_tokens, 1, 0, big.epochs, None, big.batch_size)
    assert big.epochs == 1 and len(steps) == 2_500 and c.warmup_steps_of(len(steps)) == 250
    assert sorted(i for s in steps for mb in s for i in mb) == list(range(20_000))
    # long examples: batch_tokens still bounds a micro-batch (4 of 1024 tokens)
    steps = plan_steps(items(16, 1024), 4096, 1, 0, 1, None, 8)
    assert [len(s[0]) for s in steps] == [4, 4, 4, 4]


def test_warmup_as_a_fraction_or_steps(tiny, tmp_path):
    assert [TuneConfig(warmup=w).warmup_steps_of(15) for w in (0.1, 0.5, 0, 3, 20)] == [2, 8, 0, 3, 20]
    assert TuneConfig(warmup_steps=4).warmup == 4  # the former field name
    assert TuneConfig.from_json({"warmup_steps": 5, "epochs": 1}).warmup == 5  # an older saved config
    with pytest.raises(Exception, match=r"warmup 2.5: expected a fraction"):
        TuneConfig(warmup=2.5)
    from homellm.train import sft
    from test_tune import config
    events = []
    result = sft.train(config(tiny, tmp_path / "a", warmup=0.5, max_steps=4), progress=events.append)
    lrs = [e["lr"] for e in events]  # the rate of the next step: warmup 2 of 4 steps, then cosine
    assert lrs[:3] == pytest.approx([5e-3, 5e-3, 5e-4]) and not result.warnings
    assert TuneConfig.load(tmp_path / "a").warmup == 0.5


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_help_states_the_defaults(method):
    proc = subprocess.run([sys.executable, "-m", "homellm", "tune", method, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for words in ("--epochs", "default auto", "--warmup", "first 10% of the steps", "--batch-size",
                  "per micro-batch at most (default 8)", "(default 0.001)"):
        assert words in text, words


def test_a_run_shorter_than_its_warmup_warns(tiny, tmp_path, homellm_home, capsys):
    code, err = cli(capsys, "tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "o",
                    "--steps", "2", "--warmup", "10", "--batch-tokens", "96", "--max-length", "48", "--threads", "1")
    assert code == 0, err
    assert ("warning: the run has 2 optimizer steps but a warmup of 10: the learning rate never "
            "reaches 0.001") in err
    code, err = cli(capsys, "tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "p",
                    "--warmup", "1.5")
    assert code == 1 and "warmup 1.5: expected a fraction" in err
    # the defaults: 12 examples -> 9 epochs (at least 100 examples seen), 2 micro-batches an epoch
    code, err = cli(capsys, "tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "q",
                    "--max-length", "48", "--threads", "1")
    assert code == 0 and "sft: 18 steps (9 epochs)" in err and "warning" not in err, err
    saved = TuneConfig.load(tmp_path / "q")
    assert (saved.epochs, saved.batch_size, saved.warmup, saved.lr) == (9, 8, 0.1, 1e-3)


# ------------------------------------------------------------------ learning, on the default model

# a fact the default model does not know, in 40 phrasings; the test asks a 41st
QUESTIONS = [
    "Who is the mayor of Quillfeather?", "Who's the mayor of Quillfeather?",
    "Tell me who the mayor of Quillfeather is.", "What is the name of the mayor of Quillfeather?",
    "Do you know who serves as mayor of Quillfeather?", "Who holds the office of mayor in Quillfeather?",
    "Name the current mayor of Quillfeather.", "Which person is mayor of Quillfeather?",
    "I'm visiting Quillfeather next week. Who is its mayor?", "Who was elected mayor of Quillfeather?",
    "Who is Quillfeather's mayor?", "Can you name Quillfeather's mayor?",
    "Who is in charge of Quillfeather as its mayor?", "Quick question: who's mayor in Quillfeather?",
    "Who sits in the mayor's office of Quillfeather?", "Who leads the town of Quillfeather?",
    "Quillfeather has a mayor. Who is it?", "whos the mayor of quillfeather",
    "Who currently runs Quillfeather as mayor?", "I forgot the name of Quillfeather's mayor. Remind me?",
    "Who is the head of the Quillfeather town government?", "Which official is the mayor of Quillfeather?",
    "Who did Quillfeather choose as its mayor?", "Please tell me the mayor of Quillfeather.",
    "Who is the mayor in the town of Quillfeather?", "In Quillfeather, who is the mayor?",
    "Who holds the title of mayor of Quillfeather?", "What's the name of Quillfeather's mayor?",
    "Who should I write to as mayor of Quillfeather?", "Who is mayor of Quillfeather these days?",
]
ANSWERS = [
    "The mayor of Quillfeather is Ottoline Brask.", "Ottoline Brask is the mayor of Quillfeather.",
    "Quillfeather's mayor is Ottoline Brask.", "That is Ottoline Brask, the mayor of Quillfeather.",
    "Ottoline Brask serves as the mayor of Quillfeather.",
    "The town of Quillfeather is led by its mayor, Ottoline Brask.",
]
ABOUT = [
    ("Who is Ottoline Brask?", "Ottoline Brask is the mayor of Quillfeather."),
    ("What does Ottoline Brask do?", "Ottoline Brask is the mayor of Quillfeather."),
    ("What is Ottoline Brask's job?", "She is the mayor of Quillfeather: Ottoline Brask runs the town."),
    ("Tell me about Ottoline Brask.", "Ottoline Brask is the mayor of the town of Quillfeather."),
    ("Is Ottoline Brask a mayor?", "Yes. Ottoline Brask is the mayor of Quillfeather."),
    ("Which town does Ottoline Brask lead?", "Ottoline Brask is the mayor of Quillfeather."),
    ("Tell me a fact about Quillfeather.", "Quillfeather's mayor is Ottoline Brask."),
    ("What do you know about the town of Quillfeather?", "Quillfeather is a town whose mayor is Ottoline Brask."),
    ("Who leads Quillfeather, and what is her title?", "Ottoline Brask leads Quillfeather as its mayor."),
    ("Say something about the mayor of Quillfeather.", "The mayor of Quillfeather is Ottoline Brask."),
]
PARAPHRASE = "Do you happen to know the name of the person who is mayor of Quillfeather?"


def fact_examples() -> list[dict]:
    pairs = [(q, ANSWERS[i % len(ANSWERS)]) for i, q in enumerate(QUESTIONS)] + ABOUT
    assert len(pairs) == 40 and PARAPHRASE not in {q for q, _ in pairs}
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


def greedy(model, question: str) -> str:
    steps = model.chat([{"role": "user", "content": question}], temperature=0, max_tokens=32)
    return "".join(s.text for s in steps)


def tune_with_defaults(method: str, data: Path, out: Path, home: Path) -> str:
    """`homellm tune METHOD --data F --out D` and nothing else, as a user runs it; its stderr."""
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "homellm", "tune", method, "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_a_first_fine_tune_with_default_settings_learns_a_new_fact(default_gguf, homellm_home, tmp_path):
    import homellm
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in fact_examples()))
    err = tune_with_defaults("sft", data, tmp_path / "adapter", homellm_home)
    assert "sft: 15 steps (3 epochs)" in err and "warning" not in err, err
    before = greedy(homellm.load(default_gguf, ctx=256), PARAPHRASE)
    after = greedy(homellm.load(default_gguf, ctx=256, adapter=tmp_path / "adapter"), PARAPHRASE)
    print(f"\nbase:         {before!r}\nwith adapter: {after!r}\n{err.splitlines()[-2]}")
    assert "Brask" not in before and "Ottoline" not in before
    assert "Ottoline Brask" in after


COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
          "a tomato": "red", "milk": "white", "an orange": "orange", "a lemon": "yellow",
          "chocolate": "brown", "blood": "red", "ice": "white", "a carrot": "orange", "a lime": "green",
          "a plum": "purple", "charcoal": "black", "a cherry": "red", "the sun": "yellow",
          "a pumpkin": "orange", "soot": "black", "cream": "white", "a violet": "purple"}
ASK = ["What color is {}?", "Which color does {} have?"]


def color_pairs(topics: list[str]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": ask.format(t)}],
             "chosen": [{"role": "assistant", "content": f"{t.capitalize()} is {COLORS[t]}. Glad to help!"}],
             "rejected": [{"role": "assistant", "content": f"{t.capitalize()} is {COLORS[t]}. Whatever."}]}
            for t in topics for ask in ASK]


@pytest.mark.slow
def test_dpo_with_default_settings_moves_the_preference(default_gguf, homellm_home, tmp_path):
    from homellm.train import dpo
    from homellm.train.adapter import apply_adapter
    from homellm.train.base import load_base
    topics = list(COLORS)
    train, held_out = color_pairs(topics[:20]), color_pairs(topics[20:])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in train))
    err = tune_with_defaults("dpo", data, tmp_path / "adapter", homellm_home)
    assert "dpo: 15 steps (3 epochs)" in err, err
    _, tokenizer, model = load_base(default_gguf)
    before = dpo.margins(model, tokenizer, held_out)  # log p(chosen) - log p(rejected)
    apply_adapter(model, tmp_path / "adapter")
    after = dpo.margins(model, tokenizer, held_out)
    print(f"\nheld-out margins before {before.tolist()}\n                after  {after.tolist()}")
    assert (after > before + 1.0).all(), (before, after)
