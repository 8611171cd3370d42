"""Raw text in: documents from .txt/.md, .jsonl/.json, .parquet files, compressed or not.

`documents(path)` walks a file or a folder (sorted, recursively) and yields each document's
text with where it came from. A file that cannot be read, is not UTF-8, or holds binary data
(NUL bytes) is skipped and counted by reason in a `Skips` tally, never an exception: one bad
file in a folder of thousands does not stop a run.

- `.txt`, `.md` (and `.rst`, `.text`): the whole file is one document.
- `.jsonl`: one JSON object a line, its `text` field a document (lines without one are counted).
- `.json`: an object with `text`, or a list of such objects.
- `.parquet`: the `text` column, read a row group at a time with pyarrow.
- `.gz` (gzip, stdlib) and `.zst` (zstandard) wrap any of the above: `books.jsonl.zst`.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from homellm.errors import HomellmError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
COMPRESSED = {".gz", ".zst"}
KNOWN = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}
# inside a .gz/.zst, a name without a known suffix is text (changelog.Debian.gz, README.gz)
# unless its suffix says it is something else
NOT_TEXT = {".pdf", ".ps", ".eps", ".dvi", ".tar", ".zip", ".html", ".htm", ".xml", ".svg",
            ".png", ".jpg", ".jpeg", ".gif", ".ico", ".js", ".css", ".bin", ".db", ".sqlite",
            ".doc", ".docx", ".odt", ".epub", ".wasm", ".so", ".a", ".o", ".pyc", ".class", ".jar"}


@dataclass
class Skips:
    """Files and records skipped while reading, counted by reason, with a few examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str):
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


@dataclass
class RawDoc:
    text: str
    where: str  # FILE or FILE:LINE
    nbytes: int  # UTF-8 bytes as read


def _kind(path: Path) -> tuple[str | None, str | None]:
    """(format suffix, compression suffix) of a file name; (None, None) when unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else None
    rest = suffixes[:-1] if comp else suffixes
    fmt = rest[-1] if rest and rest[-1] in KNOWN else None
    if fmt is None and comp and not (rest and rest[-1] in NOT_TEXT):  # `notes.gz`: text inside
        fmt = ".txt"
    return fmt, comp


def files_of(path: Path) -> list[Path]:
    """The readable-looking files under `path` (itself if a file), sorted; HomellmError if
    the path does not exist."""
    path = Path(path)
    if not path.exists():
        raise HomellmError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    out = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return out


def _open_bytes(path: Path, comp: str | None):
    raw = open(path, "rb")
    if comp == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise HomellmError(f"{path}: reading .zst needs the zstandard package "
                               f"(pip install 'homellm[pretrain]')") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _decode(data: bytes, where: str, skips: Skips) -> str | None:
    if b"\x00" in data:
        skips.add("binary (NUL bytes)", where)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.add(f"not UTF-8 (byte 0x{data[e.start]:02x} at {e.start})", where)
        return None


def _json_texts(value, where: str, skips: Skips) -> Iterator[str]:
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else None
        if isinstance(text, str):
            yield text
        else:
            skips.add("no string 'text' field", f"{where}[{i}]" if isinstance(value, list) else where)


def documents(path: Path, skips: Skips) -> Iterator[RawDoc]:
    """Every document under `path` (a file or folder), in sorted file order."""
    for f in files_of(path):
        yield from file_documents(f, skips)


def file_documents(path: Path, skips: Skips) -> Iterator[RawDoc]:
    fmt, comp = _kind(path)
    where = str(path)
    if fmt is None:
        skips.add("unknown file type", where)
        return
    try:
        if fmt == ".parquet":
            yield from _parquet(path, comp, skips)
            return
        with _open_bytes(path, comp) as f:
            if fmt == ".jsonl" or fmt == ".ndjson":
                for n, line in enumerate(io.BufferedReader(f) if comp else f, 1):
                    if not line.strip():
                        continue
                    text = _decode(line, f"{where}:{n}", skips)
                    if text is None:
                        continue
                    try:
                        value = json.loads(text)
                    except (json.JSONDecodeError, RecursionError):
                        skips.add("not JSON", f"{where}:{n}")
                        continue
                    for t in _json_texts(value, f"{where}:{n}", skips):
                        yield RawDoc(t, f"{where}:{n}", len(line))
                return
            data = f.read()
    except (OSError, EOFError) as e:
        skips.add(f"unreadable ({getattr(e, 'strerror', None) or e})", where)
        return
    except Exception as e:  # zstandard.ZstdError and friends: a corrupt archive
        if type(e).__module__.startswith(("zstandard", "gzip", "zlib")):
            skips.add(f"unreadable ({e})", where)
            return
        raise
    text = _decode(data, where, skips)
    if text is None:
        return
    if fmt == ".json":
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            skips.add("not JSON", where)
            return
        for t in _json_texts(value, where, skips):
            yield RawDoc(t, where, len(t.encode("utf-8")))
        return
    yield RawDoc(text, where, len(data))


def _parquet(path: Path, comp: str | None, skips: Skips) -> Iterator[RawDoc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HomellmError(f"{path}: reading .parquet needs pyarrow (pip install 'homellm[pretrain]')") from None
    where = str(path)
    if comp:
        skips.add("compressed parquet (parquet compresses itself; give the .parquet file)", where)
        return
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid, OSError
        skips.add(f"unreadable parquet ({e})", where)
        return
    if "text" not in pf.schema_arrow.names:
        skips.add(f"no 'text' column (columns: {', '.join(pf.schema_arrow.names[:8])})", where)
        return
    row = 0
    for g in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
        except Exception as e:
            skips.add(f"unreadable row group {g} ({e})", where)
            continue
        for text in column:
            row += 1
            if isinstance(text, str):
                yield RawDoc(text, f"{where}#{row}", len(text.encode("utf-8")))
            else:
                skips.add("no string 'text' value", f"{where}#{row}")
