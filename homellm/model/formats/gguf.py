"""GGUF, llama.cpp's single-file format: read into HF names and layout, and write back.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. A file is a header,
key/value metadata (`general.*`, `{arch}.*`, `tokenizer.*`), tensor infos (name, dims
innermost-first, ggml type, offset) and aligned tensor data. We read it with our own lean
parser over one memory map (gguf_file.py) and write it with the `gguf` package's `GGUFWriter`.

Two conventions differ from Hugging Face and are undone here so that a `Checkpoint` is
always in HF names and layout:

- names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight` (tables below);
- rotary layout: llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`,
  applied to q_proj/k_proj weights and biases for the `llama` arch only; every other arch
  here rotates in HF's rotate-half layout, llama.cpp's NEOX rope type, and passes tensors
  through unchanged) reorders the rows of each Q/K head from HF's
  rotate-half layout (first half, second half) to interleaved pairs (x0, y0, x1, y1, ...).
  The reorder is of whole rows, so on quantized blocks it is exact.

Per arch (llama.cpp's gguf-py constants.py MODEL_TENSORS and src/llama-model.cpp):

- `qwen3`: attn_q_norm / attn_k_norm. `gemma3`: also post_attention_norm and post_ffw_norm,
  its ffn_norm is the MLP's input norm (HF pre_feedforward_layernorm), every norm weight is
  stored as (1 + w) (the converter adds Gemma's offset), sliding-window layers are every layer
  but each sixth (llama.cpp's set_swa_pattern(6)) with RoPE base 10000 (rope.freq_base_swa),
  the attention scale is 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B model);
- `phi3`: attn_qkv is q, k, v stacked by rows and ffn_up is gate then up (both split on
  reading, stacked on writing), LongRoPE as rope_factors_short/long tensors;
- `stablelm`, `gptneox`: LayerNorm weights and biases (attention.layer_norm_epsilon);
  gptneox's attn_qkv is [q; k; v] (the converter regroups HF's per-head rows), its MLP is
  ffn_up/ffn_down with biases and use_parallel_residual says how the layer adds up;
- Mistral is the `llama` arch; its window goes in llama.attention.sliding_window, which
  llama.cpp's llama loader ignores (exact up to the window's length).
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
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor, TokenizerSource, cat_rows, split_rows
from homellm.model.config import ModelArgs, kind_of, rope_inv_freq

Q = gguf.GGMLQuantizationType

# general.architecture -> the family (HF model_type) it is read as
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                 "phi3": "phi3", "stablelm": "stablelm", "gptneox": "gpt_neox"}
LAYER_NORM_ARCHS = ("stablelm", "gptneox")  # attention.layer_norm_epsilon, weights and biases
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
    "attn_norm.bias": "input_layernorm.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.bias": "post_attention_layernorm.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
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
GLOBAL_NAMES["output_norm.bias"] = "model.norm.bias"
# Gemma 3's sandwich norms: its ffn_norm is the MLP's input norm
GEMMA_BLOCK_NAMES = dict(BLOCK_NAMES, **{
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight"})
# fused tensors -> their parts, stacked by rows in this order (phi3, gptneox)
FUSED = {"attn_qkv.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
         "attn_qkv.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias")}
PHI3_FUSED_UP = {"ffn_up.weight": ("ffn_gate.weight", "ffn_up.weight")}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1: one divisor per rotary frequency (head_dim/2,)
# Phi-3's LongRoPE: one divisor per rotary frequency for short and long contexts
ROPE_SHORT, ROPE_LONG = "rope_factors_short.weight", "rope_factors_long.weight"
GEMMA_SWA_PATTERN, GEMMA_SWA_BASE = 6, 10000.0  # what llama.cpp's gemma3 loader sets


def _block_names(arch: str) -> dict[str, str]:
    return GEMMA_BLOCK_NAMES if arch == "gemma3" else BLOCK_NAMES


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    names = _block_names(arch)
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    return None


def gguf_name(hf: str, arch: str = "llama") -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None if unknown."""
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if hf in inverse:
        return inverse[hf]
    block = {v: k for k, v in _block_names(arch).items()}
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
            and parts[3] in block:
        return f"blk.{parts[2]}.{block[parts[3]]}"
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
                embed_rows: int | None, longrope: dict | None = None) -> ModelArgs:
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
        if value is default and default is not KeyError:
            return value
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
    elif kind not in ("none", "") and not (kind == "longrope" and longrope is not None):
        raise ModelFileError(f"{path}: {arch}.rope.scaling.type is {kind!r}; "
                             "supported: 'none', 'linear' (and a rope_freqs tensor)")
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ModelFileError(f"{path} has both {arch}.rope.scaling.type={kind!r} and a "
                                 f"{ROPE_FREQS} tensor; expected one of them")
        rope_scaling = {"rope_type": "freq_factors", "factors": rope_freqs}
    context = integer("context_length", low=2)
    if longrope is not None:
        original = integer("rope.scaling.original_context_length", context, low=2)
        factor = context / original
        attn = number("rope.scaling.attn_factor", None)
        if attn is None:
            attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": original,
                        "attention_factor": attn, **longrope}
        context = min(context, original)  # (the short factors: see hf_config._longrope)
    n_embd = integer("embedding_length")
    head_dim = integer("attention.key_length", None)
    d = head_dim or (n_embd // n_heads if n_heads and n_embd % n_heads == 0 else None)
    rot = integer("rope.dimension_count", d)
    extra: dict = {}
    layer_norm = arch in LAYER_NORM_ARCHS
    eps_key = "attention.layer_norm_epsilon" if layer_norm else "attention.layer_norm_rms_epsilon"
    if arch == "gemma3":
        window = integer("attention.sliding_window", None)
        pattern = get("attention.sliding_window_pattern", GEMMA_SWA_PATTERN)
        if isinstance(pattern, list):  # per layer: True = sliding
            if len(pattern) != n_layers or any(not isinstance(x, bool) for x in pattern):
                raise bad("attention.sliding_window_pattern", pattern, f"{n_layers} booleans")
            types = ["sliding_attention" if x else "full_attention" for x in pattern]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        else:
            raise bad("attention.sliding_window_pattern", pattern, "an integer or a list of booleans")
        scale = number("attention.scale", None)
        if scale is not None:  # (a whole number as one: the float32 key rounds it)
            qpas = 1.0 / (scale * scale)
            qpas = float(round(qpas)) if abs(qpas - round(qpas)) < 1e-4 * qpas else qpas
        else:  # llama.cpp: 1/sqrt(head_dim), but 1/sqrt(n_embd/n_head) for the 27B model
            qpas = float(n_embd // n_heads if n_layers == 62 else d)
        extra = dict(norm_offset=1.0, qk_norm=True, sandwich_norms=True, hidden_act="gelu_tanh",
                     embed_scale=float(n_embd) ** 0.5, query_pre_attn_scalar=qpas,
                     sliding_window=window, layer_types=types if window else None,
                     rope_local_theta=number("rope.freq_base_swa", GEMMA_SWA_BASE) if window else None,
                     final_logit_softcapping=number("final_logit_softcapping", None))
    elif arch == "qwen3":
        extra = dict(qk_norm=True)
    elif arch == "stablelm":
        if "blk.0.attn_q_norm.weight" in names:
            raise ModelFileError(f"{path}: StableLM's per-head q/k LayerNorm (attn_q_norm) is not supported")
        if "blk.0.ffn_norm.weight" not in names:
            raise ModelFileError(f"{path}: a stablelm model without ffn_norm (parallel residual with "
                                 f"a shared input norm) is not supported")
        extra = dict(norm_type="layer")
    elif arch == "gptneox":
        parallel = get("use_parallel_residual", True)
        if not isinstance(parallel, bool):
            raise bad("use_parallel_residual", parallel, "a boolean")
        extra = dict(norm_type="layer", o_bias="blk.0.attn_output.bias" in names, mlp_bias=True,
                     mlp_gated=False, hidden_act="gelu", parallel_residual=parallel)
    if arch in ("llama", "qwen2", "phi3") and get("attention.sliding_window", None) is not None:
        extra["sliding_window"] = integer("attention.sliding_window")
    if arch in ("qwen3",) and "blk.0.attn_output.bias" in names:
        extra["o_bias"] = True
    try:
        return ModelArgs(
            hidden_size=n_embd,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=integer("attention.head_count_kv", n_heads),
            intermediate_size=integer("feed_forward_length"),
            vocab_size=vocab,
            head_dim=head_dim,
            rms_norm_eps=number(eps_key, positive=False),
            rope_theta=number("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
            partial_rotary_factor=rot / d if d else 1.0,
            model_type=ARCHITECTURES[arch],
            **extra,
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


def _minus_one(value, as_numpy: bool):
    """A float norm weight w + 1 -> w (a copy)."""
    if isinstance(value, GGMLTensor):
        value = value.dequantize_numpy()
        return value - np.float32(1) if as_numpy else _torch().from_numpy(value - np.float32(1))
    return value.astype(np.float32) - np.float32(1) if as_numpy else value.float() - 1


def _torch():
    import torch
    return torch


def read_gguf(path: str | os.PathLike, as_numpy: bool = False) -> Checkpoint:
    """Read a GGUF model file (an arch of ARCHITECTURES) into HF names and layout.

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

    def floats(name: str) -> list[float]:
        values = _to_torch(by_name[name], path, as_numpy=True)
        if isinstance(values, GGMLTensor):
            values = values.dequantize_numpy()
        return [_f32(x) for x in np.asarray(values, dtype=np.float32).reshape(-1).tolist()]

    rope_freqs = floats(ROPE_FREQS) if ROPE_FREQS in by_name else None
    longrope = None
    if ROPE_SHORT in by_name or ROPE_LONG in by_name:
        if ROPE_SHORT not in by_name or ROPE_LONG not in by_name:
            raise ModelFileError(f"{path}: expected both {ROPE_SHORT} and {ROPE_LONG} (LongRoPE)")
        longrope = {"short_factor": floats(ROPE_SHORT), "long_factor": floats(ROPE_LONG)}
    embed = by_name.get("token_embd.weight")
    embed_rows = embed.dims[-1] if embed is not None and len(embed.dims) == 2 else None
    args = _model_args(path, kv, arch, set(by_name), rope_freqs, embed_rows, longrope)

    expected = expected_shapes(args)
    half = args.rotary_dim // 2
    if rope_freqs is not None and len(rope_freqs) != half:
        raise ModelFileError(f"{path}: {ROPE_FREQS} has {len(rope_freqs)} values, expected "
                             f"rotary_dim/2 = {half}")
    if longrope is not None and not (len(longrope["short_factor"]) == len(longrope["long_factor"]) == half):
        raise ModelFileError(f"{path}: {ROPE_SHORT} and {ROPE_LONG} need rotary_dim/2 = {half} values each")
    d, nq, nkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
    tensors: dict = {}
    for t in reader.tensors:
        if t.name in (ROPE_FREQS, ROPE_SHORT, ROPE_LONG):
            continue
        leaf = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else None
        value = _to_torch(t, path, as_numpy)
        if leaf in FUSED or (arch == "phi3" and leaf in PHI3_FUSED_UP):  # stacked parts
            parts_of = FUSED.get(leaf) or PHI3_FUSED_UP[leaf]
            sizes = [args.intermediate_size] * 2 if leaf in PHI3_FUSED_UP else [nq * d, nkv * d, nkv * d]
            if value.shape[0] != sum(sizes):
                raise ModelFileError(f"{path}: tensor {t.name} has {value.shape[0]} rows, expected "
                                     f"{sum(sizes)} from the {arch}.* metadata")
            prefix = t.name.rsplit(".", 2)[0] + "."
            parts = [(prefix + part, x) for part, x in zip(parts_of, split_rows(value, sizes))]
        else:
            parts = [(t.name, value)]
        for gname, value in parts:
            name = hf_name(gname, arch)
            if name is None or name not in expected:
                raise ModelFileError(f"{path}: unexpected tensor {t.name} for a {arch} model with "
                                     f"{args.num_hidden_layers} layers")
            shape = tuple(value.shape)
            if shape != expected[name]:
                raise ModelFileError(f"{path}: tensor {t.name} ({name}) has shape {list(shape)}, "
                                     f"expected {list(expected[name])} from the {arch}.* metadata")
            if len(shape) == 1 and t.ggml_type in (Q.F32, Q.F16) and not np.isfinite(t.data).all():
                # norms and biases: a few KB each, and a NaN there ruins every token
                raise ModelFileError(f"{path}: tensor {t.name} ({name}) holds NaN or infinite values")
            if arch == "gemma3" and name.endswith("norm.weight"):  # stored as (1 + w): HF keeps w
                value = _minus_one(value, as_numpy)
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
        raise ModelFileError(f"{path}: missing tensors {', '.join(gguf_name(n, arch) or n for n in missing[:5])}"
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


def gguf_arch(args: ModelArgs) -> str:
    """The llama.cpp arch a network is written as: its family's, with the LLaMA family as before
    (`qwen2` for q/k/v biases, else `llama`, Mistral included)."""
    # (ValueError where no family fits the fields; the RoPE scaling does not choose the family)
    family = dataclasses.replace(args, rope_scaling=None).to_hf_config()["model_type"]
    if family in ("llama", "mistral", "qwen2"):
        return "qwen2" if args.attention_bias and not args.o_bias else "llama"
    return {v: k for k, v in ARCHITECTURES.items()}[family]


def _add_arch_metadata(writer: gguf.GGUFWriter, arch: str, args: ModelArgs) -> None:
    """The `{arch}.*` keys that llama.cpp's loader of that arch reads."""
    for key, value in (("context_length", args.max_position_embeddings),
                       ("embedding_length", args.hidden_size),
                       ("block_count", args.num_hidden_layers),
                       ("feed_forward_length", args.intermediate_size),
                       ("attention.head_count", args.num_attention_heads),
                       ("attention.head_count_kv", args.num_key_value_heads),
                       ("attention.key_length", args.head_dim),
                       ("attention.value_length", args.head_dim),
                       ("rope.dimension_count", args.rotary_dim),
                       ("vocab_size", args.vocab_size)):
        writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_float32(f"{arch}.rope.freq_base", float(args.rope_theta))
    eps = "attention.layer_norm_epsilon" if arch in LAYER_NORM_ARCHS else "attention.layer_norm_rms_epsilon"
    writer.add_float32(f"{arch}.{eps}", float(args.rms_norm_eps))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
    elif kind == "longrope" and arch == "phi3":
        writer.add_float32(f"{arch}.rope.scaling.attn_factor", float(scaling["attention_factor"]))
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length",
                          int(scaling["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3", "freq_factors"):
        raise HomellmError(f"rope_scaling type {kind!r} cannot be written to a {arch} GGUF "
                           "(supported: linear, llama3, freq_factors; longrope for phi3)")
    if args.sliding_window is not None:
        writer.add_uint32(f"{arch}.attention.sliding_window", int(args.sliding_window))
    if arch == "gptneox":
        writer.add_bool(f"{arch}.use_parallel_residual", bool(args.parallel_residual))
    if arch == "gemma3":
        if args.sliding_window is not None:
            pattern = ["sliding_attention" if (i + 1) % GEMMA_SWA_PATTERN else "full_attention"
                       for i in range(args.num_hidden_layers)]
            if args.layer_types is not None and args.layer_types != pattern:
                writer.add_array(f"{arch}.attention.sliding_window_pattern",
                                 [t == "sliding_attention" for t in args.layer_types])
            if args.rope_local_theta not in (None, GEMMA_SWA_BASE):
                writer.add_float32(f"{arch}.rope.freq_base_swa", float(args.rope_local_theta))
        llama_cpp = args.hidden_size // args.num_attention_heads if args.num_hidden_layers == 62 else args.head_dim
        if (args.query_pre_attn_scalar or args.head_dim) != llama_cpp:
            writer.add_float32(f"{arch}.attention.scale", float(args.attention_scale))
        if args.final_logit_softcapping is not None:
            writer.add_float32(f"{arch}.final_logit_softcapping", float(args.final_logit_softcapping))
    if arch == "gptneox" and args.hidden_act != "gelu":
        raise HomellmError(f"a gptneox GGUF computes GELU; this network's MLP uses {args.hidden_act}")


def _gguf_plan(args: ModelArgs, tensors: dict, arch: str, expected: dict) -> list[tuple[str, Any, int | None]]:
    """(GGUF name, value in GGUF layout but for the rotary permutation, heads to permute) for
    every tensor: Gemma's norms as (1 + w), Phi-3's and NeoX's fused tensors stacked."""
    plan, done = [], set()
    for name in expected:
        if name in done:
            continue
        value = tensors[name]
        gname = gguf_name(name, arch)
        leaf = gname.split(".", 2)[-1] if gname.startswith("blk.") else None
        prefix = gname.rsplit(".", 2)[0] + "." if leaf else ""
        fused = None
        if arch in ("phi3", "gptneox"):
            fused = next((f for f, parts in FUSED.items() if leaf in parts), None)
        if arch == "phi3" and leaf in ("ffn_gate.weight", "ffn_up.weight"):
            fused = "ffn_up.weight"
        if fused is not None:
            parts = (FUSED.get(fused) if fused in FUSED else PHI3_FUSED_UP[fused])
            names = [hf_name(prefix + part, arch) for part in parts]
            done.update(names)
            plan.append((prefix + fused, cat_rows([tensors[n] for n in names]), None))
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = _to_float32(value) + np.float32(1)
        plan.append((gname, value, _rotary_heads(name, args) if arch == "llama" else None))
    return plan


def _to_float32(value) -> np.ndarray:
    if isinstance(value, GGMLTensor):
        return value.dequantize_numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    return value.detach().to("cpu").float().numpy()


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
    else:
        x = _to_float32(value)
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

    The arch is the family's (`gguf_arch`): `qwen2` for the LLaMA family with q/k/v biases,
    `llama` (Q/K rows re-permuted) for the rest of it, else qwen3, gemma3, phi3, stablelm, gptneox.
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
    try:
        arch = gguf_arch(args)
    except ValueError as e:
        raise HomellmError(f"cannot write {path}: {e}") from None

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
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(value.shape) != shape:
            raise HomellmError(f"cannot write {path}: {name} has shape {list(value.shape)}, "
                               f"expected {list(shape)} from ModelArgs")
    plan = [(gname, value, _target_type(tuple(value.shape), out), heads)
            for gname, value, heads in _gguf_plan(args, tensors, arch, expected)]
    factors = _rope_freq_factors(args)
    if factors is not None:
        if len(factors) != args.rotary_dim // 2:
            raise HomellmError(f"rope_scaling has {len(factors)} freq factors, expected {args.rotary_dim // 2}")
        plan.append((ROPE_FREQS, np.asarray(factors, dtype=np.float32), Q.F32, None))
    if kind_of(args.rope_scaling) == "longrope":
        if arch != "phi3":
            raise HomellmError(f"cannot write {path}: LongRoPE scaling goes in a phi3 GGUF only")
        for gname, key in ((ROPE_LONG, "long_factor"), (ROPE_SHORT, "short_factor")):
            plan.append((gname, np.asarray(args.rope_scaling[key], dtype=np.float32), Q.F32, None))

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
