"""GGUF, llama.cpp's single-file format: read into HF names and layout, and write back.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. A file is a header,
key/value metadata (`general.*`, `{arch}.*`, `tokenizer.*`), tensor infos (name, dims
innermost-first, ggml type, offset) and aligned tensor data. We read it with our own lean
parser over one memory map (gguf_file.py) and write it with the `gguf` package's `GGUFWriter`.

Two conventions differ from Hugging Face and are undone here so that a `Checkpoint` is
always in HF names and layout:

- names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight` (tables below);
- rotary layout: llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`,
  applied to q_proj/k_proj weights and biases for the `llama` arch only; its `Qwen2Model`
  passes tensors through unchanged) reorders the rows of each Q/K head from HF's
  rotate-half layout (first half, second half) to interleaved pairs (x0, y0, x1, y1, ...).
  The reorder is of whole rows, so on quantized blocks it is exact.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from homellm.errors import HomellmError, ModelFileError
from homellm.model.formats import gguf_file
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor, TokenizerSource
from homellm.model.config import ModelArgs, rope_inv_freq

Q = gguf.GGMLQuantizationType

ARCHITECTURES = ("llama", "qwen2")  # qwen2: q/k/v biases, no rotary permutation
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QUANT_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES

# write_gguf(out_type=...) -> the ggml type of 2-D weights, and general.file_type
OUT_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}

# GGUF tensor name -> HF name. Per-block names drop the "blk.N." / "model.layers.N." prefix.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1: one divisor per rotary frequency (head_dim/2,)
_HF_GLOBAL = {hf: g for g, hf in GLOBAL_NAMES.items()}
_HF_BLOCK = {hf: g for g, hf in BLOCK_NAMES.items()}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


def gguf_name(hf: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None if unknown."""
    if hf in _HF_GLOBAL:
        return _HF_GLOBAL[hf]
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
            and parts[3] in _HF_BLOCK:
        return f"blk.{parts[2]}.{_HF_BLOCK[parts[3]]}"
    return None


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the network needs, HF name -> torch shape (out, in)."""
    h, d, ff, v = args.hidden_size, args.head_dim, args.intermediate_size, args.vocab_size
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    layer_norm = args.norm_type == "layer"
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if layer_norm:
        shapes["model.norm.bias"] = (h,)
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if args.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in norms:
            shapes[p + norm + ".weight"] = (h,)
            if layer_norm:
                shapes[p + norm + ".bias"] = (h,)
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.up_proj.weight": (ff, h), p + "mlp.down_proj.weight": (h, ff),
        })
        if args.mlp_gated:
            shapes[p + "mlp.gate_proj.weight"] = (ff, h)
        if args.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if args.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if args.mlp_bias:
            shapes.update({p + "mlp.up_proj.bias": (ff,), p + "mlp.down_proj.bias": (h,)})
            if args.mlp_gated:
                shapes[p + "mlp.gate_proj.bias"] = (ff,)
        if args.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


# --- the rotary row permutation ---------------------------------------------------------

def _rotary_heads(hf: str, args: ModelArgs) -> int | None:
    """How many heads a Q/K tensor's rows split into; None for every other tensor."""
    if ".self_attn.q_proj." in hf:
        return args.num_attention_heads
    if ".self_attn.k_proj." in hf:
        return args.num_key_value_heads
    return None


def interleaved_to_halves(rows, n_heads: int):
    """GGUF rows (n_heads * head_dim, ...) in pairs (x0, y0, x1, y1, ..) -> HF (x0, x1, .., y0, y1, ..).

    Works on numpy arrays and torch tensors alike; `rows` may be raw quantized bytes
    (rows, bytes_per_row) since only whole rows move.
    """
    shape = tuple(rows.shape)
    return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def halves_to_interleaved(rows, n_heads: int):
    """The inverse of `interleaved_to_halves`: HF rotate-half rows -> GGUF interleaved pairs."""
    shape = tuple(rows.shape)
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- reading ----------------------------------------------------------------------------

def _open(path: Path) -> gguf_file.GGUFFile:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such GGUF file")
    try:
        # copy-on-write map: reads share the page cache; a write to a tensor (say, training in
        # place) touches a private copy of that page, never the file, and never faults
        return gguf_file.read(path, mode="c")
    except gguf_file.GGUFFormatError as e:
        raise ModelFileError(f"{path} {e.problem}: {e}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e


def _f32(x: float) -> float:
    """A float32 from the file as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _model_args(path: Path, kv: dict, arch: str, names: set[str], rope_freqs: list[float] | None,
                embed_rows: int | None) -> ModelArgs:
    """ModelArgs from the `{arch}.*` keys, each checked for its type and range first (an
    error names the key), and the layer count bounded by the layers the file has tensors for
    (block_count = 2**32 - 1 must fail here, before anything is built per layer)."""
    def get(key: str, default: Any = KeyError):
        full = f"{arch}.{key}"
        if full in kv:
            return kv[full]
        if default is KeyError:
            raise ModelFileError(f"{path}: required metadata key {full!r} is missing")
        return default

    def bad(key: str, value, expected: str) -> ModelFileError:
        return ModelFileError(f"{path}: metadata key {arch}.{key} is {value!r}: expected {expected}")

    def integer(key: str, default: Any = KeyError, low: int = 1) -> int:
        value = get(key, default)
        if value is default and default is not KeyError:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, value, "an integer")
        if value < low:
            raise bad(key, value, f"an integer of at least {low}")
        return value

    def number(key: str, default: Any = KeyError, positive: bool = True) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, value, "a number")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise bad(key, value, f"a finite number {'> 0' if positive else '>= 0'}")
        return _f32(value)

    n_layers = integer("block_count")
    layers = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if n_layers > len(layers):
        raise ModelFileError(f"{path}: metadata key {arch}.block_count is {n_layers}, but the file "
                             f"has tensors for {len(layers)} layers")
    n_heads = integer("attention.head_count")
    if "tokens" in kv:
        vocab = len(kv["tokens"])
    else:
        vocab = embed_rows
    vocab = integer("vocab_size", vocab or 0, low=0)
    if not vocab:
        raise ModelFileError(f"{path}: required metadata key {arch + '.vocab_size'!r} is missing "
                             "(and there is no tokenizer.ggml.tokens to count)")
    rope_scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor")}
    elif kind not in ("none", ""):
        raise ModelFileError(f"{path}: {arch}.rope.scaling.type is {kind!r}; "
                             "supported: 'none', 'linear' (and a rope_freqs tensor)")
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ModelFileError(f"{path} has both {arch}.rope.scaling.type={kind!r} and a "
                                 f"{ROPE_FREQS} tensor; expected one of them")
        rope_scaling = {"rope_type": "freq_factors", "factors": rope_freqs}
    try:
        return ModelArgs(
            hidden_size=integer("embedding_length"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=integer("attention.head_count_kv", n_heads),
            intermediate_size=integer("feed_forward_length"),
            vocab_size=vocab,
            head_dim=integer("attention.key_length", None),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", positive=False),
            rope_theta=number("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=integer("context_length", low=2),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
        )
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: the {arch}.* metadata does not describe a valid model: {e}") from e


def _to_torch(t: gguf_file.TensorInfo, path: Path, as_numpy: bool = False):
    """A tensor's data, zero-copy where the type allows: torch for floats (numpy arrays when
    `as_numpy`; BF16 then stays GGMLTensor blocks), else GGMLTensor."""
    if t.ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise ModelFileError(f"unsupported tensor type {t.ggml_type.name} in {t.name} of {path}; "
                             f"supported: {supported}")
    data, shape = t.data, t.shape  # GGUF dims are innermost-first; shape is torch order
    if as_numpy and t.ggml_type in (Q.F32, Q.F16):
        return data.reshape(shape)
    if not as_numpy and t.ggml_type in (Q.F32, Q.F16, Q.BF16):
        import torch
    if t.ggml_type == Q.F32 or t.ggml_type == Q.F16:
        return torch.from_numpy(data).reshape(shape)
    if t.ggml_type == Q.BF16 and not as_numpy:  # stored as uint8 bytes (rows, 2 * n): reinterpret as bf16
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
    return GGMLTensor(int(t.ggml_type), data, shape)  # data: (rows, bytes_per_row) uint8


def read_gguf(path: str | os.PathLike, as_numpy: bool = False) -> Checkpoint:
    """Read a GGUF model file (llama or qwen2 architecture) into HF names and layout.

    Tensors stay in the file's memory map where they can: F32/F16/BF16 as torch views of
    the stored dtype (numpy arrays with `as_numpy`, which never imports torch), quantized
    types as `GGMLTensor` rows (Q/K rows un-permuted, a copy).
    Raises ModelFileError, naming the file and the problem, for anything it cannot use.
    """
    path = Path(path)
    reader = _open(path)
    kv = reader.metadata
    tok = {k[len("tokenizer.ggml."):]: v for k, v in kv.items() if k.startswith("tokenizer.ggml.")}
    arch = kv.get("general.architecture")
    if arch is None:
        raise ModelFileError(f"{path}: required metadata key 'general.architecture' is missing")
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"{path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")

    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if ROPE_FREQS in by_name:
        freqs = _to_torch(by_name[ROPE_FREQS], path, as_numpy=True)
        if isinstance(freqs, GGMLTensor):
            freqs = freqs.dequantize_numpy()
        rope_freqs = np.asarray(freqs, dtype=np.float32).tolist()
    embed = by_name.get("token_embd.weight")
    embed_rows = embed.dims[-1] if embed is not None and len(embed.dims) == 2 else None
    args = _model_args(path, kv, arch, set(by_name), rope_freqs, embed_rows)

    expected = expected_shapes(args)
    if rope_freqs is not None and len(rope_freqs) != args.head_dim // 2:
        raise ModelFileError(f"{path}: {ROPE_FREQS} has {len(rope_freqs)} values, expected "
                             f"head_dim/2 = {args.head_dim // 2}")
    tensors: dict = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise ModelFileError(f"{path}: unexpected tensor {t.name} for a {arch} model with "
                                 f"{args.num_hidden_layers} layers")
        value = _to_torch(t, path, as_numpy)
        shape = tuple(value.shape)
        if shape != expected[name]:
            raise ModelFileError(f"{path}: tensor {t.name} ({name}) has shape {list(shape)}, "
                                 f"expected {list(expected[name])} from the {arch}.* metadata")
        if len(shape) == 1 and t.ggml_type in (Q.F32, Q.F16) and not np.isfinite(t.data).all():
            # norms and biases: a few KB each, and a NaN there ruins every token
            raise ModelFileError(f"{path}: tensor {t.name} ({name}) holds NaN or infinite values")
        heads = _rotary_heads(name, args) if arch == "llama" else None
        if heads is not None:
            if isinstance(value, GGMLTensor):
                rows = np.ascontiguousarray(interleaved_to_halves(value.data, heads))
                gguf_file.release_file_pages(value.data)  # the copy is what is used from now on
                value = GGMLTensor(value.ggml_type, rows, value.shape)
            elif as_numpy:
                value = np.ascontiguousarray(interleaved_to_halves(value, heads))
            else:
                value = interleaved_to_halves(value, heads).contiguous()
        tensors[name] = value
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ModelFileError(f"{path}: missing tensors {', '.join(gguf_name(n) for n in missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    template = kv.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(f"{path}: metadata key tokenizer.chat_template holds a "
                             f"{type(template).__name__} value: expected a string (a Jinja template)")
    metadata = {k[len("general."):]: v for k, v in kv.items() if k.startswith("general.")}
    metadata["tensor_types"] = dict(Counter(t.ggml_type.name for t in reader.tensors))
    return Checkpoint(args=args, tensors=tensors, tokenizer=TokenizerSource(gguf_fields=tok),
                      chat_template=template, source=path,
                      format="gguf", metadata=metadata)


# --- writing ----------------------------------------------------------------------------

V = gguf.GGUFValueType
# tokenizer.ggml.* keys whose type a plain Python value does not say
_TOKENIZER_TYPES = {"tokens": V.STRING, "merges": V.STRING, "token_type": V.INT32,
                    "scores": V.FLOAT32, "precompiled_charsmap": V.UINT8}


def _value_type(key: str, value: Any) -> V:
    """The GGUF type of a scalar: ids are uint32, other ints int32, floats float32."""
    if isinstance(value, (bool, np.bool_)):
        return V.BOOL
    if isinstance(value, (int, np.integer)):
        return V.UINT32 if key.endswith("_id") or key.endswith("_count") else V.INT32
    if isinstance(value, (float, np.floating)):
        return V.FLOAT32
    if isinstance(value, str):
        return V.STRING
    raise HomellmError(f"metadata key {key!r}: cannot store a {type(value).__name__} in GGUF")


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any, item_type: V | None = None) -> None:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bytes):
        value, item_type = list(value), V.UINT8
    if isinstance(value, (list, tuple)):
        if not value:  # GGUF has no empty arrays; an absent key reads the same
            return
        sub = item_type or _value_type("", value[0])  # ints in a list: int32
        writer.add_key_value(key, list(value), V.ARRAY, sub_type=sub)
    elif value is not None:
        writer.add_key_value(key, value, item_type or _value_type(key, value))


def _rope_freq_factors(args: ModelArgs) -> list[float] | None:
    """rope_freqs.weight for llama3 / freq_factors scaling: inv_freq divisors (head_dim/2,)."""
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "freq_factors":
        return [float(f) for f in scaling["factors"]]
    if kind == "llama3":
        plain = rope_inv_freq(dataclasses.replace(args, rope_scaling=None)).astype(np.float64)
        return (plain / rope_inv_freq(args).astype(np.float64)).tolist()
    return None


def _add_arch_metadata(writer: gguf.GGUFWriter, arch: str, args: ModelArgs) -> None:
    """The `{arch}.*` keys that llama.cpp's llama/qwen2 loaders read."""
    for key, value in (("context_length", args.max_position_embeddings),
                       ("embedding_length", args.hidden_size),
                       ("block_count", args.num_hidden_layers),
                       ("feed_forward_length", args.intermediate_size),
                       ("attention.head_count", args.num_attention_heads),
                       ("attention.head_count_kv", args.num_key_value_heads),
                       ("attention.key_length", args.head_dim),
                       ("attention.value_length", args.head_dim),
                       ("rope.dimension_count", args.head_dim),
                       ("vocab_size", args.vocab_size)):
        writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_float32(f"{arch}.rope.freq_base", float(args.rope_theta))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(args.rms_norm_eps))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
    elif kind not in ("default", "llama3", "freq_factors"):
        raise HomellmError(f"rope_scaling type {kind!r} cannot be written to GGUF "
                           "(supported: linear, llama3, freq_factors)")


def _target_type(shape: tuple[int, ...], out: Q) -> Q:
    """1-D tensors stay F32; 2-D weights get `out` when their rows hold whole blocks, else F16."""
    if len(shape) == 1:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[out]
    return out if shape[-1] % block == 0 else Q.F16


def _encode(value, qtype: Q, heads: int | None) -> np.ndarray:
    """The bytes of one tensor as `qtype` in GGUF layout (Q/K rows interleaved)."""
    if isinstance(value, GGMLTensor) and value.ggml_type == qtype:
        rows = np.asarray(value.data, dtype=np.uint8).reshape(-1, value.data.shape[-1])
        return np.ascontiguousarray(halves_to_interleaved(rows, heads) if heads else rows)
    if isinstance(value, GGMLTensor):
        x = value.dequantize_numpy()
    elif isinstance(value, np.ndarray):
        x = value.astype(np.float32)
    else:  # a torch tensor
        x = value.detach().to("cpu").float().numpy()
    if heads:
        x = halves_to_interleaved(x, heads)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)  # (rows, bytes_per_row) uint8


def write_gguf(path: str | os.PathLike, args: ModelArgs,
               tensors: dict[str, torch.Tensor | GGMLTensor], *, out_type: str = "f16",
               tokenizer_fields: dict | None = None, chat_template: str | None = None,
               metadata: dict | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a model in HF names and layout as a GGUF file that llama.cpp and read_gguf load.

    The arch is `qwen2` when args.attention_bias, else `llama` (Q/K rows re-permuted).
    2-D weights become `out_type` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1) where
    their rows hold whole blocks, else f16; 1-D tensors stay f32. A GGMLTensor already of
    the target type is copied block for block. `tokenizer_fields` are `tokenizer.ggml.*`
    values without the prefix (as read_gguf returns them); `metadata` adds `general.*` keys.
    The file is written to a temporary name in the same folder and renamed when complete.
    `progress(done, total)` is called after each tensor.
    """
    path = Path(path)
    if out_type.lower() not in OUT_TYPES:
        raise HomellmError(f"out_type {out_type!r} is not supported; choose one of {', '.join(OUT_TYPES)}")
    out, file_type = OUT_TYPES[out_type.lower()]
    arch = "qwen2" if args.attention_bias else "llama"

    # plan every tensor (name, value, type, rows to permute) before touching the disk
    expected = expected_shapes(args)
    unknown = [n for n in tensors if n not in expected and not (n == "lm_head.weight"
                                                                 and args.tie_word_embeddings)]
    if unknown:
        raise HomellmError(f"cannot write {', '.join(unknown[:5])} to GGUF: not a tensor of a "
                           f"{arch} model with {args.num_hidden_layers} layers")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise HomellmError(f"cannot write {path}: missing tensors {', '.join(missing[:5])}")
    plan = []
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(value.shape) != shape:
            raise HomellmError(f"cannot write {path}: {name} has shape {list(value.shape)}, "
                               f"expected {list(shape)} from ModelArgs")
        heads = _rotary_heads(name, args) if arch == "llama" else None
        plan.append((gguf_name(name), value, _target_type(shape, out), heads))
    factors = _rope_freq_factors(args)
    if factors is not None:
        if len(factors) != args.head_dim // 2:
            raise HomellmError(f"rope_scaling has {len(factors)} freq factors, expected {args.head_dim // 2}")
        plan.append((ROPE_FREQS, np.asarray(factors, dtype=np.float32), Q.F32, None))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
    except OSError as e:
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        reserved = {"architecture", "file_type", "quantization_version", "alignment", "tensor_types"}
        for key, value in (metadata or {}).items():
            key = key.removeprefix("general.")
            if key not in reserved:
                _add_value(writer, f"general.{key}", value)
        _add_arch_metadata(writer, arch, args)
        for key, value in (tokenizer_fields or {}).items():
            _add_value(writer, f"tokenizer.ggml.{key}", value, _TOKENIZER_TYPES.get(key))
        if chat_template:
            writer.add_string("tokenizer.chat_template", chat_template)

        for name, value, qtype, _ in plan:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(value.shape))
            writer.add_tensor_info(name, tuple(value.shape), np.dtype(np.float32),
                                   n // block * type_size, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (name, value, qtype, heads) in enumerate(plan):
            writer.write_tensor_data(_encode(value, qtype, heads))
            if progress is not None:
                progress(i + 1, len(plan))
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is for every reader
        os.replace(tmp, path)
    except OSError as e:
        raise HomellmError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return path
