"""Training-time fusions that keep fewer activations for the backward pass.

SwiGLU, h = silu(g) * u (Shazeer 2020), written as `F.silu(g) * u` keeps g, silu(g) and u
for the backward; `SwiGLU` keeps g and u only and recomputes the sigmoid:
    d silu(g) / dg = s (1 + g (1 - s)),  s = sigmoid(g)
That is one (tokens x intermediate_size) tensor less per layer: about an eighth of a LLaMA
layer's activations. `fuse_mlps` sets it as each MLP's `gate_up_proj`, over the model's own
gate_proj and up_proj layers (LoRA-wrapped or not), so the parameters stay where they are.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(g, u)
        return torch.nn.functional.silu(g) * u

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        silu = g * s
        grad_u = grad * silu
        grad_g = grad * u * s * (1 + g * (1 - s))
        return grad_g, grad_u


class _GateUp:
    """x -> SwiGLU(gate_proj(x), up_proj(x)) for one MLP; a plain callable, not a module, so
    the projections are not registered twice."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x: Tensor) -> Tensor:
        return SwiGLU.apply(self.mlp.gate_proj(x), self.mlp.up_proj(x))


def fuse_mlps(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.mlp.gate_up_proj = _GateUp(layer.mlp)
