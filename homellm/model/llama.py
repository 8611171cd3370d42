"""The LLaMA architecture in one file.

Covers SmolLM2, TinyLlama, Llama 2 and 3.x, Mistral-style models (no sliding window) and
Qwen2: the differences between them are fields of `ModelArgs` (grouped-query attention,
RoPE base and scaling, tied embeddings, norm eps, q/k/v bias), never subclasses.

Parameter and config names are Hugging Face's, so a transformers checkpoint loads by name.
The model holds no KV cache: the engine owns one and passes it to `forward`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

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


class KVCacheProtocol(Protocol):
    """What attention needs from the engine's cache (see engine/kv_cache.py)."""

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos; return keys and values so far."""


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim/2,) with linear or llama3 scaling (as transformers computes them)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "freq_factors":  # GGUF rope_freqs.weight: one divisor per frequency
        return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)).float()
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, smooth in between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(mid, blended, scaled).float()
    raise ValueError(f"rope_scaling type {kind!r} is not supported (expected 'linear' or 'llama3')")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype) if self.weight.dtype == torch.float32 else \
            self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.attention_bias, device=device)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias, device=device)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias, device=device)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False, device=device)
        # optional x -> (q_proj(x), k_proj(x), v_proj(x)) in one call, on the same weights (the
        # loader sets it for GGUF kernels: engine/kernels FusedProjection); None: three calls
        self.qkv_proj = None
        # optional causal attention (q, k, v) -> (B, T, n_heads * head_dim), the queries being
        # the last T key positions (the loader sets engine/kernels CausalAttention); None: SDPA
        self.attention_fn = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int,
                cache: KVCacheProtocol | None, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else \
            (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start_pos)  # (B, n_kv_heads, S, head_dim)
        q, k, v = q.to(v.dtype), k.to(v.dtype), v
        if mask is None and T > 1 and self.attention_fn is not None:  # (T = 1: SDPA is faster)
            y = self.attention_fn(q, k, v)  # (B, T, n_heads * head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y.to(x.dtype))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False, device=device)
        self.up_proj = nn.Linear(h, f, bias=False, device=device)
        self.down_proj = nn.Linear(f, h, bias=False, device=device)
        self.gate_up_proj = None  # optional x -> silu(gate_proj(x)) * up_proj(x), as qkv_proj

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate_up_proj(x) if self.gate_up_proj is not None else \
            F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device=None):
        super().__init__()
        self.self_attn = Attention(args, layer, device)
        self.mlp = MLP(args, device)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)

    def forward(self, x, cos, sin, start_pos, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        # an explicit (uninitialized) table: nn.Embedding's random init on the meta device
        # drags in torch's compiler stack (1.6 s, ~200 MB); the loader assigns the weights
        table = torch.empty(args.vocab_size, args.hidden_size, device=device)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=table)
        if device is None or torch.device(device).type != "meta":
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(DecoderLayer(args, i, device)
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs, device=None):
        """device="meta" builds the shapes without memory: the loader assigns the weights."""
        super().__init__()
        self.args = args
        self.model = LlamaBody(args, device)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=device)
        self.register_buffer("inv_freq", rope_inv_freq(args).to(device), persistent=False)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (T, head_dim) for integer positions (T,), computed in float32."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, tokens: Tensor, start_pos: int = 0, cache: KVCacheProtocol | None = None,
                mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits for tokens (B, T) placed at positions start_pos.. start_pos+T-1.

        With a cache, keys and values of earlier positions come from it. `mask` is an
        optional boolean (B or 1, 1, T, S) attention mask (True = attend); without one the
        attention is causal. `last_only` computes logits for the last position only.
        Returns float32 logits (B, T or 1, vocab_size).
        """
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
        cos, sin = self.rope(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if mask is None and cache is not None and start_pos > 0 and T > 1 \
                and self.model.layers[0].self_attn.attention_fn is None:  # (it sees the cache)
            # queries at start_pos+i see every cached key and the new keys up to themselves
            S = start_pos + T
            mask = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(start_pos)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, cache, mask)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.lm_head(x).float()
