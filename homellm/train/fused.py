"""Training-time fusions: fewer matmuls, casts and kept activations for the same numbers.

SwiGLU, h = silu(g) * u (Shazeer 2020), written as `F.silu(g) * u` keeps g, silu(g) and u
for the backward; `SwiGLU` keeps g and u only and recomputes the sigmoid:
    d silu(g) / dg = s (1 + g (1 - s)),  s = sigmoid(g)
That is one (tokens x intermediate_size) tensor less per layer: about an eighth of a LLaMA
layer's activations.

`LoRAGroup` runs the projections that share an input (q, k, v; gate, up; or one alone) as
one frozen matmul over their weights side by side plus one low-rank update:
    y = x [W_1; W_2; ..]^T + (x [A_1; A_2; ..]^T) blockdiag(s_i B_i^T)      (tokens, sum N_i)
the frozen product in the base's compute dtype (bfloat16 for a bfloat16 base, as autocast
would), the update added in float32, with a backward written out (`_LoRAGroupMatmul`) that
keeps only the cast input and the (tokens, sum r) product x A^T, and computes the adapters'
gradients in float32. Per layer that is 3 base matmuls instead of 7, two input casts instead
of seven, and no (tokens x out) scaling or addition: the update goes into the base output in
one GEMM (addmm). The weights stay where they were: each base layer's weight becomes a view
of the side-by-side tensor.

`fuse_lora` sets these as each layer's `qkv_proj`, `gate_up_proj` (with SwiGLU) and as the
o/down LoRALinear's `group`; LoRA dropout needs each layer's own mask, so with dropout > 0
only the MLP's SwiGLU is fused (`fuse_mlps`).
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


class _LoRAGroupMatmul(torch.autograd.Function):
    """y (T, N) float32 = x W^T (+ bias) + (x A^T) Bd, with A (R, K) the adapters' A side by
    side and Bd (R, N) the block-diagonal of the s_i B_i^T; W frozen (from `weight()`, so a
    quantized base is dequantized again in the backward instead of kept).

    The base product is rounded to the compute dtype but the update is added in float32: a
    small update rounded into a bfloat16 sum would be lost (training then learns slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: "LoRAGroup", *params: Tensor) -> Tensor:
        cd = group.compute_dtype
        xc = x.to(cd)  # (T, K)
        w = group.weight()  # (N, K) in cd
        y = (xc @ w.T if group.bias is None else torch.addmm(group.bias, xc, w.T)).float()
        a, bd = group.adapters(params)  # (R, K), (R, N) float32
        xa = xc @ a.to(cd).T  # (T, R)
        y.addmm_(xa.float(), bd)
        ctx.group = group
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xc, xa, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        group = ctx.group
        xc, xa, *params = ctx.saved_tensors
        cd = group.compute_dtype
        g32 = grad_y.float()  # (T, N)
        a, bd = group.adapters(params)
        gb = g32 @ bd.T  # (T, R) float32: the gradient reaching x A^T
        grad_x = (g32.to(cd) @ group.weight()).addmm_(gb.to(cd), a.to(cd))  # (T, K)
        # the adapters' gradients in float32: small matmuls over the (T, r) and (T, K) sides
        grad_a = gb.T @ xc.float()  # (R, K)
        grad_bd = xa.float().T @ g32  # (R, N), of which the diagonal blocks are used
        grads = []
        for (n0, n1), (r0, r1), s in zip(group.col_spans, group.rank_spans, group.scalings):
            grads.append(grad_a[r0:r1])  # dA_i (r_i, K)
            grads.append(s * grad_bd[r0:r1, n0:n1].T)  # dB_i (N_i, r_i)
        return (grad_x.to(ctx.x_dtype), None, *grads)


class LoRAGroup:
    """Projections sharing one input, as one matmul; members are LoRALinear layers over
    nn.Linear, BF16Linear or FrozenQuantLinear bases, all with LoRA enabled or all disabled
    (DPO's reference). A plain callable, not a module: the layers stay the parameters' home.

    `__call__` returns (..., sum N) float32, the training stream's dtype."""

    def __init__(self, layers: list):
        from homellm.train.frozen import BF16Linear
        self.layers = layers
        bases = [m.base for m in layers]
        self.compute_dtype = torch.bfloat16 if all(isinstance(b, BF16Linear) for b in bases) else torch.float32
        self.sizes = [m.out_features for m in layers]
        self.col_spans, self.rank_spans, self.scalings = [], [], []
        n0 = r0 = 0
        for m in layers:
            self.col_spans.append((n0, n0 + m.out_features))
            self.rank_spans.append((r0, r0 + m.rank))
            self.scalings.append(m.scaling)
            n0, r0 = n0 + m.out_features, r0 + m.rank
        biases = [getattr(b, "bias", None) for b in bases]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else m.lora_B.new_zeros(m.out_features)
                                   for b, m in zip(biases, layers)]).to(self.compute_dtype)
        self._weight = self._side_by_side(bases)

    def _side_by_side(self, bases: list) -> Tensor | None:
        """One (N, K) tensor holding the float bases' weights, each base's weight becoming a
        view of it (no copy kept); None for quantized bases (dequantized at each use)."""
        weights = [getattr(b, "weight", None) for b in bases]
        if any(w is None or not isinstance(w, Tensor) for w in weights) or \
                any(w.dtype != self.compute_dtype for w in weights):
            return None
        if len(bases) == 1:
            return weights[0].detach()
        joined = torch.cat([w.detach() for w in weights])
        for b, (n0, n1) in zip(bases, self.col_spans):
            view = joined[n0:n1]
            if isinstance(b.weight, nn.Parameter):
                b.weight = nn.Parameter(view, requires_grad=False)
            else:
                b.weight = view
        return joined

    def weight(self) -> Tensor:
        if self._weight is not None:
            return self._weight
        return torch.cat([m.base.dequantize(self.compute_dtype) for m in self.layers])

    def adapters(self, params) -> tuple[Tensor, Tensor]:
        """A side by side (R, K) and the block-diagonal (R, N) of s_i B_i^T, float32."""
        a = torch.cat(params[0::2]).float()
        bd = torch.block_diag(*[b.T.float() * s for b, s in zip(params[1::2], self.scalings)])
        return a, bd

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.layers[0].enabled:
            params = [p for m in self.layers for p in (m.lora_A, m.lora_B)]
            y = _LoRAGroupMatmul.apply(x2, self, *params)
        else:  # the base alone
            xc = x2.to(self.compute_dtype)
            w = self.weight()
            y = (xc @ w.T if self.bias is None else torch.addmm(self.bias, xc, w.T)).float()
        return y.reshape(*shape, y.shape[-1])

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self(x).split(self.sizes, dim=-1))


class GateUpSwiGLU(torch.autograd.Function):
    """h = silu(g) * u for y = [g | u] (..., 2F) side by side (a gate/up LoRAGroup's output):
    SwiGLU's backward written into one (..., 2F) gradient (no concatenation), in place:
        du = grad silu(g),  dg = grad u (s + silu(g) (1 - s)),  s = sigmoid(g)."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        F_ = y.shape[-1] // 2
        g, u = y[..., :F_], y[..., F_:]
        ctx.save_for_backward(y)
        return torch.sigmoid(g).mul_(g).mul_(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        F_ = y.shape[-1] // 2
        g, u = y[..., :F_], y[..., F_:]
        s = torch.sigmoid(g)
        out = torch.empty_like(y)
        dg, du = out[..., :F_], out[..., F_:]
        torch.mul(g, s, out=du)  # silu(g)
        torch.add(s, du, out=dg)
        dg.addcmul_(s, du, value=-1).mul_(u).mul_(grad)  # s + silu - s silu
        du.mul_(grad)
        return out


class _GroupSwiGLU:
    """x -> SwiGLU(gate, up) from one gate/up LoRAGroup call."""

    def __init__(self, group: LoRAGroup):
        self.group = group

    def __call__(self, x: Tensor) -> Tensor:
        return GateUpSwiGLU.apply(self.group(x))


def fuse_lora(model: nn.Module) -> bool:
    """Fuse every layer whose seven projections are LoRALinear layers without dropout (and
    MLPs' SwiGLU everywhere); True where all layers took the grouped form."""
    from homellm.train.lora import LoRALinear
    fuse_mlps(model)
    fused = True
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(isinstance(m, LoRALinear) and isinstance(m.dropout, nn.Identity) for m in projections):
            fused = False
            continue
        attn.qkv_proj = LoRAGroup([attn.q_proj, attn.k_proj, attn.v_proj]).split
        mlp.gate_up_proj = _GroupSwiGLU(LoRAGroup([mlp.gate_proj, mlp.up_proj]))
        attn.o_proj.group = LoRAGroup([attn.o_proj])
        mlp.down_proj.group = LoRAGroup([mlp.down_proj])
    return fused


def unfuse(model: nn.Module) -> None:
    """Drop the forms fuse_lora / fuse_mlps set (each layer's own projections again)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(getattr(attn.qkv_proj, "__self__", None), LoRAGroup):
            attn.qkv_proj = None
        if isinstance(mlp.gate_up_proj, (_GroupSwiGLU, _GateUp)):
            mlp.gate_up_proj = None
        for m in (attn.o_proj, mlp.down_proj):
            if getattr(m, "group", None) is not None:
                m.group = None
