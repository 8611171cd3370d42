"""The network's shape as a checkpoint records it, and the RoPE frequencies it implies.

Plain Python and numpy, no PyTorch: the C runtime (engine/kernels) runs a GGUF model without
importing torch. model/llama.py builds the PyTorch network from the same `ModelArgs`.

One network covers the LLaMA family and its relatives; what tells them apart are fields below,
each read from the checkpoint (formats/hf_config.py for config.json, formats/gguf.py for GGUF
metadata), never guessed from a name:

| family (HF model_type) | what differs from LLaMA |
|---|---|
| llama, mistral, qwen2 | q/k/v bias (qwen2), sliding-window attention (mistral) |
| qwen3 | RMSNorm of each head's q and k (qk_norm) |
| gemma3_text | (1 + w) RMSNorm, q/k norm, GeGLU (tanh GELU), embeddings x sqrt(hidden), norms after attention and MLP too, sliding-window layers with their own RoPE base, query_pre_attn_scalar |
| phi3 | fused qkv / gate_up tensors (split on reading), partial rotary, LongRoPE |
| stablelm | LayerNorm with bias, partial rotary, q/k/v bias |
| gpt_neox (Pythia) | LayerNorm with bias, parallel attention and MLP, partial rotary, plain GELU MLP with biases |

Every family here rotates in the rotate-half ("NeoX") layout on the first `rotary_dim` values of
each head; llama.cpp's `llama` arch stores Q/K rows interleaved (GPT-J style), which the GGUF
reader undoes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")
# rope_scaling kinds rope_inv_freq computes, and the numbers each needs
ROPE_KINDS = {"linear": ("factor",),
              "longrope": ("original_max_position_embeddings", "attention_factor"),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"),
              "freq_factors": ()}


def _number(name: str, value, positive: bool = True) -> float:
    """`value` as a float if it is a finite number (> 0, or >= 0), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r}: expected a number")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value!r}: expected a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def check_rope_scaling(scaling) -> None:
    """ValueError unless `scaling` is a rope_scaling dict that rope_inv_freq computes."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r}: expected an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_KINDS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported "
                         f"(supported: 'linear', 'llama3', 'longrope')")
    for key in ROPE_KINDS[kind]:
        if key not in scaling:
            raise ValueError(f"rope_scaling ({kind}) has no {key!r}")
        _number(f"rope_scaling.{key}", scaling[key])
    if kind == "llama3" and float(scaling["low_freq_factor"]) == float(scaling["high_freq_factor"]):
        raise ValueError("rope_scaling (llama3): low_freq_factor equals high_freq_factor")
    if kind == "freq_factors":
        factors = scaling.get("factors")
        if not isinstance(factors, (list, tuple)) or not factors:
            raise ValueError("rope_scaling (freq_factors): expected a list of factors")
        for i, f in enumerate(factors):
            _number(f"rope_scaling.factors[{i}]", f)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, (list, tuple)) or not factors:
                raise ValueError(f"rope_scaling (longrope): expected a list {key}")
            for i, f in enumerate(factors):
                _number(f"rope_scaling.{key}[{i}]", f)


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs:
    """The network's shape, read from the checkpoint (GGUF metadata or HF config.json)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF's rope_scaling dict: {"rope_type": "linear", "factor": f} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}; {"rope_type": "freq_factors", "factors": [...]}
    # for GGUF files that store llama3 scaling as a rope_freqs tensor; None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2, StableLM, GPT-NeoX)
    # --- the relatives of LLaMA (see the table above); the defaults are LLaMA's
    o_bias: bool = False  # o_proj carries a bias (GPT-NeoX)
    mlp_bias: bool = False  # the MLP's projections carry biases (GPT-NeoX)
    mlp_gated: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-NeoX)
    hidden_act: str = "silu"  # "silu", "gelu" (erf), "gelu_tanh" (HF gelu_pytorch_tanh: Gemma)
    norm_type: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with a bias: StableLM, NeoX)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for Gemma
    qk_norm: bool = False  # each head's q and k RMS-normed before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # Gemma: attention and MLP outputs normed too, before the adds
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * this values of each head
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (None: head_dim)
    final_logit_softcapping: float | None = None  # logits -> c tanh(logits / c)
    # sliding-window attention: a query at position p sees keys p - sliding_window + 1 .. p in the
    # layers `layer_types` marks "sliding_attention" (None: every layer when sliding_window is set)
    sliding_window: int | None = None
    layer_types: list | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE base, plain (Gemma 3's 10000)
    model_type: str = field(default="llama", compare=False)  # the HF family, for exporting
    extra: dict = field(default_factory=dict)  # what the checkpoint says that the network ignores

    def __post_init__(self):
        """Refuse a shape no network has (ValueError naming the field): sizes are positive
        integers, heads split evenly, RoPE's numbers are finite and positive. A checkpoint's
        reader turns this into an error naming its file and key."""
        for name in INT_FIELDS:
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}={value!r}: expected an integer")
            if value < 1:
                raise ValueError(f"{name}={value!r}: expected at least 1")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads} (and no head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: expected an even number (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.max_position_embeddings < 2:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings}: expected "
                             f"at least 2 (a prompt token and a reply token)")
        _number("rms_norm_eps", self.rms_norm_eps, positive=False)
        _number("rope_theta", self.rope_theta)
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        self.hidden_act = ACTIVATIONS[self.hidden_act]
        if self.norm_type not in ("rms", "layer"):
            raise ValueError(f"norm_type={self.norm_type!r}: expected 'rms' or 'layer'")
        _number("norm_offset", self.norm_offset, positive=False)
        _number("embed_scale", self.embed_scale)
        factor = _number("partial_rotary_factor", self.partial_rotary_factor)
        if factor > 1 or int(self.head_dim * factor) < 2 or int(self.head_dim * factor) % 2:
            raise ValueError(f"partial_rotary_factor={factor}: expected a fraction of head_dim="
                             f"{self.head_dim} that rotates an even number (>= 2) of values")
        for name in ("query_pre_attn_scalar", "final_logit_softcapping", "rope_local_theta"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
        if self.sliding_window is not None:
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, (int, np.integer)) \
                    or self.sliding_window < 1:
                raise ValueError(f"sliding_window={self.sliding_window!r}: expected an integer of at least 1")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_hidden_layers \
                    or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types: expected {self.num_hidden_layers} entries, each "
                                 f"'full_attention' or 'sliding_attention'")
            self.layer_types = list(self.layer_types)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier position)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def local_rope(self, layer: int) -> bool:
        """Whether `layer` rotates with the sliding layers' own frequencies (rope_local_theta)."""
        return self.rope_local_theta is not None and self.window(layer) is not None

    @property
    def rotary_dim(self) -> int:
        """How many values of each head RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """What q . k is multiplied by before the softmax."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_llama(self) -> bool:
        """Whether this is the plain LLaMA network (as every field's default, biases aside)."""
        return (self.mlp_gated and not self.o_bias and not self.mlp_bias and self.hidden_act == "silu"
                and self.norm_type == "rms" and self.norm_offset == 0 and not self.qk_norm
                and not self.sandwich_norms and not self.parallel_residual and self.rotary_dim == self.head_dim
                and self.embed_scale == 1 and self.query_pre_attn_scalar in (None, self.head_dim)
                and self.final_logit_softcapping is None
                and self.sliding_window is None and self.rope_local_theta is None
                and kind_of(self.rope_scaling) != "longrope")

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a transformers config.json dict (formats/hf_config.py: every family above)."""
        from homellm.model.formats.hf_config import args_from_config
        return args_from_config(config)

    def to_hf_config(self) -> dict:
        """The transformers config dict of this network's family (formats/hf_config.py)."""
        from homellm.model.formats.hf_config import config_from_args
        return config_from_args(self)

    @property
    def n_params(self) -> int:
        h, d, kv = self.hidden_size, self.head_dim, self.num_key_value_heads
        attn = h * d * self.num_attention_heads * 2 + h * d * kv * 2
        mlp = (3 if self.mlp_gated else 2) * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + embed + h


def kind_of(scaling: dict | None) -> str:
    """A rope_scaling dict's type ('default' for None)."""
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def rope_attention_factor(args: ModelArgs) -> float:
    """What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise)."""
    if kind_of(args.rope_scaling) == "longrope":
        return float(args.rope_scaling["attention_factor"])
    return 1.0


def rope_inv_freq(args: ModelArgs, local: bool = False) -> np.ndarray:
    """Inverse frequencies (rotary_dim/2,) float32, as transformers computes them: plain, or
    with linear, llama3 or LongRoPE scaling. local: the sliding layers' own (Gemma 3:
    rope_local_theta, unscaled). LongRoPE uses its short factors, the ones for contexts up to
    original_max_position_embeddings (formats/hf_config.py caps the context there)."""
    d = args.rotary_dim
    theta = args.rope_local_theta if local and args.rope_local_theta is not None else args.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = args.rope_scaling
    if not scaling or (local and args.rope_local_theta is not None):
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "freq_factors":  # GGUF rope_freqs.weight: one divisor per frequency
        return (inv_freq / np.asarray(scaling["factors"], dtype=np.float64)).astype(np.float32)
    if kind == "longrope":
        # transformers computes these in float32: inv_freq = 1 / (ext * base ** (i / d))
        base = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d))
        return (np.float32(1.0) / (np.asarray(scaling["short_factor"], dtype=np.float32) * base)).astype(np.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, smooth in between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(mid, blended, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (expected 'linear' or 'llama3')")
