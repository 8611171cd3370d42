"""The frozen base model that LoRA trains on: float32, or int8 / int4 weights (QLoRA-style).

Built by the engine's loader without its inference-only parts: the C attention kernel and
the fused projections have no backward, so attention runs through SDPA and each projection
is its own layer. Quantized bases keep every projection (and the head) as a
FrozenQuantLinear; norms and the embedding table stay float32.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from homellm.model.llama import Llama


def _set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def load_base(name_or_path, quant: str = "none", device: str | torch.device = "cpu",
              tokenizer: bool = True, dtype: str = "float32"):
    """(checkpoint, tokenizer, model) for training; the model's weights are all frozen.
    tokenizer=False skips the tokenizer (None is returned in its place). dtype "bfloat16"
    (with quant "none"): projections, embedding and head stored and multiplied in bfloat16,
    norms and the residual stream in float32."""
    from homellm.catalog import resolve
    from homellm.engine.loader import build_model
    from homellm.engine.quant import Int4Linear, Int8Linear
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    from homellm.train.frozen import FrozenQuantLinear

    ckpt = open_checkpoint(resolve(name_or_path))
    tok = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template) if tokenizer else None
    device = torch.device(device)
    bf16 = dtype == "bfloat16" and quant == "none"
    if bf16:
        _tensors_to_bfloat16(ckpt)
    model: Llama = build_model(ckpt, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                               quant="none" if quant == "none" else quant)
    if quant != "none":
        # the loader's int layers compute in bfloat16 without a backward: swap each for a
        # frozen layer over the file's own tensor (exact codes for GGUF Q4 blocks), one at a time
        head = "model.embed_tokens" if ckpt.args.tie_word_embeddings else "lm_head"
        for name, module in list(model.named_modules()):
            if isinstance(module, (Int8Linear, Int4Linear)):
                source = head if name == "lm_head" else name
                bias = module.bias if module.bias is not None else None
                _set_module(model, name, FrozenQuantLinear.from_tensor(
                    ckpt.tensors[f"{source}.weight"], quant, bias))
    if bf16:
        _to_bfloat16(model)
    for layer in model.model.layers:
        layer.self_attn.attention_fn = None
        layer.self_attn.qkv_proj = None
        layer.mlp.gate_up_proj = None
    model.requires_grad_(False)
    return ckpt, tok, model


def _tensors_to_bfloat16(ckpt):
    """The checkpoint's float matrices as bfloat16 before the build, one at a time.

    A HF folder's tensors are views of memory-mapped files whose pages stay resident once
    read, for as long as the map is open: each tensor is read through its own short-lived map
    instead (the checkpoint's views are never touched), so the float32 file never sits in
    memory next to its bfloat16 copy (peak RSS of loading SmolLM2-135M: 1028 -> ~500 MB)."""
    from safetensors import safe_open

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16) if t.is_floating_point() and t.dim() == 2 else t.clone()

    if ckpt.format != "hf":  # GGUF blocks: dequantized tensor by tensor by the loader
        return
    for f in sorted(Path(ckpt.source).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            names = [n for n in st.keys() if n in ckpt.tensors]
        for name in names:
            with safe_open(f, framework="pt") as st:
                ckpt.tensors[name] = convert(st.get_tensor(name))


def _to_bfloat16(model: Llama):
    """Swap every float nn.Linear (and the embedding) for its bfloat16 twin, one at a time;
    a tied head keeps sharing the (bfloat16) embedding table."""
    from homellm.train.frozen import BF16Embedding, BF16Linear
    embed = model.model.embed_tokens
    tied = isinstance(embed, nn.Embedding) and model.lm_head.weight is embed.weight
    if isinstance(embed, nn.Embedding):  # (the loader built it in bfloat16 already: no copies)
        model.model.embed_tokens = BF16Embedding(embed.weight.detach().to(torch.bfloat16))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            weight = model.model.embed_tokens.weight if name == "lm_head" and tied else module.weight
            _set_module(model, name, BF16Linear(weight, module.bias))  # (a bf16 table: no copy)
