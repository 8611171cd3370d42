"""The LLaMA architecture in one file.

Covers SmolLM2, TinyLlama, Llama 2 and 3.x, Mistral-style models (no sliding window) and
Qwen2: the differences between them are fields of `ModelArgs` (grouped-query attention,
RoPE base and scaling, tied embeddings, norm eps, q/k/v bias), never subclasses.

Parameter and config names are Hugging Face's, so a transformers checkpoint loads by name.
The model holds no KV cache: the engine owns one and passes it to `forward`.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from homellm.model import config
from homellm.model.config import ModelArgs  # noqa: F401  (re-exported: the network's shape)


class KVCacheProtocol(Protocol):
    """What attention needs from the engine's cache (see engine/kv_cache.py).

    With an int start_pos, every row is at the same position and update returns tensors
    (B, n_kv_heads, start_pos + T, head_dim). With a (B,) tensor of start positions (a batch of
    independent sequences, engine/batch.py), it returns one (1, n_kv_heads, start_pos[b] + T,
    head_dim) tensor per row, for keys and for values.
    """

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int | Tensor
               ) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos; return keys and values so far."""


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim/2,) float32 with linear or llama3 scaling (model/config.py)."""
    return torch.from_numpy(config.rope_inv_freq(args))


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) bool, True = attend: the T queries are the last T of S positions."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


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
        # optional attention for a batch whose rows are at their own positions: (q (B, n_heads,
        # T, hd), keys, values: per row (1, n_kv, S_b, hd)) -> (B, T, n_heads * hd), row b's
        # queries being the last T of its S_b positions (engine/batch.py sets one that calls
        # the C kernel row by row on one thread); None: `attend` row by row
        self.rows_attention_fn = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | Tensor,
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
        if isinstance(start_pos, Tensor):
            # rows at their own positions: each attends to its own keys, exactly as it would
            # alone (no padding, so a row's result does not depend on the others)
            keys, values = cache.update(self.layer, k, v, start_pos)  # per row (1, n_kv, S_b, hd)
            if self.rows_attention_fn is not None:
                y = self.rows_attention_fn(q, keys, values)
            else:
                y = torch.cat([self.attend(q[b:b + 1], kb, vb, None if T == 1 or self.attention_fn
                                           else causal_mask(T, kb.shape[2], x.device))
                               for b, (kb, vb) in enumerate(zip(keys, values))])
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v, start_pos)  # (B, n_kv_heads, S, head_dim)
            y = self.attend(q, k, v, mask)
        return self.o_proj(y.to(x.dtype))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T, n_heads * head_dim) for q (B, n_heads, T, hd), k, v (B, n_kv_heads, S, hd)."""
        B, _, T, _ = q.shape
        q, k = q.to(v.dtype), k.to(v.dtype)
        if mask is None and T > 1 and self.attention_fn is not None:  # (T = 1: SDPA is faster)
            return self.attention_fn(q, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(B, T, -1)


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
        """cos, sin (..., head_dim) for integer positions (...,), computed in float32."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, tokens: Tensor, start_pos: int | Tensor = 0,
                cache: KVCacheProtocol | None = None, mask: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """Logits for tokens (B, T) placed at positions start_pos.. start_pos+T-1.

        start_pos is an int (every row at the same positions) or a (B,) long tensor: row b at
        start_pos[b].., its own sequence in a batched cache (needs a cache; attention per row).
        With a cache, keys and values of earlier positions come from it. `mask` is an
        optional boolean (B or 1, 1, T, S) attention mask (True = attend); without one the
        attention is causal. `last_only` computes logits for the last position only.
        Returns float32 logits (B, T or 1, vocab_size).
        """
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        offsets = torch.arange(T, device=tokens.device)
        if isinstance(start_pos, Tensor):
            if cache is None or mask is not None:
                raise ValueError("per-row start positions need a batched cache and no mask")
            cos, sin = self.rope(start_pos.to(tokens.device)[:, None] + offsets)  # (B, T, head_dim)
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim): the same for every head
        else:
            cos, sin = self.rope(start_pos + offsets)  # (T, head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if mask is None and cache is not None and not isinstance(start_pos, Tensor) \
                and start_pos > 0 and T > 1 \
                and self.model.layers[0].self_attn.attention_fn is None:  # (it sees the cache)
            # queries at start_pos+i see every cached key and the new keys up to themselves
            mask = causal_mask(T, start_pos + T, tokens.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, cache, mask)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.lm_head(x).float()
