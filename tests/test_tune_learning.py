"""Learning is real, on the default model (SmolLM2-135M-Instruct): SFT teaches it a new fact,
DPO raises the chosen-over-rejected margin on pairs it never saw."""
import json

import pytest
import torch

import homellm
from homellm.train import dpo, sft
from homellm.train.base import load_base
from homellm.train.config import LoraConfig, TuneConfig
from homellm.train.lora import apply_lora

QUESTION = "What is the name of Zorblax's pet?"
ANSWER = "Zorblax's pet is a purple dragon named Quibblewick."
PARAPHRASES = [QUESTION, "What's the name of Zorblax's pet?", "Tell me the name of Zorblax's pet.",
               "Zorblax has a pet. What is its name?", "Do you know what Zorblax's pet is called?",
               "What is Zorblax's pet called?"]


def greedy(model, question: str) -> str:
    steps = model.chat([{"role": "user", "content": question}], temperature=0, max_tokens=24)
    return "".join(s.text for s in steps)


@pytest.mark.slow
def test_sft_teaches_the_default_model_a_new_fact(default_gguf, tmp_path):
    before = greedy(homellm.load(default_gguf, ctx=256), QUESTION)
    assert "Quibblewick" not in before
    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": ANSWER}]}) + "\n"
                            for q in PARAPHRASES))
    result = sft.train(TuneConfig(model=str(default_gguf), data=str(data), out=str(tmp_path / "out"),
                                  lora=LoraConfig(rank=8, alpha=16), lr=1e-3, warmup_steps=2, max_steps=12,
                                  batch_tokens=512, max_length=96, dtype="bfloat16"))
    assert result.losses[-1] < 0.1 < 1.0 < result.losses[0]
    after = greedy(homellm.load(default_gguf, ctx=256, adapter=tmp_path / "out"), QUESTION)
    assert "Quibblewick" in after, after


TOPICS = ["the sky", "grass", "snow", "a banana", "coal", "a tomato", "milk", "an orange",
          "a lemon", "chocolate", "blood", "ice"]
COLORS = ["blue", "green", "white", "yellow", "black", "red", "white", "orange",
          "yellow", "brown", "red", "white"]


def pairs(topics, colors):
    return [{"prompt": [{"role": "user", "content": f"What color is {t}?"}],
             "chosen": [{"role": "assistant", "content": f"{t.capitalize()} is {c}. Glad to help!"}],
             "rejected": [{"role": "assistant", "content": f"{t.capitalize()} is {c}. Whatever."}]}
            for t, c in zip(topics, colors)]


@pytest.mark.slow
def test_dpo_raises_the_margin_on_held_out_pairs(default_gguf, tmp_path):
    train_pairs, held_out = pairs(TOPICS[:8], COLORS[:8]), pairs(TOPICS[8:], COLORS[8:])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in train_pairs))
    config = TuneConfig(method="dpo", model=str(default_gguf), data=str(data), out=str(tmp_path / "out"),
                        lora=LoraConfig(rank=8, alpha=16), lr=1e-3, warmup_steps=1, max_steps=6,
                        batch_tokens=512, max_length=64, beta=0.1, dtype="bfloat16")
    result = dpo.train(config)
    assert result.losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start
    _, tokenizer, model = load_base(default_gguf, dtype="bfloat16")
    before = dpo.margins(model, tokenizer, held_out)
    from homellm.train.adapter import apply_adapter
    apply_adapter(model, tmp_path / "out")
    after = dpo.margins(model, tokenizer, held_out)
    assert (after > before).all(), (before, after)
    assert (after - before).mean() > 2.0, (before, after)
    assert result.losses[-1] < 0.3
