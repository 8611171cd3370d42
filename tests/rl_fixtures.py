"""Tiny models for the reward model, PPO, GRPO and loop tests: made here, nothing downloaded.

    tok_dir = tiny_tokenizer(tmp / "tok")          # byte-level BPE of ~360 tokens, ChatML template
    model = tiny_model(tmp / "policy", tok_dir)     # a random Llama (hidden 64, 2 layers), HF folder

The tokenizer is trained (homellm.tokenizer.train) on sentences of a few dozen words, so that
each of those words is one token: a random model then says any one of them with a probability
near 1/360 a token, which is what the rare-word test needs (the base says it rarely, yet often
enough that sampling finds it).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from homellm.model.llama import ModelArgs

WORDS = ("the a sky sea grass snow milk coal lava sand fruit tree river stone bird cloud rain sun "
         "moon star blue green white black red yellow is was very quite and or but thanks please "
         "hello good bad yes no maybe zebra").split()
PROMPTS = ["What color is the sky?", "Tell me about the sea.", "Is snow white?", "Say hello.",
           "What is coal?", "Describe a tree.", "Where is the river?", "Name a bird.",
           "Is the sun a star?", "What about rain?", "Tell me about sand.", "Is milk good?",
           "Describe the moon.", "What is lava?", "Name a fruit.", "Is grass green?"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]
    return texts + PROMPTS * 5


def tiny_tokenizer(folder: Path, vocab_size: int = 360) -> Path:
    from homellm.tokenizer.train import save, train_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    save(train_tokenizer(corpus(), vocab_size), folder)
    return folder


def tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 64,
               layers: int = 2, embed_scale: float = 2.0) -> Path:
    """A random tiny Llama as a HF folder with the tokenizer of `tokenizer_dir`."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_fixtures import tiny_llama_state

    from homellm.model.formats.hf import write_hf
    tok_json = (tokenizer_dir / "tokenizer.json").read_text()
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = json.loads(tok_json)["model"]["vocab"]
    args = ModelArgs(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=len(vocab) + 3,
                     max_position_embeddings=256, tie_word_embeddings=True)
    state = tiny_llama_state(args, seed=seed)
    # a wider (tied) embedding than tiny_llama_state's 0.05: the final hidden state can then
    # make one token near certain, as a real model's head can (at 0.05 no token can pass ~6%)
    state["model.embed_tokens.weight"] *= embed_scale
    return write_hf(folder, args, state, dtype=torch.float32, tokenizer_json=tok_json,
                    tokenizer_config=tok_config, chat_template=tok_config["chat_template"])


def polite_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs whose chosen reply says "thanks" somewhere and whose rejected one does not (the
    same other words): a property a reward model must find anywhere in the reply."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in ("thanks", "zebra")]
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(plain) for _ in range(rng.randint(3, 7))]
            at = rng.randint(0, len(words))
            chosen = " ".join(words[:at] + ["thanks"] + words[at:])
            rejected = " ".join(words[:at] + [rng.choice(plain)] + words[at:])
            f.write(json.dumps({"prompt": rng.choice(PROMPTS), "chosen": chosen,
                                "rejected": rejected}) + "\n")
    return path


def prompts_file(path: Path, prompts: list[str]) -> Path:
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return path
