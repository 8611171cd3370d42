"""Masked losses: per-token log-probabilities of the labelled positions only.

The head (vocab x hidden) is applied to the positions that carry a label, never to the whole
batch, in chunks whose logits are recomputed in the backward (torch.utils.checkpoint): peak
memory holds one chunk of logits (CHUNK x vocab float32), not B x T x vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from homellm.train.batches import IGNORE

CHUNK = 128  # labelled positions per head chunk (128 x 49152 float32 logits: 24 MiB)


def final_hidden(model: nn.Module, tokens: Tensor, checkpointing: bool = False) -> Tensor:
    """The final-norm hidden states (B, T, hidden) of causal attention over tokens (B, T);
    what model/llama.py's forward computes before its head."""
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope(torch.arange(tokens.shape[1], device=tokens.device))
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    for layer in model.model.layers:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, 0, None, None, use_reentrant=False)
        else:
            x = layer(x, cos, sin, 0, None, None)
    return model.model.norm(x)


def _chunk_logprobs(head: nn.Module, h: Tensor, targets: Tensor) -> Tensor:
    logits = head(h).float()  # (n, vocab)
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def labelled_logprobs(model: nn.Module, tokens: Tensor, labels: Tensor,
                      checkpointing: bool = False) -> tuple[Tensor, Tensor]:
    """log p(labels[b, t+1] | tokens[b, :t+1]) at every labelled position, flattened (n,),
    and the row b of each (n,)."""
    hidden = final_hidden(model, tokens, checkpointing)[:, :-1]  # (B, T-1, hidden)
    targets = labels[:, 1:]
    where = targets != IGNORE
    h, t = hidden[where], targets[where]  # (n, hidden), (n,)
    rows = where.nonzero()[:, 0]
    parts = []
    for s in range(0, h.shape[0], CHUNK):
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, model.lm_head, h[s:s + CHUNK], t[s:s + CHUNK],
                                    use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(model.lm_head, h[s:s + CHUNK], t[s:s + CHUNK]))
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
