"""Masked losses: per-token log-probabilities of the labelled positions only.

The head (vocab x hidden) is applied to the positions that carry a label, never to the whole
batch, in chunks whose logits are made again in the backward (`_HeadLogprobs`): peak memory
holds one chunk of logits (CHUNK x vocab float32), not B x T x vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from homellm.train.batches import IGNORE

CHUNK = 128  # labelled positions per head chunk (128 x 49152 float32 logits: 24 MiB)


def final_hidden(model: nn.Module, tokens: Tensor, checkpointing: bool = False,
                 positions: Tensor | None = None, mask=None) -> Tensor:
    """The final-norm hidden states (B, T, hidden) of causal attention over tokens (B, T);
    what model/llama.py's forward computes before its head. Packed rows (several sequences
    in one row) give each token's own `positions` (B, T) and the attention's `mask`: (B, 1,
    T, T) bool, True = attend, or an AttentionLayout (model/llama.py)."""
    x = model.model.embed_tokens(tokens)
    if model.args.embed_scale != 1.0:  # Gemma: sqrt(hidden_size), in the table's dtype (as forward)
        x = x * torch.tensor(model.args.embed_scale, dtype=x.dtype)
    pos = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
    ropes = {}
    for local in {layer.self_attn.local_rope for layer in model.model.layers}:  # Gemma 3: two bases
        cos, sin = model.rope(pos, local)  # (T, rot) or (B, T, rot)
        if positions is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rot): every head alike
        ropes[local] = cos.to(x.dtype), sin.to(x.dtype)
    for layer in model.model.layers:
        cos, sin = ropes[layer.self_attn.local_rope]
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, 0, None, mask, use_reentrant=False)
        else:
            x = layer(x, cos, sin, 0, None, mask)
    return model.model.norm(x)


def _head_weight(head: nn.Module, dtype: torch.dtype) -> Tensor:
    w = getattr(head, "weight", None)
    return w if isinstance(w, Tensor) and w.dtype == dtype else head.dequantize(dtype)


def _logits(head: nn.Module, h: Tensor, cd: torch.dtype) -> Tensor:
    logits = h.to(cd) @ _head_weight(head, cd).T  # (n, vocab)
    bias = getattr(head, "bias", None)
    return logits if bias is None else logits + bias.to(cd)


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[target] for a chunk of positions, keeping only h: the (n, vocab)
    logits are made again in the backward, where
        d logp_t / d logits = onehot(t) - softmax(logits)
    is built in place in the softmax's own buffer (no logits, probabilities or one-hot kept
    between the passes). The head is frozen: only h gets a gradient."""

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
        cd = getattr(head, "compute_dtype", None) or h.dtype
        ctx.head, ctx.cd, ctx.acc = head, cd, torch.promote_types(cd, torch.float32)
        logp = torch.log_softmax(_logits(head, h, cd), dim=-1, dtype=ctx.acc)
        ctx.save_for_backward(h, targets)
        return logp.gather(1, targets[:, None])[:, 0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, targets = ctx.saved_tensors
        g = torch.softmax(_logits(ctx.head, h, ctx.cd), dim=-1, dtype=ctx.acc)  # (n, vocab)
        g.mul_(-grad[:, None].to(ctx.acc))
        g[torch.arange(g.shape[0], device=g.device), targets] += grad.to(ctx.acc)
        return (g.to(ctx.cd) @ _head_weight(ctx.head, ctx.cd)).to(h.dtype), None, None


def labelled_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor,
                      checkpointing: bool = False) -> tuple[Tensor, Tensor]:
    """log p(labels[b, t+1] | tokens[b, :t+1]) at every labelled position, flattened (n,),
    and the row b of each (n,)."""
    hidden = final_hidden(model, tokens, checkpointing)[:, :-1]  # (B, T-1, hidden)
    targets = labels[:, 1:]
    where = targets != IGNORE
    h, t = hidden[where], targets[where]  # (n, hidden), (n,)
    rows = where.nonzero()[:, 0]
    parts = [_HeadLogprobs.apply(h[s:s + CHUNK], t[s:s + CHUNK], model.lm_head)
             for s in range(0, h.shape[0], CHUNK)]
    logp = torch.cat(parts) if parts else hidden.new_zeros(0)
    return logp, rows


class LabelledLogprobs(nn.Module):
    """model -> labelled_logprobs as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing

    def forward(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return labelled_logprobs(self.model, tokens, labels, self.checkpointing)


def sequence_logprobs(logp: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Sum of the labelled log-probs of each row (n_rows,)."""
    return torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7):
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), log-probs summed over the reply."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
