"""LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen linear plus a trainable low-rank update.

    y = base(x) + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), B = 0 at start

`LoRALinear` wraps an existing layer (nn.Linear, our C-kernel GGMLLinear at run time, or a
frozen quantized layer from train/frozen.py) without copying it; `merge_lora` folds the update
back into plain nn.Linear weights. Initialization follows PEFT's default (A Kaiming-uniform
with a = sqrt(5), B zeros), so a fresh adapter leaves the model's outputs unchanged.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from homellm.train.config import LoraConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = next((t.device for t in [*base.parameters(), *base.buffers()]), None)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: the base layer alone (DPO's reference model)
        self.group = None  # train/fused.py LoRAGroup of this layer alone: the fused form

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"

    def forward(self, x: Tensor) -> Tensor:
        if self.group is not None:
            return self.group(x)
        # a bfloat16 base (train/frozen.py BF16Linear) takes x cast once, and the update is
        # computed on the same cast (as autocast would): one copy of x kept for the backward
        compute = getattr(self.base, "compute_dtype", None)
        if compute is not None:
            x = x.to(compute)
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + ((self.dropout(x) @ a.T @ b.T) * self.scaling).to(y.dtype)  # (..., out)

    def delta_weight(self) -> Tensor:
        """The update as a dense (out, in) float32 matrix: (alpha / r) B A."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(model: nn.Module, config: LoraConfig, seed: int | None = None) -> list[str]:
    """Wrap every targeted projection under model.model.layers in a LoRALinear, in place.

    Everything else is frozen; only the adapters' A and B train. The fused inference
    projections (qkv_proj, gate_up_proj), which bypass the separate layers, are switched off
    where a wrapped layer belongs to them. Returns the wrapped modules' names.
    """
    model.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    wanted = set(config.module_names)
    names = []
    for name, module in list(model.model.layers.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in wanted and not isinstance(module, LoRALinear):
            names.append(f"model.layers.{name}")
    for name in names:
        base = model.get_submodule(name)
        base.requires_grad_(False)
        _set_module(model, name, LoRALinear(base, config.rank, config.alpha, config.dropout))
    if seed is not None:
        torch.random.set_rng_state(generator_state)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if wanted & {"q_proj", "k_proj", "v_proj"}:
            attn.qkv_proj = None
        if wanted & {"gate_proj", "up_proj"}:
            mlp.gate_up_proj = None
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (A, B of every adapter), in a fixed order."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone inside the block (the DPO reference: no second copy of weights)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding W + (alpha / r) B A, in place.

    The base must have a float weight (`weight`) or a `dequantize()` method (the quantized
    training bases); the merged layer is float32.
    """
    for name, module in list(lora_layers(model)):
        base = module.base
        w = base.weight.float() if isinstance(base, nn.Linear) else base.dequantize(torch.float32)
        merged = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter(w + module.delta_weight().to(w.device), requires_grad=False)
        bias = getattr(base, "bias", None)
        if bias is not None:
            merged.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        _set_module(model, name, merged)
    from homellm.train.fused import unfuse
    unfuse(model)  # training's fused forms held the replaced layers
    return model
