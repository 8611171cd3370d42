"""Model file formats: one module each (gguf.py, hf.py), and the dispatch between them."""
from __future__ import annotations

from pathlib import Path

from homellm.errors import ModelFileError
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor, TokenizerSource

__all__ = ["Checkpoint", "GGMLTensor", "TokenizerSource", "open_checkpoint", "detect_format"]


def detect_format(path: Path) -> str:
    """'gguf' for a .gguf file (or a folder holding exactly one), 'hf' for a HF folder."""
    path = Path(path)
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot look it up ({e})") from None
    if not exists:
        raise ModelFileError(f"{path}: no such file or folder")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
        if magic == b"GGUF":
            return "gguf"
        raise ModelFileError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    if (path / "config.json").exists():
        return "hf"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    raise ModelFileError(f"{path}: a model folder needs config.json and *.safetensors "
                         "(Hugging Face layout) or exactly one .gguf file")


def open_checkpoint(path: Path, as_numpy: bool = False) -> Checkpoint:
    """Read a model from a GGUF file or a Hugging Face folder (tensors stay memory-mapped).
    as_numpy: GGUF float tensors as numpy arrays, never importing torch (the C runtime)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from homellm.model.formats.gguf import read_gguf
        if path.is_dir():
            path = next(path.glob("*.gguf"))
        return read_gguf(path, as_numpy)
    from homellm.model.formats.hf import read_hf
    return read_hf(path)
