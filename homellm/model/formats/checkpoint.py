"""What every format reader returns: the network's shape, its tensors, and its tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Any

import numpy as np

from homellm.model.config import ModelArgs

if TYPE_CHECKING:
    import torch


@dataclass
class GGMLTensor:
    """A tensor as a GGUF file stores it: raw quantized blocks, not yet dequantized.

    `data` is uint8 (rows, bytes_per_row), usually a read-only memory map of the file;
    `shape` is the logical shape in torch order, (out_features, in_features) for a weight.
    Rows hold whole blocks, so reordering rows (the Q/K rotary un-permutation) is lossless.
    """

    ggml_type: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray
    shape: tuple[int, ...]

    @property
    def type_name(self) -> str:
        import gguf
        return gguf.GGMLQuantizationType(self.ggml_type).name

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize_numpy(self) -> np.ndarray:
        """The float32 values these blocks encode (via the gguf package's reference code)."""
        import gguf
        values = gguf.quants.dequantize(np.asarray(self.data), gguf.GGMLQuantizationType(self.ggml_type))
        return np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape)

    def dequantize(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The float tensor these blocks encode, as torch (float32 unless `dtype` says)."""
        import torch
        return torch.from_numpy(self.dequantize_numpy()).to(dtype or torch.float32)


@dataclass
class TokenizerSource:
    """Where a tokenizer comes from: GGUF `tokenizer.ggml.*` fields, or HF files."""

    gguf_fields: dict | None = None  # key without the "tokenizer.ggml." prefix -> python value
    tokenizer_json: Path | None = None
    tokenizer_config: dict | None = None  # tokenizer_config.json (bos/eos tokens, chat_template)


@dataclass
class Checkpoint:
    """A model as read from disk, in HF names and layout (rotary already un-permuted)."""

    args: ModelArgs
    tensors: dict[str, Any]  # HF name -> torch.Tensor (floats) or GGMLTensor (blocks); numpy
                             # arrays for floats when read without torch (read_gguf as_numpy)
    tokenizer: TokenizerSource
    chat_template: str | None
    source: Path
    format: str  # "gguf" or "hf"
    metadata: dict = field(default_factory=dict)  # general.* (name, license, ...), file_type


def split_rows(t, sizes: list[int]) -> list:
    """A weight (or bias) cut into consecutive blocks of rows (out features) of `sizes`:
    Phi-3's and llama.cpp's fused qkv / gate_up tensors into their parts. Works on torch
    tensors, numpy arrays and GGMLTensor blocks (whole rows: exact, no dequantizing)."""
    if sum(sizes) != t.shape[0]:
        raise ValueError(f"cannot split {t.shape[0]} rows into {sizes}")
    out, at = [], 0
    for n in sizes:
        if isinstance(t, GGMLTensor):
            out.append(GGMLTensor(t.ggml_type, t.data[at:at + n], (n, *t.shape[1:])))
        else:
            out.append(t[at:at + n])
        at += n
    return out


def cat_rows(parts: list):
    """The inverse of split_rows: blocks of rows stacked into one tensor of the first part's kind
    (GGMLTensor blocks of one type stay blocks; mixed kinds become float32 numpy)."""
    if all(isinstance(p, GGMLTensor) for p in parts) and len({p.ggml_type for p in parts}) == 1:
        data = np.concatenate([np.asarray(p.data) for p in parts])
        return GGMLTensor(parts[0].ggml_type, data, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    if all(hasattr(p, "detach") for p in parts):
        import torch
        return torch.cat([p.detach() for p in parts])
    arrays = [p.dequantize_numpy() if isinstance(p, GGMLTensor) else
              (p.detach().float().numpy() if hasattr(p, "detach") else np.asarray(p, dtype=np.float32))
              for p in parts]
    return np.concatenate(arrays)
