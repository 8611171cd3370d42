"""Tiny corpora for the pretraining tests: text with structure a small model can learn
(a little grammar over a few hundred words), prepared, tokenized and sharded as the CLI does."""
from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = ["cat", "dog", "bird", "fish", "horse", "river", "tree", "house", "garden", "window",
         "teacher", "child", "farmer", "king", "queen", "ship", "mountain", "city", "book", "song"]
ADJS = ["small", "old", "green", "quiet", "happy", "dark", "bright", "tall", "cold", "gentle"]
VERBS = ["sees", "follows", "finds", "loves", "carries", "watches", "builds", "remembers"]
PLACES = ["near the sea", "in the morning", "under the bridge", "after the rain", "at night"]


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}.")


def story(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng) for _ in range(n))


def write_sources(folder: Path, n_docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stories.jsonl", "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": story(rng, rng.randint(4, 12))}) + "\n")
    return folder


def make_corpus(root: Path, n_docs: int = 120, vocab: int = 384, seed: int = 0) -> Path:
    """root/corpus: prepared, with a trained tokenizer and shards."""
    from homellm.data.prepare import PrepareConfig, Source, prepare
    from homellm.data.shards import tokenize_corpus
    from homellm.tokenizer import train as tok_train
    src = write_sources(root / "src", n_docs, seed)
    corpus = root / "corpus"
    prepare(PrepareConfig([Source("stories", [str(src)])], str(corpus), val_fraction=0.1,
                          dedup_threshold=0.9))
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    tok_train.save(tok_train.train_tokenizer(texts, vocab), corpus)
    tokenize_corpus(corpus, tok_train.load(corpus))
    return corpus
