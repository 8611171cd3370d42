"""Muon: momentum whose update is orthogonalized, for the 2-D weight matrices of a network.

For a matrix parameter W with gradient G (Jordan et al. 2024, "Muon: an optimizer for the
hidden layers of neural networks"; used by nanochat and the modded-nanogpt speedruns):
    M <- mu M + (1 - mu) G                     (momentum, as an exponential average)
    U <- mu M + (1 - mu) G                     (Nesterov: look one step ahead)
    O <- NewtonSchulz5(U) ~ the nearest semi-orthogonal matrix U (U^T U)^(-1/2)
    W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O
Newton-Schulz runs five steps of the quintic X <- a X + (b A + c A^2) X, A = X X^T, with
(a, b, c) = (3.4445, -4.7750, 2.0315), the coefficients of the original write-up: they push
every singular value of the normalized X to about 1 (roughly 0.7-1.2), quickly, which is all
an update needs.

Everything else (embeddings, the head, norm gains) is updated by AdamW in the same
optimizer (a param group with `muon=False`), so one optimizer's state_dict holds the whole
run (checkpoint.py saves it as it saves AdamW's).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """An approximately orthogonal matrix with g's singular vectors (rows x cols, float32 on
    the CPU; bfloat16 on a GPU, as the write-up does)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for param groups with muon=True (2-D matrices), AdamW for the others.

    Muon group keys: lr, momentum, nesterov, weight_decay, ns_steps.
    AdamW group keys: lr, betas, eps, weight_decay (decoupled, as torch.optim.AdamW).
    """

    def __init__(self, groups: list[dict]):
        defaults = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                        betas=(0.9, 0.95), eps=1e-8, muon=False)
        for g in groups:
            if g.get("muon"):
                bad = [p.shape for p in g["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"Muon updates 2-D matrices; got shapes {bad[:3]}")
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            o = newton_schulz(update, group["ns_steps"])
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * scale)

    def _adamw(self, group: dict):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
