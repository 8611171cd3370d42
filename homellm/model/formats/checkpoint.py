"""What every format reader returns: the network's shape, its tensors, and its tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from homellm.model.config import ModelArgs


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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor these blocks encode (via the gguf package's reference code)."""
        import gguf
        values = gguf.quants.dequantize(np.asarray(self.data), gguf.GGMLQuantizationType(self.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(dtype)


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
    tensors: dict[str, torch.Tensor | GGMLTensor]
    tokenizer: TokenizerSource
    chat_template: str | None
    source: Path
    format: str  # "gguf" or "hf"
    metadata: dict = field(default_factory=dict)  # general.* (name, license, ...), file_type
