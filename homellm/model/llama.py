"""The LLaMA architecture and its relatives in one file.

Covers SmolLM2, TinyLlama, Llama 2 and 3.x, Mistral, Qwen2 and Qwen3, Gemma 3, Phi-3, StableLM
and GPT-NeoX (Pythia): the differences between them are fields of `ModelArgs` (model/config.py
has the table: grouped-query attention, RoPE base, scaling and rotary fraction, tied
embeddings, norm kind and eps, biases, q/k norms, sliding windows, GeGLU, sandwich norms,
parallel attention and MLP, final logit softcapping), never subclasses.

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


class AttentionLayout(Protocol):
    """A batch whose attention a dense mask would describe wastefully (training's prefix
    trees, train/prefix_tree.py), passed in place of `mask`: it computes the attention."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None, enable_gqa: bool) -> Tensor:
        """(B, T, n_heads * head_dim) for q (B, n_heads, T, hd), k, v (B, n_kv_heads, T, hd)."""


def rope_inv_freq(args: ModelArgs, local: bool = False) -> Tensor:
    """Inverse frequencies (rotary_dim/2,) float32, scaled as config.rope_inv_freq says
    (local: the sliding layers' own base)."""
    return torch.from_numpy(config.rope_inv_freq(args, local))


def causal_mask(T: int, S: int, device=None, window: int | None = None) -> Tensor:
    """(T, S) bool, True = attend: the T queries are the last T of S positions; with a
    window, query position p sees keys p - window + 1 .. p only."""
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    if window is not None and S > window:
        mask &= ~torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T - window)
    return mask


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout on the first cos.shape[-1] values of each head (all of
    them but for a partial rotary fraction: StableLM, GPT-NeoX, some Phi-3); the rest pass."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight): offset 0 for LLaMA, 1 for Gemma (whose weights are
    stored around 0)."""

    def __init__(self, dim: int, eps: float, device=None, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)) in float32, then the input's dtype
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return (self.weight * xf).to(x.dtype) if self.weight.dtype == torch.float32 else \
            self.weight * xf.to(x.dtype)


def make_norm(args: ModelArgs, dim: int, device=None) -> nn.Module:
    """The family's norm: RMSNorm (offset as args say) or LayerNorm with a bias."""
    if args.norm_type == "layer":
        return nn.LayerNorm(dim, eps=args.rms_norm_eps, device=device)
    return RMSNorm(dim, args.rms_norm_eps, device, args.norm_offset)


ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.scale = args.attention_scale
        self.window = args.window(layer)
        self.local_rope = args.local_rope(layer)  # (which cos/sin the model hands this layer)
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.attention_bias, device=device)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias, device=device)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias, device=device)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.o_bias, device=device)
        if args.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(d, args.rms_norm_eps, device, args.norm_offset)
            self.k_norm = RMSNorm(d, args.rms_norm_eps, device, args.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        # optional x -> (q_proj(x), k_proj(x), v_proj(x)) in one call, on the same weights (the
        # loader sets it for GGUF kernels: engine/kernels FusedProjection); None: three calls
        self.qkv_proj = None
        # optional causal attention (q, k, v) -> (B, T, n_heads * head_dim), the queries being
        # the last T key positions, scaled by head_dim ** -0.5 (the loader sets engine/kernels
        # CausalAttention); used where the layer has no window or other scale
        self.attention_fn = None
        # optional attention for a batch whose rows are at their own positions: (q (B, n_heads,
        # T, hd), keys, values: per row (1, n_kv, S_b, hd)) -> (B, T, n_heads * hd), row b's
        # queries being the last T of its S_b positions; None: `attend` row by row
        self.rows_attention_fn = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | Tensor,
                cache: KVCacheProtocol | None, mask: Tensor | AttentionLayout | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else \
            (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, Tensor):
            # rows at their own positions: each attends to its own keys, exactly as it would
            # alone (no padding, so a row's result does not depend on the others)
            keys, values = cache.update(self.layer, k, v, start_pos)  # per row (1, n_kv, S_b, hd)
            if self.rows_attention_fn is not None and self.plain():
                y = self.rows_attention_fn(q, keys, values)
            else:
                y = torch.cat([self.attend(q[b:b + 1], kb, vb, None if T == 1 and self.window is None
                                           else causal_mask(T, kb.shape[2], x.device, self.window))
                               for b, (kb, vb) in enumerate(zip(keys, values))])
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v, start_pos)  # (B, n_kv_heads, S, head_dim)
            if self.window is not None and k.shape[2] > self.window:
                window = causal_mask(T, k.shape[2], x.device, self.window)
                mask = window if mask is None else mask & window
            y = self.attend(q, k, v, mask)
        return self.o_proj(y.to(x.dtype))

    def plain(self) -> bool:
        """Whether attention is the default one (scale head_dim**-0.5, no window) that
        attention_fn computes."""
        return self.window is None and self.scale == self.head_dim ** -0.5

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | AttentionLayout | None) -> Tensor:
        """(B, T, n_heads * head_dim) for q (B, n_heads, T, hd), k, v (B, n_kv_heads, S, hd)."""
        B, _, T, _ = q.shape
        q, k = q.to(v.dtype), k.to(v.dtype)
        if mask is not None and not isinstance(mask, Tensor):  # an AttentionLayout
            return mask.attend(q, k, v, None if self.scale == self.head_dim ** -0.5 else self.scale,
                               self.n_kv_heads != self.n_heads)
        if mask is None and T > 1 and self.attention_fn is not None and self.plain():
            return self.attention_fn(q, k, v)  # (T = 1: SDPA is faster)
        if mask is None and T > 1 and k.shape[2] != T:  # queries are the last T of S keys
            mask = causal_mask(T, k.shape[2], q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=None if self.scale == self.head_dim ** -0.5 else self.scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.act = ACT[args.hidden_act]
        self.gate_proj = nn.Linear(h, f, bias=args.mlp_bias, device=device) if args.mlp_gated else None
        self.up_proj = nn.Linear(h, f, bias=args.mlp_bias, device=device)
        self.down_proj = nn.Linear(f, h, bias=args.mlp_bias, device=device)
        # optional x -> silu(gate_proj(x)) * up_proj(x), as qkv_proj (SiLU-gated layers only)
        self.gate_up_proj = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:  # GPT-NeoX: down(act(up(x)))
            return self.down_proj(self.act(self.up_proj(x)))
        h = self.gate_up_proj(x) if self.gate_up_proj is not None else \
            self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    """Pre-norm attention then MLP, each added to the residual stream. Gemma's sandwich norms
    also norm each output before its add (its post_attention_layernorm is that output norm;
    the MLP's input norm is pre_feedforward_layernorm). With parallel_residual (GPT-NeoX),
    attention and MLP both read the layer's input: x + attn(norm1(x)) + mlp(norm2(x))."""

    def __init__(self, args: ModelArgs, layer: int, device=None):
        super().__init__()
        self.self_attn = Attention(args, layer, device)
        self.mlp = MLP(args, device)
        self.parallel = args.parallel_residual
        h = args.hidden_size
        self.input_layernorm = make_norm(args, h, device)
        self.post_attention_layernorm = make_norm(args, h, device)
        if args.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(args, h, device)
            self.post_feedforward_layernorm = make_norm(args, h, device)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def forward(self, x, cos, sin, start_pos, cache, mask):
        a = self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache, mask)
        if self.parallel:
            return x + a + self.mlp(self.post_attention_layernorm(x))
        if self.pre_feedforward_layernorm is not None:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
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
        self.norm = make_norm(args, args.hidden_size, device)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs, device=None):
        """device="meta" builds the shapes without memory: the loader assigns the weights."""
        super().__init__()
        self.args = args
        self.model = LlamaBody(args, device)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=device)
        self.register_buffer("inv_freq", rope_inv_freq(args).to(device), persistent=False)
        # the sliding layers' own frequencies (Gemma 3), else the same as inv_freq
        self.register_buffer("inv_freq_local", rope_inv_freq(args, local=True).to(device), persistent=False)
        self.rope_factor = config.rope_attention_factor(args)

    def rope(self, positions: Tensor, local: bool = False) -> tuple[Tensor, Tensor]:
        """cos, sin (..., rotary_dim) for integer positions (...,), computed in float32."""
        inv_freq = self.inv_freq_local if local else self.inv_freq
        angles = positions.float()[..., None] * inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        if self.rope_factor != 1.0:  # LongRoPE's attention factor
            return angles.cos() * self.rope_factor, angles.sin() * self.rope_factor
        return angles.cos(), angles.sin()

    def forward(self, tokens: Tensor, start_pos: int | Tensor = 0,
                cache: KVCacheProtocol | None = None, mask: Tensor | None = None,
                last_only: bool = False, hidden: bool = False) -> Tensor:
        """Logits for tokens (B, T) placed at positions start_pos.. start_pos+T-1.

        start_pos is an int (every row at the same positions) or a (B,) long tensor: row b at
        start_pos[b].., its own sequence in a batched cache (needs a cache; attention per row).
        With a cache, keys and values of earlier positions come from it. `mask` is an
        optional boolean (B or 1, 1, T, S) attention mask (True = attend); without one the
        attention is causal (and windowed in sliding layers). `last_only` computes logits for
        the last position only. Returns float32 logits (B, T or 1, vocab_size), or with `hidden`
        the final-norm states before the head (B, T or 1, hidden_size), in the model's dtype.
        """
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        if self.args.embed_scale != 1.0:  # Gemma: sqrt(hidden_size), in the table's dtype
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        offsets = torch.arange(T, device=tokens.device)
        if isinstance(start_pos, Tensor):
            if cache is None or mask is not None:
                raise ValueError("per-row start positions need a batched cache and no mask")
            positions = start_pos.to(tokens.device)[:, None] + offsets  # (B, T)
        else:
            positions = start_pos + offsets  # (T,)
        ropes = {}
        for local in {layer.self_attn.local_rope for layer in self.model.layers}:
            cos, sin = self.rope(positions, local)  # (T or (B, T), rotary_dim)
            if isinstance(start_pos, Tensor):
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim): every head alike
            ropes[local] = cos.to(x.dtype), sin.to(x.dtype)
        if mask is None and cache is not None and not isinstance(start_pos, Tensor) \
                and start_pos > 0 and T > 1 \
                and self.model.layers[0].self_attn.attention_fn is None:  # (it sees the cache)
            # queries at start_pos+i see every cached key and the new keys up to themselves
            mask = causal_mask(T, start_pos + T, tokens.device)
        for layer in self.model.layers:
            cos, sin = ropes[layer.self_attn.local_rope]
            x = layer(x, cos, sin, start_pos, cache, mask)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if hidden:
            return x
        logits = self.lm_head(x).float()
        if self.args.final_logit_softcapping is not None:
            c = self.args.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits
