"""The C runtime's single-token decode step on a PyTorch KV cache (for the PyTorch engine path).

`FastDecoder` is a `NativeModel` (native.py: hl_decode, the whole step in one C call) whose KV
cache is the engine's PyTorch `KVCache` (B=1, n_kv_heads, max_seq_len, head_dim) float32, so a
PyTorch prefill (which writes it through `KVCache.update`) and this decoder share one cache,
and whose logits come back as torch tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from homellm.engine.kernels.native import NativeModel
from homellm.engine.kernels.threads import kernel_threads
from homellm.engine.kv_cache import KVCache
from homellm.model.formats.checkpoint import Checkpoint
from homellm.model.llama import Llama, ModelArgs


class FastDecoder:
    """decode(token, pos) -> logits (vocab,) float32 tensor, with the KV cache in `self.cache`.

    Build it with `FastDecoder.from_checkpoint(ckpt, cache=engine.cache)`. tensors: HF names ->
    GGMLTensor (Q4_0, Q4_1, Q8_0, F16, F32 blocks) or float tensors, as in `Checkpoint.tensors`;
    the decoder keeps references, never float copies of blocks. threads (default: $HOMELLM_THREADS,
    else one per core), path, hi, packed: see NativeModel.
    """

    def __init__(self, args: ModelArgs, tensors: dict, cache: KVCache | None = None,
                 max_seq_len: int = 2048, threads: int | None = None, path: str | None = None,
                 hi: bool = True, packed: bool = True):
        self.args = args
        self.cache = cache if cache is not None else KVCache(args, max_seq_len)
        k0 = self.cache.k[0]
        if k0.dtype != torch.float32 or k0.shape[0] != 1 or k0.device.type != "cpu":
            raise ValueError(f"FastDecoder needs a CPU float32 KV cache of batch 1, got "
                             f"{tuple(k0.shape)} {k0.dtype} on {k0.device}")
        kv = [(k[0].numpy(), v[0].numpy()) for k, v in zip(self.cache.k, self.cache.v)]
        self.native = NativeModel(args, tensors, self.cache.max_seq_len, kv=kv, path=path, hi=hi,
                                  packed=packed, threads=threads or kernel_threads())
        self.threads = self.native.threads

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **kw) -> "FastDecoder":
        return cls(ckpt.args, ckpt.tensors, **kw)

    @classmethod
    def from_model(cls, model: Llama, **kw) -> "FastDecoder":
        """From a float Llama (its nn.Linear weights are used as F32 rows)."""
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        return cls(model.args, tensors, **kw)

    def set_threads(self, threads: int | None = None, path: str | None = None, hi: bool = True):
        self.native.set_threads(threads or kernel_threads(), path, hi)
        self.threads = self.native.threads

    def decode(self, token: int, pos: int, out: Tensor | None = None) -> Tensor:
        """Logits (vocab,) for `token` at position `pos`; the cache must hold 0..pos-1."""
        logits = out if out is not None else torch.empty(self.args.vocab_size, dtype=torch.float32)
        self.native.decode(token, pos, out=logits.numpy())
        return logits

    def reset(self):
        """Forget the cached positions (the buffers stay allocated)."""
        self.cache.tokens = []
