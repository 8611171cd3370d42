"""Public text -> a clean, deduplicated, mixed pretraining corpus (`homellm data prepare`).

The steps, in the order a document meets them (what each uses in brackets):
1. read: files and folders of .txt/.md, .jsonl/.json, .parquet, .gz/.zst (sources.py: stdlib
   gzip/json, pyarrow, zstandard); unreadable, binary or non-UTF-8 files are skipped and counted;
2. normalize: Unicode NFC, line ends to \\n, control characters out, other spaces to ' ',
   trailing spaces cut, at most one empty line in a row (stdlib unicodedata, re);
3. filter (ours, after Gopher's rules, Rae et al. 2021): too short / too long, not prose (too
   few letters), repeated lines, one word pair repeated;
4. exact dedup (BLAKE2b of the normalized text) then near dedup (MinHash LSH, datasketch; see
   dedup.py), across all sources, the first copy kept;
5. split train / validation by document, per source (a seeded draw);
6. mix: each source's share of the train text follows the recipe's weights, as the Pile mixes
   its parts: a source is repeated or subsampled by whole documents to reach its share.

Writes `train.jsonl` and `val.jsonl` ({"text", "source"} a line) and `report.json` into the
output folder, each written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homellm.data import sources as srcs
from homellm.data.dedup import NearDedup, exact_key
from homellm.errors import HomellmError

TRAIN, VAL, REPORT = "train.jsonl", "val.jsonl", "report.json"


@dataclass
class Source:
    name: str
    paths: list[str]
    weight: float | None = None  # share of the train mix (normalized over sources); None: as is


@dataclass
class Filters:
    min_chars: int = 100
    max_chars: int = 20_000_000
    min_letters: float = 0.4  # letters / non-space characters
    max_repeated_lines: float = 0.3  # characters in lines seen earlier in the doc / all line characters
    max_top_pair: float = 0.2  # characters of the most common word pair x its count / all word characters


@dataclass
class PrepareConfig:
    sources: list[Source]
    out: str
    dedup_threshold: float = 0.8  # MinHash Jaccard similarity; 0: no near dedup
    val_fraction: float = 0.01
    max_repeat: float = 4.0  # a source is used at most this many times over to reach its share
    seed: int = 0
    filters: Filters = field(default_factory=Filters)

    def __post_init__(self):
        if isinstance(self.filters, dict):
            self.filters = Filters(**self.filters)
        if not self.sources:
            raise HomellmError("no sources: give files or folders, or a --recipe")
        names = [s.name for s in self.sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise HomellmError(f"two sources are named {dup!r}: give each its own name")
        weights = [s.weight for s in self.sources]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise HomellmError("give every source a weight, or none (then each source is used once, as it is)")
        for s in self.sources:
            if s.weight is not None and (not isinstance(s.weight, (int, float)) or s.weight < 0
                                         or not math.isfinite(s.weight)):
                raise HomellmError(f"source {s.name!r}: weight {s.weight!r}: expected a number >= 0")
        if weights[0] is not None and sum(weights) <= 0:
            raise HomellmError("every source has weight 0: nothing to train on")
        if not 0 <= self.val_fraction < 1:
            raise HomellmError(f"val fraction {self.val_fraction}: expected 0 <= f < 1")
        if not 0 <= self.dedup_threshold <= 1:
            raise HomellmError(f"dedup threshold {self.dedup_threshold}: expected 0 (off) to 1")
        if self.max_repeat < 1:
            raise HomellmError(f"max repeat {self.max_repeat}: expected >= 1")


def read_recipe(path: Path) -> dict:
    """A recipe file (TOML or JSON): {"sources": [{"name", "paths" | "path", "weight"}], and
    optional dedup_threshold, val_fraction, max_repeat, seed, filters}. Paths may use $VARS,
    ~ and shell patterns (*, ?, [...]), and are relative to the recipe's folder. Returns PrepareConfig keywords (without `out`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HomellmError(f"{path}: cannot read the recipe ({e})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except Exception as e:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise HomellmError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                           f"recipe ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
        raise HomellmError(f"{path}: expected a list of sources ([[sources]] with name, paths, weight)")
    known = {"sources", "dedup_threshold", "val_fraction", "max_repeat", "seed", "filters"}
    unknown = set(data) - known
    if unknown:
        raise HomellmError(f"{path}: unknown field {sorted(unknown)[0]!r} (expected {', '.join(sorted(known))})")
    out = []
    for i, s in enumerate(data["sources"]):
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict):
            raise HomellmError(f"{where}: expected a table with name, paths and weight")
        paths = s.get("paths", [s["path"]] if "path" in s else None)
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise HomellmError(f"{where}: expected 'paths' (a list of files or folders) or 'path'")
        name = s.get("name") or Path(paths[0]).name
        weight = s.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise HomellmError(f"{where}: weight {weight!r}: expected a number")
        paths = [os.path.expanduser(os.path.expandvars(p)) for p in paths]  # $WORK/..., ~/...
        paths = [str(path.parent / p) if not Path(p).is_absolute() else p for p in paths]
        expanded = []
        for p in paths:  # shell patterns: /usr/share/doc/*/README*
            if any(c in p for c in "*?["):
                matches = sorted(glob.glob(p))
                if not matches:
                    raise HomellmError(f"{where}: {p} matches no file")
                expanded += matches
            else:
                expanded.append(p)
        paths = expanded
        out.append(Source(str(name), paths, None if weight is None else float(weight)))
    kw = {k: v for k, v in data.items() if k != "sources"}
    if "filters" in kw:
        try:
            kw["filters"] = Filters(**kw["filters"])
        except TypeError as e:
            raise HomellmError(f"{path}: filters: {e}") from None
    return {"sources": out, **kw}


# ---------------------------------------------------------------- normalize and filter

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\u2028\u2029\x85]")
_SPACES = re.compile(r"[^\S \n\t]")  # every whitespace but ' ', newline and tab (then ' ')
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")
_NOT_LETTER = re.compile(r"[\W\d_]+")
_NON_SPACE = re.compile(r"\s+")
_WORDS = re.compile(r"\w+")
_ASCII_SPACE = b" \t\n\r\x0b\x0c"
_ASCII_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize(text: str) -> str:
    """NFC, \\n line ends, no control characters, ' ' for other spaces, no trailing spaces,
    at most one empty line in a row, no leading or trailing blank."""
    text = unicodedata.normalize("NFC", text)
    text = _BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text + "\n")
    return _BLANKS.sub("\n\n", text).strip()


def filter_reason(text: str, f: Filters) -> str | None:
    """Why a normalized document is removed, or None to keep it."""
    n = len(text)
    if n < f.min_chars:
        return "too short"
    if n > f.max_chars:
        return "too long"
    if text.isascii():  # bytes.translate deletes at C speed (the regexes below: ~1 MB/s)
        raw = text.encode("ascii")
        visible = len(raw.translate(None, _ASCII_SPACE))
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    else:
        visible = len(_NON_SPACE.sub("", text))
        letters = len(_NOT_LETTER.sub("", text))
    if letters < f.min_letters * visible:
        return "not prose (few letters)"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 5:
        seen, repeated, total = set(), 0, 0
        for ln in lines:
            total += len(ln)
            if ln in seen:
                repeated += len(ln)
            seen.add(ln)
        if repeated > f.max_repeated_lines * total:
            return "repeated lines"
    words = _WORDS.findall(text)
    if len(words) >= 50:
        pair, count = Counter(zip(words, words[1:])).most_common(1)[0]
        if count > 1 and count * (len(pair[0]) + len(pair[1])) > f.max_top_pair * sum(map(len, words)):
            return "repeated words"
    return None


# ---------------------------------------------------------------- the run

@dataclass
class SourceReport:
    name: str
    weight: float | None
    documents: int = 0
    bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    removed: dict = field(default_factory=dict)  # reason -> documents
    skipped: dict = field(default_factory=dict)  # reason -> files or records not read
    skipped_examples: list = field(default_factory=list)
    val_documents: int = 0
    val_bytes: int = 0
    train_documents: int = 0  # in train.jsonl, repeats counted
    train_bytes: int = 0
    repeat: float = 0.0  # train bytes / this source's kept train bytes
    share: float = 0.0  # of all train bytes


@dataclass
class Report:
    out: str
    sources: list[SourceReport]
    seconds: float
    read_bytes: int
    train_documents: int
    train_bytes: int
    val_documents: int
    val_bytes: int
    near_dedup: str  # what did it

    @property
    def mb_per_s(self) -> float:
        return self.read_bytes / 1e6 / max(self.seconds, 1e-9)

    def to_json(self) -> dict:
        return {**asdict(self), "mb_per_s": self.mb_per_s}


def _check_out(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise HomellmError(f"{out}: exists and is not a folder")
    if out.is_dir() and any((out / n).exists() for n in (TRAIN, VAL)):
        raise HomellmError(f"{out}: already holds a prepared corpus ({TRAIN}); choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HomellmError(f"cannot create {out}: {e.strerror or e}") from None
    return out


class _Kept:
    """Kept documents of one source in a scratch JSONL file: (offset, length, bytes) each."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.index: list[tuple[int, int, int]] = []

    def add(self, text: str):
        line = (json.dumps(text, ensure_ascii=False) + "\n").encode("utf-8")
        self.index.append((self.f.tell(), len(line), len(text.encode("utf-8"))))
        self.f.write(line)

    def reader(self):
        self.f.close()
        return open(self.path, "rb")


def _split(n: int, fraction: float, rng: random.Random) -> set[int]:
    """Indices of the validation documents: round(fraction x n), at least one when the
    fraction is not 0 and the source has two documents or more."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(fraction * n)))
    return set(rng.sample(range(n), k))


def _mix_counts(sizes: list[int], multiplier: float, rng: random.Random) -> list[int]:
    """How many times each document goes into the mix so that their bytes come to
    multiplier x sum(sizes): every document floor(m) times, then whole documents in a seeded
    order until the remainder is reached (the last one taken if that lands nearer)."""
    whole = math.floor(multiplier + 1e-9)
    counts = [whole] * len(sizes)
    target = (multiplier - whole) * sum(sizes)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    got = 0
    for i in order:
        if got >= target:
            break
        if got + sizes[i] / 2 > target:  # taking it would overshoot more than stopping
            break
        counts[i] += 1
        got += sizes[i]
    return counts


def prepare(config: PrepareConfig, progress=None) -> Report:
    """Run the steps above; `progress(dict)` as bytes are read and documents written."""
    t0 = time.perf_counter()
    out = _check_out(Path(config.out))
    for s in config.sources:  # every path checked before anything slow
        for p in s.paths:
            if not Path(p).exists():
                raise HomellmError(f"source {s.name!r}: {p}: no such file or folder")
    near = NearDedup(config.dedup_threshold) if config.dedup_threshold > 0 else None
    exact: set[bytes] = set()
    reports, kept = [], []
    scratch = out / ".prepare-scratch"
    scratch.mkdir(exist_ok=True)
    read_bytes = 0
    try:
        for si, source in enumerate(config.sources):
            rep = SourceReport(source.name, source.weight)
            skips = srcs.Skips()
            store = _Kept(scratch / f"{si}.jsonl")
            removed: Counter = Counter()
            for path in source.paths:
                for doc in srcs.documents(Path(path), skips):
                    rep.documents += 1
                    rep.bytes += doc.nbytes
                    read_bytes += doc.nbytes
                    text = normalize(doc.text)
                    reason = filter_reason(text, config.filters)
                    if reason is None:
                        key = exact_key(text)
                        if key in exact:
                            reason = "exact duplicate"
                        else:
                            exact.add(key)
                            if near is not None and near.seen(key, text):
                                reason = "near duplicate"
                    if reason is not None:
                        removed[reason] += 1
                    else:
                        store.add(text)
                    if progress is not None:
                        progress({"stage": "read", "source": source.name, "bytes": doc.nbytes})
            rep.removed = dict(removed.most_common())
            rep.skipped = dict(skips.counts.most_common())
            rep.skipped_examples = skips.examples
            rep.kept = len(store.index)
            rep.kept_bytes = sum(b for _, _, b in store.index)
            reports.append(rep)
            kept.append(store)
        result = _write(config, out, reports, kept, progress)
    finally:
        for store in kept:
            store.f.close()
        for f in scratch.glob("*"):
            f.unlink()
        scratch.rmdir()
    seconds = time.perf_counter() - t0
    report = Report(str(out), reports, seconds, read_bytes, *result,
                    near_dedup=f"datasketch MinHashLSH (threshold {config.dedup_threshold}, "
                               f"{near.num_perm} permutations, word {5}-grams)" if near else "off")
    _atomic_text(out / REPORT, json.dumps({"config": _config_json(config), **report.to_json()},
                                          indent=2, ensure_ascii=False) + "\n")
    return report


def _config_json(config: PrepareConfig) -> dict:
    return asdict(config)


def _write(config: PrepareConfig, out: Path, reports: list[SourceReport], kept: list[_Kept],
           progress) -> tuple[int, int, int, int]:
    rng = random.Random(config.seed)
    val_sets = [_split(len(k.index), config.val_fraction, rng) for k in kept]
    train_sizes = [[b for i, (_, _, b) in enumerate(k.index) if i not in v] for k, v in zip(kept, val_sets)]
    train_ids = [[i for i in range(len(k.index)) if i not in v] for k, v in zip(kept, val_sets)]
    totals = [sum(s) for s in train_sizes]
    if sum(totals) == 0:
        why = "; ".join(f"{r.name}: {r.documents} documents read, {r.kept} kept"
                        + (f" (removed: {', '.join(f'{k} {v}' for k, v in r.removed.items())})" if r.removed else "")
                        + (f" (skipped: {', '.join(f'{k} {v}' for k, v in r.skipped.items())})" if r.skipped else "")
                        for r in reports)
        raise HomellmError(f"the corpus is empty: no document is left to train on ({why})")
    # multipliers: natural (each source once) or shares from the weights
    weighted = config.sources[0].weight is not None
    if weighted:
        wsum = sum(s.weight for s in config.sources)
        shares = [s.weight / wsum for s in config.sources]
        for s, share, total in zip(config.sources, shares, totals):
            if share > 0 and total == 0:
                raise HomellmError(f"source {s.name!r} has weight {s.weight:g} but no document "
                                   f"left to train on (see the report); give it weight 0 or fix it")
        size = min(config.max_repeat * total / share for share, total in zip(shares, totals) if share > 0)
        multipliers = [share * size / total if total else 0.0 for share, total in zip(shares, totals)]
    else:
        multipliers = [1.0 if t else 0.0 for t in totals]
    entries = []  # (source, document index) for each train document, repeats included
    for si, (sizes, ids, m) in enumerate(zip(train_sizes, train_ids, multipliers)):
        counts = _mix_counts(sizes, m, random.Random(config.seed * 7919 + si))
        for i, c in zip(ids, counts):
            entries += [(si, i)] * c
        reports[si].repeat = m
    random.Random(config.seed).shuffle(entries)
    readers = [k.reader() for k in kept]
    try:
        train = _write_jsonl(out / TRAIN, entries, kept, readers, config, reports, "train", progress)
        val_entries = [(si, i) for si, v in enumerate(val_sets) for i in sorted(v)]
        val = _write_jsonl(out / VAL, val_entries, kept, readers, config, reports, "val", progress)
    finally:
        for r in readers:
            r.close()
    for r in reports:
        r.share = r.train_bytes / max(train[1], 1)
    return train[0], train[1], val[0], val[1]


def _write_jsonl(path: Path, entries, kept, readers, config, reports, split, progress) -> tuple[int, int]:
    tmp = path.with_name(f".{path.name}.tmp")
    n_bytes = 0
    try:
        with open(tmp, "wb") as f:
            for si, i in entries:
                offset, length, nbytes = kept[si].index[i]
                readers[si].seek(offset)
                text_json = readers[si].read(length).rstrip(b"\n")
                name = json.dumps(config.sources[si].name, ensure_ascii=False).encode("utf-8")
                f.write(b'{"text": ' + text_json + b', "source": ' + name + b"}\n")
                n_bytes += nbytes
                rep = reports[si]
                if split == "train":
                    rep.train_documents += 1
                    rep.train_bytes += nbytes
                else:
                    rep.val_documents += 1
                    rep.val_bytes += nbytes
                if progress is not None:
                    progress({"stage": split, "bytes": nbytes})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None
    return len(entries), n_bytes


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None
