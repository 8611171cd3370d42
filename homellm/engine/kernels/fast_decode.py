"""The whole single-token decode step in one C call (hl_decode in ggml_cpu.c).

PyTorch eager spends a decode step on ~1200 small ops; here one call runs the network:
embedding row, per layer RMSNorm, q/k/v (+ bias), RoPE (HF rotate-half, inv_freq from
`rope_inv_freq`, so linear/llama3 scaling is the caller's), KV cache write, GQA attention
over positions 0..pos, o_proj, residual, RMSNorm, SiLU-gated MLP, residual, final norm,
lm_head. The matvecs work on the raw GGUF blocks (see ggml_linear.py); float weights work
too (F32/F16 rows).

The KV cache is an engine `KVCache` (B=1, n_kv_heads, max_seq_len, head_dim) float32: pass
the engine's own, so a PyTorch prefill (which writes it through `KVCache.update`) and this
decoder share one cache.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from homellm.engine import kernels
from homellm.engine.kernels.ggml_linear import repack_q4
from homellm.engine.kv_cache import KVCache
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor
from homellm.model.llama import Llama, ModelArgs, rope_inv_freq

_MATS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_VECS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj.bias",
         "self_attn.k_proj.bias", "self_attn.v_proj.bias")


class FastDecoder:
    """decode(token, pos) -> logits (vocab,) float32, with the KV cache in `self.cache`.

    Build it with `FastDecoder.from_checkpoint(ckpt, cache=engine.cache)`.
    packed: on AVX512-VNNI CPUs, keep a reordered copy of the Q4_0/Q4_1 layer weights (same size
    as the blocks; ~1.5x faster decode); False decodes straight from the memory-mapped blocks.
    tensors: HF names -> GGMLTensor (Q4_0, Q4_1, Q8_0, F16, F32 blocks) or float tensors,
    as in `Checkpoint.tensors`. The decoder keeps references, never float copies of blocks.
    """

    def __init__(self, args: ModelArgs, tensors: dict, cache: KVCache | None = None,
                 max_seq_len: int = 2048, threads: int | None = None, path: str | None = None,
                 hi: bool = True, packed: bool = True):
        lib = kernels.load()
        if lib is None:
            raise RuntimeError(f"homellm kernels are unavailable: {kernels.status()}")
        self.lib, self.args = lib, args
        self.cache = cache if cache is not None else KVCache(args, max_seq_len)
        k0 = self.cache.k[0]
        if k0.dtype != torch.float32 or k0.shape[0] != 1 or k0.device.type != "cpu":
            raise ValueError(f"FastDecoder needs a CPU float32 KV cache of batch 1, got "
                             f"{tuple(k0.shape)} {k0.dtype} on {k0.device}")
        self._keep: list = []  # every buffer the C side points to
        inv_freq = rope_inv_freq(args).float().contiguous()
        self._keep.append(inv_freq)
        self.ctx = lib.hl_model_new(args.num_hidden_layers, args.hidden_size, args.num_attention_heads,
                                    args.num_key_value_heads, args.head_dim, args.intermediate_size,
                                    args.vocab_size, args.rms_norm_eps, inv_freq.data_ptr())
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            for j, name in enumerate(_MATS):
                t = tensors[p + name + ".weight"]
                self._set_mat(i, j, t, p + name)
                pk = repack_q4(t) if packed and path in (None, "auto", "avx512") \
                    and isinstance(t, GGMLTensor) else None
                if pk is not None:
                    self._keep.append(pk)
                    lib.hl_model_set_packed(self.ctx, i, j, pk.data_ptr())
            for j, name in enumerate(_VECS):
                full = p + name + ("" if name.endswith(".bias") else ".weight")
                if full in tensors:
                    lib.hl_model_set_vec(self.ctx, i, j, self._vec(tensors[full]))
            lib.hl_model_set_kv(self.ctx, i, self.cache.k[i].data_ptr(), self.cache.v[i].data_ptr(),
                                self.cache.max_seq_len)
        embed = tensors["model.embed_tokens.weight"]
        self._set_mat(0, -1, embed, "model.embed_tokens")
        head = embed if args.tie_word_embeddings else tensors["lm_head.weight"]
        self._set_mat(0, -2, head, "lm_head")
        lib.hl_model_set_vec(self.ctx, -1, 0, self._vec(tensors["model.norm.weight"]))
        self.set_threads(threads, path, hi)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **kw) -> "FastDecoder":
        return cls(ckpt.args, ckpt.tensors, **kw)

    @classmethod
    def from_model(cls, model: Llama, **kw) -> "FastDecoder":
        """From a float Llama (its nn.Linear weights are used as F32 rows)."""
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        return cls(model.args, tensors, **kw)

    def set_threads(self, threads: int | None = None, path: str | None = None, hi: bool = True):
        """threads (default torch.get_num_threads()); path "scalar"/"avx2"/"avx512"/None (best);
        hi: two-level int8 activations (default; see ggml_linear.matmul)."""
        self.threads = threads or torch.get_num_threads()
        if self.lib.hl_model_set_threads(self.ctx, self.threads, kernels.path_id(path), int(hi)) != 0:
            raise RuntimeError(f"kernel path {path!r} is not supported by this CPU")

    def _vec(self, t) -> int:
        t = t.dequantize() if isinstance(t, GGMLTensor) else t
        t = t.detach().float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _set_mat(self, layer: int, which: int, t, name: str):
        if isinstance(t, GGMLTensor):
            data = np.ascontiguousarray(t.data)
            gtype, (n, k) = t.ggml_type, t.shape
            ptr, row_bytes = data.ctypes.data, data.strides[0] if data.ndim == 2 else data.nbytes // n
        else:
            data = t.detach()
            if data.dtype not in (torch.float32, torch.float16):
                data = data.float()
            data = data.contiguous()
            gtype, (n, k) = (0 if data.dtype == torch.float32 else 1), data.shape
            ptr, row_bytes = data.data_ptr(), data.stride(0) * data.element_size()
        if gtype not in kernels.SUPPORTED_TYPES:
            raise ValueError(f"{name}: ggml type {t.type_name} is not supported by the fast decoder "
                             f"(expected F32, F16, Q4_0, Q4_1 or Q8_0)")
        self._keep.append(data)
        if self.lib.hl_model_set_mat(self.ctx, layer, which, gtype, n, k, ptr, row_bytes) != 0:
            raise ValueError(f"{name}: shape {(n, k)} does not fit ggml type {gtype} blocks")

    def decode(self, token: int, pos: int, out: Tensor | None = None) -> Tensor:
        """Logits (vocab,) for `token` at position `pos`; the cache must hold 0..pos-1."""
        logits = out if out is not None else torch.empty(self.args.vocab_size, dtype=torch.float32)
        if self.lib.hl_decode(self.ctx, int(token), int(pos), logits.data_ptr()) != 0:
            raise ValueError(f"decode: token {token} or position {pos} out of range "
                             f"(vocab {self.args.vocab_size}, cache {self.cache.max_seq_len})")
        return logits

    def reset(self):
        """Forget the cached positions (the buffers stay allocated)."""
        self.cache.tokens = []

    def __del__(self):
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx:
            self.lib.hl_model_free(ctx)
