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
