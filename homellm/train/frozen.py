"""Frozen quantized base layers for LoRA training (the QLoRA recipe, Dettmers et al. 2023).

The base weights stay int8 or int4 in memory; the adapters train in float32. Gradients must
still flow to the input through the frozen weight (dL/dx = dL/dy W), so each layer
dequantizes its weight for the forward matmul and again in the backward, one layer at a
time, and keeps no float copy: `FrozenMatmul` saves nothing for backward but the layer.

- int8: engine/quant.py's Int8Linear storage (one symmetric scale per output row).
- int4: `Int4Weight` here: 4-bit codes, two per byte, with a float32 scale and zero per group
  of 32 inputs, w = (q - 8) s + z (the convention of engine/quant.py): 0.75 bytes per weight. From a GGUF Q4_0, Q4_1 or Q4_K tensor the codes, scales and zeros are the
  file's own (`ggml_int4_codes`: equal to the file's dequantized values up to one float32
  rounding of z); from float weights, per-group min/max.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from homellm.engine.quant import INT4_TYPES, Int8Linear, _dequantize_rows, ggml_int4_codes
from homellm.model.formats.checkpoint import GGMLTensor

GROUP = 32


class Int4Weight(nn.Module):
    """An (out, in) weight as uint8 codes (out, in/2), float32 scales and zeros (out, in/32)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // GROUP, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(out_features, in_features // GROUP, dtype=torch.float32))

    def _fill(self, r0: int, q: Tensor, s: Tensor, z: Tensor):
        """Codes q (R, K) in 0..15 and s, z (R, K/32) into rows r0..r0+R."""
        rows = slice(r0, r0 + q.shape[0])
        pairs = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
        self.codes[rows] = pairs[..., 0] | (pairs[..., 1] << 4)
        self.scales[rows], self.zeros[rows] = s.float(), z.float()

    @classmethod
    def from_float(cls, weight: Tensor, rows_per_chunk: int = 4096) -> "Int4Weight":
        N, K = weight.shape
        layer = cls(K, N)
        for r0 in range(0, N, rows_per_chunk):
            w = weight[r0:r0 + rows_per_chunk].detach().float().reshape(-1, K // GROUP, GROUP)
            lo, hi = w.amin(-1), w.amax(-1)  # (R, K/32)
            s = (hi - lo) / 15
            z = lo + 8 * s
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
            q = ((w - z[..., None]) * inv[..., None] + 8).round().clamp(0, 15)
            layer._fill(r0, q.reshape(-1, K), s, z)
        return layer

    @classmethod
    def from_ggml(cls, t: GGMLTensor, rows_per_chunk: int = 4096) -> "Int4Weight":
        """The file's own codes, scales and zeros of Q4_0 / Q4_1 / Q4_K blocks."""
        N, K = t.shape
        layer = cls(K, N)
        for r0 in range(0, N, rows_per_chunk):
            layer._fill(r0, *ggml_int4_codes(t, slice(r0, r0 + rows_per_chunk)))
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = torch.stack((self.codes & 0x0F, self.codes >> 4), dim=-1).reshape(self.out_features, -1, GROUP)
        w = (q.to(dtype) - 8) * self.scales.to(dtype)[..., None] + self.zeros.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)


class FrozenMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class FrozenQuantLinear(nn.Module):
    """A frozen linear over int8 or int4 storage (anything with `dequantize(dtype)`)."""

    def __init__(self, weight: nn.Module, bias: Tensor | None = None):
        super().__init__()
        self.weight_q = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_tensor(cls, t: Tensor | GGMLTensor, mode: str, bias: Tensor | None = None) -> "FrozenQuantLinear":
        """mode "int8" or "int4"; a GGUF Q4 tensor goes to int4 without a float detour."""
        if mode == "int4" and isinstance(t, GGMLTensor) and t.ggml_type in INT4_TYPES:
            return cls(Int4Weight.from_ggml(t), bias)
        if isinstance(t, GGMLTensor):
            t = _dequantize_rows(t, slice(None)).reshape(t.shape)
        if mode == "int4" and t.shape[1] % GROUP == 0:
            return cls(Int4Weight.from_float(t), bias)
        # float32 scales: the dequantized weight is the int8 code times an exact float32 scale
        return cls(Int8Linear.from_float(t, dtype=torch.float32), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight_q.dequantize(dtype)

    def extra_repr(self) -> str:
        kind = "int4" if isinstance(self.weight_q, Int4Weight) else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"

    def forward(self, x: Tensor) -> Tensor:
        y = FrozenMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class BF16Linear(nn.Module):
    """A frozen linear stored and multiplied in bfloat16, taking and returning float32.

    What autocast does for a linear (bfloat16 matmul, float32 around it), without keeping a
    float32 master copy of a weight that never trains: half the memory, and on CPUs with
    AVX512-BF16 about 3x the matmul speed of float32 (benchmarks/tune_vs_trl.py)."""

    compute_dtype = torch.bfloat16

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)


class BF16Embedding(nn.Module):
    """An embedding table in bfloat16 whose rows come out as float32 (it may share its table
    with a tied BF16Linear head)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.nn.functional.embedding(ids, self.weight).float()
