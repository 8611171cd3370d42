"""homellm data prepare: readers, normalization, filters, exact and near dedup, the weighted
mix and the report, on small corpora made here."""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

from homellm.cli.main import main as cli
from homellm.data.prepare import (Filters, PrepareConfig, Source, filter_reason, normalize, prepare,
                                  read_recipe)
from homellm.errors import HomellmError

_R = random.Random(99)
WORDS = ["".join(_R.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_R.randint(2, 9))) for _ in range(3000)]


def doc(rng: random.Random, n_words: int = 150) -> str:
    """A random 'sentence' text: distinct documents share almost no 5-grams."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 15]) + "." for i in range(0, n_words, 15)]
    return "\n".join(lines)


def near_copy(text: str, rng: random.Random, edits: int = 2) -> str:
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def read_train(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def test_dedup_removes_planted_exact_and_near_duplicates_and_keeps_the_rest(tmp_path):
    rng = random.Random(0)
    distinct = [doc(rng) for _ in range(40)]
    exact = [distinct[i] for i in (3, 7, 11, 20, 33)]
    near = [near_copy(distinct[i], rng) for i in (1, 5, 9, 14, 30, 38)]
    folder = tmp_path / "src"
    folder.mkdir()
    for i, text in enumerate(distinct[:20]):
        (folder / f"{i:03d}.txt").write_text(text)
    with open(folder / "more.jsonl", "w") as f:  # the rest, then the copies, in a second format
        for text in distinct[20:] + exact + near:
            f.write(json.dumps({"text": text}) + "\n")
    # the same text with other whitespace and a decomposed character is an exact duplicate too
    (folder / "zz.md").write_text(distinct[0].replace("\n", "  \r\n") + "\n\n\n\n")
    report = prepare(PrepareConfig([Source("src", [str(folder)])], str(tmp_path / "out"),
                                   val_fraction=0.0))
    kept = [r["text"] for r in read_train(tmp_path / "out")]
    assert sorted(kept) == sorted(distinct)  # each distinct document once, nothing else
    rep = report.sources[0]
    assert rep.documents == 40 + 5 + 6 + 1
    assert rep.removed == {"exact duplicate": 6, "near duplicate": 6}
    assert rep.kept == 40


def test_near_dedup_threshold_is_an_option(tmp_path):
    rng = random.Random(1)
    base = doc(rng, 100)
    far = near_copy(base, rng, edits=12)  # ~12 x 5 of ~96 shingles differ: Jaccard ~0.25-0.5
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in (base, far)))
    strict = prepare(PrepareConfig([Source("a", [str(src)])], str(tmp_path / "o1"), val_fraction=0))
    loose = prepare(PrepareConfig([Source("a", [str(src)])], str(tmp_path / "o2"), val_fraction=0,
                                  dedup_threshold=0.2))
    assert strict.sources[0].kept == 2
    assert loose.sources[0].kept == 1 and loose.sources[0].removed == {"near duplicate": 1}


@pytest.mark.parametrize("shares", [(0.7, 0.3), (0.2, 0.8)])
def test_mixing_weights_give_the_asked_proportions(tmp_path, shares):
    rng = random.Random(2)
    sizes = {"big": 300, "small": 80}
    sources = []
    for (name, n), weight in zip(sizes.items(), shares):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": doc(rng, rng.randint(40, 200))}) + "\n"
                                for _ in range(n)))
        sources.append(Source(name, [str(path)], weight))
    report = prepare(PrepareConfig(sources, str(tmp_path / "out"), val_fraction=0.05))
    rows = read_train(tmp_path / "out")
    total = sum(len(r["text"].encode()) for r in rows)
    for (name, _), share in zip(sizes.items(), shares):
        got = sum(len(r["text"].encode()) for r in rows if r["source"] == name) / total
        assert abs(got - share) < 0.02, (name, got, share)
        rep = next(r for r in report.sources if r.name == name)
        assert abs(rep.share - got) < 1e-9
    # validation documents are held out of train, by document
    val = [json.loads(line)["text"] for line in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    assert val and not set(val) & {r["text"] for r in rows}


def test_readers_and_skipped_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    rng = random.Random(3)
    texts = [doc(rng, 60) for _ in range(7)]
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(texts[0])
    (d / "b.md.gz").write_bytes(gzip.compress(texts[1].encode()))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"text": texts[2]}) + "\n" + json.dumps({"no_text": 1}) + "\n").encode()))
    (d / "sub" / "d.json").write_text(json.dumps([{"text": texts[3]}, {"text": texts[4]}]))
    pq.write_table(pa.table({"text": [texts[5], texts[6]]}), d / "sub" / "e.parquet")
    (d / "binary.txt").write_bytes(b"abc\x00\x01\x02" * 50)
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (d / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (d / "image.png").write_bytes(b"\x89PNG....")
    (d / "manual.ps.gz").write_bytes(gzip.compress(b"%!PS-Adobe-3.0 " + texts[0].encode()))  # not text
    (d / "changelog.Debian.gz").write_bytes(gzip.compress(texts[0].encode()))  # text: a duplicate
    report = prepare(PrepareConfig([Source("src", [str(d)])], str(tmp_path / "out"), val_fraction=0))
    assert sorted(r["text"] for r in read_train(tmp_path / "out")) == sorted(texts)
    skipped = report.sources[0].skipped
    assert skipped["binary (NUL bytes)"] == 1
    assert any(k.startswith("not UTF-8") for k in skipped)
    assert any(k.startswith("unreadable") for k in skipped)
    assert sum(v for k, v in skipped.items() if k.startswith("unknown file type")) == 2
    assert report.sources[0].removed == {"exact duplicate": 1}
    assert skipped["no string 'text' field"] == 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["sources"][0]["kept"] == 7 and saved["mb_per_s"] > 0


def test_normalize_and_filters():
    assert normalize("Cafe\u0301\r\nline  \t\r\n\n\n\nend\u00a0x\x07") == "Caf\u00e9\nline\n\nend x"
    f = Filters()
    assert filter_reason("short", f) == "too short"
    assert filter_reason("12 34 56 78 90 ## !! " * 20, f) == "not prose (few letters)"
    assert filter_reason("\n".join(["the same line of text"] * 10), f) == "repeated lines"
    assert filter_reason("buy now " * 100, f) == "repeated words"
    assert filter_reason(doc(random.Random(4)), f) is None


def test_empty_corpus_and_bad_recipes_are_clear_errors(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("too short")
    with pytest.raises(HomellmError, match="the corpus is empty.*too short 1"):
        prepare(PrepareConfig([Source("tiny", [str(src)])], str(tmp_path / "out")))
    assert not (tmp_path / "out" / "train.jsonl").exists()
    with pytest.raises(HomellmError, match="no such file"):
        prepare(PrepareConfig([Source("x", [str(tmp_path / "missing")])], str(tmp_path / "o2")))
    bad = tmp_path / "r.toml"
    bad.write_text("[[sources]]\nname = 'a'\nweight = 'lots'\npaths = ['x']\n")
    with pytest.raises(HomellmError, match=r"sources\[0\]: weight 'lots'"):
        read_recipe(bad)
    bad.write_text("[[sources]\n")
    with pytest.raises(HomellmError, match="not a valid TOML"):
        read_recipe(bad)
    bad.write_text("[[sources]]\npaths = ['$HOMELLM_TEST_DIR/*.txt']\n")
    os.environ["HOMELLM_TEST_DIR"] = str(tmp_path)
    try:
        assert read_recipe(bad)["sources"][0].paths == [str(src)]  # $VARS and patterns
        bad.write_text("[[sources]]\npaths = ['$HOMELLM_TEST_DIR/*.nothing']\n")
        with pytest.raises(HomellmError, match="matches no file"):
            read_recipe(bad)
    finally:
        del os.environ["HOMELLM_TEST_DIR"]
    with pytest.raises(HomellmError, match="give every source a weight, or none"):
        PrepareConfig([Source("a", ["x"], 1.0), Source("b", ["y"])], "o")


def test_cli_with_a_recipe(tmp_path, capsys):
    rng = random.Random(5)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        for i in range(30):
            (tmp_path / name / f"{i}.txt").write_text(doc(rng, 80))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('val_fraction = 0.1\n[[sources]]\nname = "one"\npaths = ["one"]\nweight = 1\n'
                      '[[sources]]\nname = "two"\npaths = ["two"]\nweight = 3\n')
    assert cli(["data", "prepare", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "one" in err and "two" in err and "MB/s" in err and "train:" in err
    assert cli(["data", "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    # the same output folder twice: refused, the first corpus kept
    assert cli(["data", "prepare", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 1
    assert "already holds a prepared corpus" in capsys.readouterr().err
