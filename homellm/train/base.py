"""The frozen base model that LoRA trains on: float32, or int8 / int4 weights (QLoRA-style).

Built by the engine's loader without its inference-only parts: the C attention kernel and
the fused projections have no backward, so attention runs through SDPA and each projection
is its own layer. Quantized bases keep every projection (and the head) as a
FrozenQuantLinear; norms and the embedding table stay float32.
"""
from __future__ import annotations

import torch
from torch import nn

from homellm.model.llama import Llama


def _set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def load_base(name_or_path, quant: str = "none", device: str | torch.device = "cpu",
              tokenizer: bool = True):
    """(checkpoint, tokenizer, model) for training; the model's weights are all frozen.
    tokenizer=False skips the tokenizer (None is returned in its place)."""
    from homellm.catalog import resolve
    from homellm.engine.loader import build_model
    from homellm.engine.quant import Int4Linear, Int8Linear
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    from homellm.train.frozen import FrozenQuantLinear

    ckpt = open_checkpoint(resolve(name_or_path))
    tok = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template) if tokenizer else None
    device = torch.device(device)
    model: Llama = build_model(ckpt, device=device, dtype=torch.float32,
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
    for layer in model.model.layers:
        layer.self_attn.attention_fn = None
        layer.self_attn.qkv_proj = None
        layer.mlp.gate_up_proj = None
    model.requires_grad_(False)
    return ckpt, tok, model
