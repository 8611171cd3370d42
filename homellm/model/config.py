"""The network's shape as a checkpoint records it, and the RoPE frequencies it implies.

Plain Python and numpy, no PyTorch: the C runtime (engine/kernels) runs a GGUF model without
importing torch. model/llama.py builds the PyTorch network from the same `ModelArgs`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np


INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")
# rope_scaling kinds rope_inv_freq computes, and the numbers each needs
ROPE_KINDS = {"linear": ("factor",),
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
                         f"(supported: 'linear', 'llama3')")
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
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
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

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a transformers config.json dict (LlamaConfig, MistralConfig, Qwen2Config)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        args = {k: config[k] for k in names if config.get(k) is not None}
        if "num_key_value_heads" not in args:
            args["num_key_value_heads"] = config["num_attention_heads"]
        if config.get("model_type") == "qwen2":
            args["attention_bias"] = True
        if config.get("rope_parameters") and "rope_scaling" not in args:  # transformers >= 5
            params = dict(config["rope_parameters"])
            args.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                args["rope_scaling"] = params
        rope = args.get("rope_scaling")
        if rope is not None and rope.get("rope_type", rope.get("type", "default")) == "default":
            args["rope_scaling"] = None
        return cls(**args)

    def to_hf_config(self) -> dict:
        """The transformers LlamaConfig dict that describes this network."""
        config = {k: v for k, v in asdict(self).items() if k != "extra"}
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                      mlp_bias=False)
        return config

    @property
    def n_params(self) -> int:
        h, d, kv = self.hidden_size, self.head_dim, self.num_key_value_heads
        attn = h * d * self.num_attention_heads * 2 + h * d * kv * 2
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + embed + h


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) with linear or llama3 scaling (as transformers computes them), float32."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "freq_factors":  # GGUF rope_freqs.weight: one divisor per frequency
        return (inv_freq / np.asarray(scaling["factors"], dtype=np.float64)).astype(np.float32)
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
