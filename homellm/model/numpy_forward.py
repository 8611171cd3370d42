"""The network in plain numpy, one layer at a time: a slow reference that finds where values go bad.

When a model's logits come out NaN or infinite (broken weights, NaN scales, a NaN norm eps or
RoPE base in the metadata), the user needs to know where, not "nothing to sample". This runs
a prompt through the same network as model/llama.py (HF names and layout: RMSNorm, rotate-half
RoPE from config.rope_inv_freq, grouped-query causal attention, SiLU-gated MLP), dequantizing
one layer's weights at a time in float32, and reports the first stage whose output is not
finite. It is for the error path only: no KV cache, no threads, no PyTorch.
"""
from __future__ import annotations

import numpy as np

from homellm.model.config import ModelArgs, rope_inv_freq


def _f32(t) -> np.ndarray:
    """A checkpoint tensor (GGMLTensor blocks, numpy or torch floats) as float32 numpy."""
    if hasattr(t, "dequantize_numpy"):
        return t.dequantize_numpy()
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps)) * _f32(weight)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE in HF's rotate-half layout; x (heads, T, head_dim), cos/sin (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(x: np.ndarray, tensors: dict, name: str) -> np.ndarray:
    y = x @ _f32(tensors[name + ".weight"]).T
    bias = tensors.get(name + ".bias")
    return y if bias is None else y + _f32(bias)


def stages(args: ModelArgs, tensors: dict, ids: list[int]):
    """Run `ids` (positions 0..) through the network, yielding (stage, values) after each
    stage: "the RoPE frequencies", "the token embedding", "layer N (attention)", "layer N
    (MLP)", "the final norm", and last "the output head" with the last position's logits
    (vocab,). Values are float32; a broken model makes some of them NaN or infinite."""
    if not args.is_llama:  # (the relatives' options are PyTorch's: model/llama.py)
        raise ValueError(f"the numpy reference runs the LLaMA network, not {args.model_type}'s")
    ids = np.asarray(ids, dtype=np.int64)
    T, d = len(ids), args.head_dim
    with np.errstate(all="ignore"):
        inv_freq = rope_inv_freq(args).astype(np.float32)
        yield "the RoPE frequencies (rope_theta / rope_scaling in the metadata)", inv_freq
        angles = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None]
        angles = np.concatenate([angles, angles], axis=-1)
        cos, sin = np.cos(angles), np.sin(angles)  # (T, head_dim)

        embed = tensors["model.embed_tokens.weight"]
        if hasattr(embed, "dequantize_numpy"):  # only the rows the prompt uses
            from homellm.model.formats.checkpoint import GGMLTensor
            rows = np.asarray(embed.data)[ids]
            x = GGMLTensor(embed.ggml_type, rows, (T, embed.shape[1])).dequantize_numpy()
        else:
            x = _f32(embed)[ids]
        yield "the token embedding (model.embed_tokens.weight)", x
        causal = np.tril(np.ones((T, T), dtype=bool))
        group = args.num_attention_heads // args.num_key_value_heads
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            h = _rms_norm(x, tensors[p + "input_layernorm.weight"], args.rms_norm_eps)
            q = _linear(h, tensors, p + "self_attn.q_proj").reshape(T, -1, d).transpose(1, 0, 2)
            k = _linear(h, tensors, p + "self_attn.k_proj").reshape(T, -1, d).transpose(1, 0, 2)
            v = _linear(h, tensors, p + "self_attn.v_proj").reshape(T, -1, d).transpose(1, 0, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(d))  # (heads, T, T)
            scores = np.where(causal, scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v  # (heads, T, d)
            x = x + _linear(attn.transpose(1, 0, 2).reshape(T, -1), tensors, p + "self_attn.o_proj")
            yield f"layer {i} (attention)", x
            h = _rms_norm(x, tensors[p + "post_attention_layernorm.weight"], args.rms_norm_eps)
            gate = _linear(h, tensors, p + "mlp.gate_proj")
            h = gate / (1 + np.exp(-gate)) * _linear(h, tensors, p + "mlp.up_proj")
            x = x + _linear(h, tensors, p + "mlp.down_proj")
            yield f"layer {i} (MLP)", x
        x = _rms_norm(x[-1], tensors["model.norm.weight"], args.rms_norm_eps)
        yield "the final norm (model.norm.weight)", x
        head = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
        yield f"the output head ({head})", x @ _f32(tensors[head]).T


def first_nonfinite(args: ModelArgs, tensors: dict, ids: list[int]) -> str | None:
    """The first stage (see `stages`) whose values are not all finite, or None."""
    for where, values in stages(args, tensors, ids):
        if not np.isfinite(values).all():
            return where
    return None
