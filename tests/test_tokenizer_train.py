"""homellm tokenizer train: a byte-level BPE that round-trips any Unicode, reads back the same
from GGUF fields, renders its chat template; shards that hold exactly the documents' tokens."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from homellm.cli.main import main as cli
from homellm.data.shards import open_tokens, tokenize_corpus
from homellm.errors import HomellmError
from homellm.tokenizer import Tokenizer
from homellm.tokenizer import train as tok_train

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_fixtures import make_corpus, story  # noqa: E402

HARD = [
    "", " ", "  two  spaces ", "\n\n\t\r\n", "a\u0000b", "naïve café", "Cafe\u0301 (decomposed)",
    "日本語のテキスト、句読点。", "한국어 텍스트", "עברית ومرحبا بالعالم", "Ελληνικά", "👩‍👩‍👧‍👦 family 🇫🇷 flag",
    "emoji 🙂🙃 and \U0001F9D1\u200D\U0001F4BB", "math ∑∫√∞ ≠ ≤", "digits 1234567890 ١٢٣ ๑๒๓", "\ufeffbom",
    "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "tab\tand\u00a0nbsp", "\U0010FFFF\U000E0001",
    "x" * 300, "don't 've 're 's", "CamelCaseWords and snake_case_words", "\u200b\u200c\u200d",
]


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x80, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0xE000, 0xF8FF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            chars.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0x41))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("tok"), n_docs=80, vocab=400)


def test_round_trips_arbitrary_unicode_and_reads_the_same_from_gguf(corpus):
    tok = tok_train.load(corpus)
    assert tok.vocab_size == 400 and tok.bos_id == 0 and tok.add_bos
    from_gguf = Tokenizer.from_gguf_fields(tok.to_gguf_fields())  # what our runtime and llama.cpp read
    assert from_gguf.to_gguf_fields()["pre"] == "smollm"
    for text in HARD + random_strings(300, seed=1):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, repr(text)
        assert from_gguf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert tok.encode(text) == [tok.bos_id] + ids
    # learned merges: the corpus's words take fewer tokens than bytes
    text = story(random.Random(9), 3)
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_chat_template_is_chatml_with_an_assistant_mask(corpus):
    tok = tok_train.load(corpus)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.render_chat(messages, add_generation_prompt=False) == \
        "<|endoftext|><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    ids, mask = tok.encode_chat(messages)
    reply = tok.decode([i for i, m in zip(ids, mask) if m])
    assert reply == "Hello!<|im_end|>"
    assert tok.token_to_id("<|im_end|>") in tok.eos_ids


def test_shards_hold_exactly_the_tokens_of_the_kept_documents(corpus):
    tok = tok_train.load(corpus)
    data = open_tokens(corpus)
    for split, maps in (("train", data.train), ("val", data.val)):
        texts = [json.loads(line)["text"] for line in (corpus / f"{split}.jsonl").read_text().splitlines()]
        expected = np.concatenate([np.asarray([tok.bos_id] + tok.encode(t, add_special_tokens=False))
                                   for t in texts])
        got = np.concatenate([np.asarray(m) for m in maps])
        assert maps[0].dtype == np.uint16
        np.testing.assert_array_equal(got, expected)
        meta = data.index["splits"][split]
        assert meta["documents"] == len(texts) == int((got == tok.bos_id).sum())
        assert meta["bytes"] == sum(len(t.encode()) for t in texts)


def test_many_shards_and_uint32_for_a_large_vocabulary(corpus, tmp_path):
    import shutil
    work = tmp_path / "c"
    work.mkdir()
    for name in ("train.jsonl", "val.jsonl", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(corpus / name, work / name)
    tok = tok_train.load(work)
    tok.backend.add_tokens([f"<extra_{i}>" for i in range(66_000)])  # past 16 bits
    big = Tokenizer(tok.backend, bos_id=tok.bos_id, eos_id=tok.eos_id)
    index = tokenize_corpus(work, big, shard_tokens=500)
    assert index["dtype"] == "uint32" and len(index["splits"]["train"]["files"]) > 3
    a = np.concatenate([np.asarray(m) for m in open_tokens(work).train])
    b = np.concatenate([np.asarray(m) for m in open_tokens(corpus).train])
    np.testing.assert_array_equal(a.astype(np.int64), b.astype(np.int64))
    assert index["splits"]["train"]["tokens"] == len(a)


def test_vocabulary_larger_than_the_data_and_empty_corpus_are_errors(tmp_path):
    texts = ["abc abc abd"] * 3
    with pytest.raises(HomellmError, match=r"the corpus supports only \d+ tokens.*--vocab-size"):
        tok_train.train_tokenizer(texts, 5000)
    with pytest.raises(HomellmError, match="the corpus is empty"):
        tok_train.train_tokenizer([], 300)
    with pytest.raises(HomellmError, match="--vocab-size 100: expected at least"):
        tok_train.train_tokenizer(texts, 100)
    (tmp_path / "train.jsonl").write_text("")
    assert cli(["tokenizer", "train", str(tmp_path), "--vocab-size", "300"]) == 1
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("limit, what", [(500, "the shard"), (1000, "shards.json")])
def test_a_full_disk_leaves_no_shard_behind(corpus, limit, what):
    """RLIMIT_FSIZE makes a write fail as a full disk does (EFBIG instead of ENOSPC): at the
    first 600-byte shard, or after every shard is complete, at the index."""
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from homellm.data.shards import tokenize_corpus
from homellm.tokenizer import train
from homellm.errors import HomellmError
try:
    tokenize_corpus({str(corpus)!r}, train.load({str(corpus)!r}), shard_tokens=300)
except HomellmError as e:
    print(e)
    sys.exit(3)
"""
    before = sorted((corpus / "shards").iterdir())
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert run.returncode == 3, run.stderr
        assert f"cannot write {'the shard ' if what == 'the shard' else ''}" in run.stdout
        assert what in run.stdout
        assert sorted(p.name for p in (corpus / "shards").iterdir()) == []  # no half shard, no index
    finally:
        tokenize_corpus(corpus, tok_train.load(corpus))  # as it was, for the other tests
    assert [p.name for p in before] == sorted(p.name for p in (corpus / "shards").iterdir())


def test_cli_trains_and_tokenizes(tmp_path, capsys):
    from pretrain_fixtures import write_sources
    write_sources(tmp_path / "src", 60)
    assert cli(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "c")]) == 0
    assert cli(["tokenizer", "train", str(tmp_path / "c"), "--vocab-size", "320"]) == 0
    err = capsys.readouterr().err
    assert "MB/s" in err and "uint16" in err
    assert open_tokens(tmp_path / "c").vocab_size == 320
    config = json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok_train.CHAT_TEMPLATE
    assert cli(["tokenizer", "train", str(tmp_path / "c"), "--vocab-size", "99999"]) == 1
    assert "the corpus supports only" in capsys.readouterr().err
