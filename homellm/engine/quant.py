"""Runtime quantized layers: int4 and int8 linears, and an embedding that stays in GGUF blocks.

Policy (what `linear_from_ggml` builds from a GGUF tensor):

| GGUF type            | runtime layer | exact?                                              |
|----------------------|---------------|-----------------------------------------------------|
| Q4_0, Q4_1, Q4_K     | Int4Linear    | yes: same 4-bit codes, one (scale, zero) per 32     |
| every other quantized| Int8Linear    | no: dequantized, then requantized per output row    |
| F32, F16, BF16       | nn.Linear     | yes                                                 |

Int4 maps exactly because torch's CPU kernel computes W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]
for groups g of `group_size` along k (ggml-quants.c block formulas, GGUF spec):
  Q4_0: w = d * (q - 8)             -> s = d,      z = 0
  Q4_1: w = d * q + m               -> s = d,      z = m + 8 d
  Q4_K: w = d sc_j q - dmin m_j     -> s = d sc_j, z = 8 d sc_j - dmin m_j   (sub-block j of 32)
Int8 uses torch's per-output-channel kernel, so Q8_0's per-32 scales are folded into one scale
per row: each weight moves by at most rowmax / 254 (see tests/test_quant.py for measured bounds).

Compute dtype. The kernels take activations and scales in one dtype. On this CPU (torch 2.13,
AVX512-BF16) the float32 variants are reference loops, 15-250x slower than bfloat16 and slower
than a dense float32 F.linear (benchmarks/quant_kernels.py), so the layers default to bfloat16:
scales are stored in bfloat16 and activations cast to it (outputs carry ~2^-9 relative rounding).
`dtype=torch.float32` keeps float32 scales and reproduces `GGMLTensor.dequantize()` to ~1e-6
relative; use it as the reference path. The packed codes are the same either way.

CUDA: int4 packing differs there (`_convert_weight_to_int4pack` with inner k tiles) and is not
implemented; `linear_from_ggml(..., device="cuda")` returns a dense bfloat16 nn.Linear instead,
and the int layers raise NotImplementedError on CUDA input.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from homellm.model.formats.checkpoint import GGMLTensor

# GGUF type ids (gguf.GGMLQuantizationType), spelled out so this module imports without gguf.
F32, F16, Q4_0, Q4_1, Q8_0, BF16, Q4_K = 0, 1, 2, 3, 8, 30, 12
INT4_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q4_K: "Q4_K"}
FLOAT_TYPES = {F32, F16, BF16}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
ROWS_PER_CHUNK = 4096  # rows converted at a time (a multiple of 64: the CPU packing's row block)

QUANT_MODES = ("none", "int8", "int4")


def _check_cpu(x: Tensor, what: str) -> None:
    if x.device.type != "cpu":
        raise NotImplementedError(
            f"{what} runs on CPU only (input on {x.device}); load the model with dense "
            f"bfloat16 weights for this device (linear_from_ggml(..., device=...))")


def _blocks(t: GGMLTensor, rows: slice, block_bytes: int) -> Tensor:
    """Raw bytes of rows as uint8 (n_rows, n_blocks, block_bytes), read from the (memory-mapped) data."""
    raw = np.array(np.asarray(t.data)[rows], copy=True).view(np.uint8)  # these rows only, writable
    return torch.from_numpy(raw).reshape(raw.shape[0], -1, block_bytes)


def _f16(b: Tensor) -> Tensor:
    """Little-endian float16 stored as two uint8 (..., 2) -> float32 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(..., 16) packed bytes -> (..., 32) codes 0..15: low nibbles are elements 0-15, high 16-31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q4k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 scale bytes (..., 12) -> 6-bit scales and mins (..., 8) (ggml-quants.c get_scale_min_k4)."""
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((lo & 63, (mix & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    mn = torch.cat((hi & 63, (mix >> 4) | ((hi >> 6) << 4)), dim=-1)
    return sc, mn


def ggml_int4_codes(t: GGMLTensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
    """Codes q (R, K) uint8 0..15, scales s and zeros z (R, K/32) float32 with w = (q-8) s + z.

    Exact for Q4_0, Q4_1 and Q4_K: d*sc and 8*d*sc are exact in float32 (11+6+3 bits), z rounds once.
    """
    if t.ggml_type == Q4_0:  # 18 bytes: f16 d, 16 bytes of codes
        b = _blocks(t, rows, 18)
        q = _nibbles(b[..., 2:])
        s = _f16(b[..., 0:2])
        z = torch.zeros_like(s)
    elif t.ggml_type == Q4_1:  # 20 bytes: f16 d, f16 m, 16 bytes of codes
        b = _blocks(t, rows, 20)
        q = _nibbles(b[..., 4:])
        s, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        z = m + 8 * s
    elif t.ggml_type == Q4_K:  # 144 bytes per 256: f16 d, f16 dmin, 12 scale bytes, 128 code bytes
        b = _blocks(t, rows, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # (R, nb)
        sc, mn = _q4k_scales_mins(b[..., 4:16])  # (R, nb, 8)
        qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)  # 4 chunks of 32 bytes: sub-blocks 2c (low), 2c+1 (high)
        q = torch.stack((qs & 0x0F, qs >> 4), dim=3)  # (R, nb, 4, 2, 32)
        s = d[..., None] * sc.float()
        z = 8 * s - dmin[..., None] * mn.float()
        s, z = s.flatten(1), z.flatten(1)
    else:
        raise ValueError(f"ggml type {t.type_name} has no exact int4 form (expected Q4_0, Q4_1 or Q4_K)")
    return q.reshape(q.shape[0], -1), s.reshape(q.shape[0], -1), z.reshape(q.shape[0], -1)


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W stored as 4-bit codes and a (scale, zero) per group of input columns.

    ~0.5 byte per weight for the codes plus 2 scale values per group (bfloat16: 0.125 byte per
    weight at group 32). Rows are padded to a multiple of 16 for the kernel; the pad is sliced off.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size={group_size}: expected one of {INT4_GROUP_SIZES}")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = dtype
        n_pad = -(-out_features // 16) * 16
        self.register_buffer("packed", torch.zeros(n_pad, in_features // 2, dtype=torch.uint8))
        # (K/group, N_pad, 2): [..., 0] scale, [..., 1] zero
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, n_pad, 2, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, dtype={self.dtype}, bias={self.bias is not None}")

    def _fill(self, r0: int, q: Tensor, s: Tensor, z: Tensor) -> None:
        """Pack codes q (R, K) 0..15 and scales, zeros (R, K/group) into rows r0.. r0+R."""
        R = q.shape[0]
        if R % 16:  # only the last chunk: pad with zero-scale rows
            pad = 16 - R % 16
            q = F.pad(q, (0, 0, 0, pad), value=8)
            s, z = F.pad(s, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
        rows = slice(r0, r0 + q.shape[0])
        self.packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales_and_zeros[:, rows] = torch.stack((s, z), dim=-1).transpose(0, 1).to(self.dtype)

    @classmethod
    def from_ggml(cls, t: GGMLTensor, bias: Tensor | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Exact int4 layer from Q4_0, Q4_1 or Q4_K blocks (group 32), converted a row chunk at a time."""
        if t.ggml_type not in INT4_TYPES:
            raise ValueError(f"ggml type {t.type_name} has no exact int4 form (expected Q4_0, Q4_1 or Q4_K)")
        N, K = t.shape
        layer = cls(K, N, 32, bias is not None, dtype)
        for r0 in range(0, N, ROWS_PER_CHUNK):
            layer._fill(r0, *ggml_int4_codes(t, slice(r0, r0 + ROWS_PER_CHUNK)))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 32,
                   dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Asymmetric min/max quantization: per group, codes 0..15 span [min, max]."""
        N, K = weight.shape
        layer = cls(K, N, group_size, bias is not None, dtype)
        for r0 in range(0, N, ROWS_PER_CHUNK):
            w = weight[r0:r0 + ROWS_PER_CHUNK].detach().float().reshape(-1, K // group_size, group_size)
            lo, hi = w.amin(-1), w.amax(-1)  # (R, K/group)
            # round scale and zero to the stored dtype first, then pick codes for those values
            s = ((hi - lo) / 15).to(dtype).float()
            z = (lo + 8 * s).to(dtype).float()
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
            q = ((w - z[..., None]) * inv[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
            layer._fill(r0, q.reshape(-1, K), s, z)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        _check_cpu(x, "Int4Linear")
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                       self.scales_and_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (N, K) this layer multiplies by, through the kernel itself (slow; for export)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size,
                                                         self.scales_and_zeros.float())
        return w_t[:, :self.out_features].T.contiguous().to(dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + b with int8 q (N, K) and one symmetric scale per output row.

    torch 2.13's bfloat16 CPU kernel crashes (segfault) unless K is a multiple of 16, so q is
    stored with zero columns up to the next multiple of 16 and x padded to match.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.k_pad = -(-in_features // 16) * 16
        self.register_buffer("weight", torch.zeros(out_features, self.k_pad, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.dtype}, bias={self.bias is not None}")

    def _fill(self, r0: int, w: Tensor) -> None:
        """Quantize float rows w (R, K) into rows r0.. r0+R: scale = absmax / 127."""
        w = w.float()
        s = (w.abs().amax(-1) / 127).to(self.dtype).float()  # codes chosen for the stored scale
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        rows = slice(r0, r0 + w.shape[0])
        self.weight[rows, :w.shape[1]] = (w * inv[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales[rows] = s.to(self.dtype)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        N, K = weight.shape
        layer = cls(K, N, bias is not None, dtype)
        for r0 in range(0, N, ROWS_PER_CHUNK):
            layer._fill(r0, weight[r0:r0 + ROWS_PER_CHUNK].detach())
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_ggml(cls, t: GGMLTensor, bias: Tensor | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Any GGUF type: dequantize a row chunk, requantize per row (lossy, even for Q8_0)."""
        N, K = t.shape
        layer = cls(K, N, bias is not None, dtype)
        for r0 in range(0, N, ROWS_PER_CHUNK):
            layer._fill(r0, _dequantize_rows(t, slice(r0, r0 + ROWS_PER_CHUNK)))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        _check_cpu(x, "Int8Linear")
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight[:, :self.in_features].float() * self.scales.float()[:, None]).to(dtype)


def _dequantize_rows(t: GGMLTensor, rows: slice | np.ndarray) -> Tensor:
    """Float32 values (R, K) of some rows of t; a torch fast path for the common row types.

    Each path rounds exactly as gguf.quants does (products of a float16 scale and a small
    integer are exact in float32; Q4_1 adds m with one rounding), so the rows are bit-equal.
    """
    K = t.shape[-1]
    data = np.asarray(t.data)
    if t.ggml_type in (F32, F16, BF16) and data.dtype != np.uint8:  # stored as plain values
        return torch.from_numpy(np.ascontiguousarray(data[rows])).float().reshape(-1, K)
    if t.ggml_type == F32:
        return _blocks(t, rows, 4).view(torch.float32).reshape(-1, K).clone()
    if t.ggml_type == F16:
        return _blocks(t, rows, 2).view(torch.float16).reshape(-1, K).float()
    if t.ggml_type == BF16:
        return _blocks(t, rows, 2).view(torch.bfloat16).reshape(-1, K).float()
    if t.ggml_type == Q8_0:  # 34 bytes: f16 d, 32 int8
        b = _blocks(t, rows, 34)
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (_f16(b[..., 0:2])[..., None] * q).reshape(-1, K)
    if t.ggml_type == Q4_0:
        b = _blocks(t, rows, 18)
        q = _nibbles(b[..., 2:]).float() - 8
        return (_f16(b[..., 0:2])[..., None] * q).reshape(-1, K)
    if t.ggml_type == Q4_1:
        b = _blocks(t, rows, 20)
        q = _nibbles(b[..., 4:]).float()
        return (_f16(b[..., 0:2])[..., None] * q + _f16(b[..., 2:4])[..., None]).reshape(-1, K)
    import gguf  # every other type: the reference code, on these rows only
    values = gguf.quants.dequantize(np.ascontiguousarray(data[rows]), gguf.GGMLQuantizationType(t.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, K)


class GGMLEmbedding(nn.Module):
    """An embedding table left in its GGUF blocks; only the rows looked up are read and decoded.

    `weight` is the GGMLTensor (vocab_size, dim), usually a memory map; the output rows equal
    those of `weight.dequantize()` exactly, cast to `dtype`.
    """

    def __init__(self, weight: GGMLTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"an embedding table is 2-D (vocab_size, dim), got shape {weight.shape}")
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, type={self.weight.type_name}, "
                f"dtype={self.dtype}")

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        rows = _dequantize_rows(self.weight, flat)
        return rows.to(device=ids.device, dtype=self.dtype).reshape(*ids.shape, self.embedding_dim)


def linear_from_ggml(t: GGMLTensor, bias: Tensor | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The runtime layer for a GGUF weight (see the policy table at the top of this module).

    Float types give a plain nn.Linear in float32 (CPU) or bfloat16 (CUDA); on CUDA every
    quantized type is dequantized to a bfloat16 nn.Linear (no CUDA int kernels here yet).
    """
    device = torch.device(device)
    N, K = t.shape
    if t.ggml_type in FLOAT_TYPES or device.type != "cpu":
        dense = torch.float32 if device.type == "cpu" else torch.bfloat16
        layer = nn.Linear(K, N, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(t.dequantize(dense).to(device), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(device=device, dtype=dense), requires_grad=False)
        return layer
    if t.ggml_type in INT4_TYPES:
        return Int4Linear.from_ggml(t, bias, dtype=dtype)
    return Int8Linear.from_ggml(t, bias, dtype=dtype)


def linear_from_float(weight: Tensor, bias: Tensor | None = None, mode: str = "none",
                      group_size: int = 32, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """nn.Linear in the weight's dtype ("none"), Int8Linear ("int8") or Int4Linear ("int4").

    "int4" falls back to Int8Linear when in_features is not a multiple of group_size.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r}: expected one of {QUANT_MODES}")
    N, K = weight.shape
    if mode == "none":
        layer = nn.Linear(K, N, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer
    if mode == "int4" and K % group_size == 0:
        return Int4Linear.from_float(weight, bias, group_size, dtype=dtype)
    return Int8Linear.from_float(weight, bias, dtype=dtype)


@torch.no_grad()
def quantize_model_(model: nn.Module, mode: str, group_size: int = 32,
                    dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every nn.Linear under model.model.layers, and model.lm_head, for an int layer, in place.

    Each float weight is released as soon as its replacement exists (one tensor at a time).
    A tied lm_head leaves the embedding's float table in place. Returns the model.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r}: expected one of {QUANT_MODES}")
    if mode == "none":
        return model
    targets = [(name, m) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    targets = [(f"model.layers.{name}", m) for name, m in targets]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        targets.append(("lm_head", model.lm_head))
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, linear_from_float(linear.weight, linear.bias, mode, group_size, dtype))
        linear.weight = None  # drop this module's reference now; the float tensor goes with it
    return model
