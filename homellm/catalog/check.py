"""What `pull` checks before a model joins the catalog: that `run` will work on it.

Opening the checkpoint (formats/) already checks the file's layout, metadata and tensor
shapes. Here the rest of what `run` needs: the tokenizer builds, the chat template renders a
one-message conversation within its limits (tokenizer/chat_template.py) into token ids the
network has, and no weight holds NaN or infinity (every float, and the scale of every
quantized block: a pull reads the whole file anyway). A model that fails is refused with
the reason; nothing here needs PyTorch for a GGUF file.
"""
from __future__ import annotations

import numpy as np

from homellm.errors import HomellmError, ModelFileError

PROBE = [{"role": "user", "content": "Hello"}]
CHUNK_BYTES = 64 << 20  # bytes of a tensor scanned at a time

# ggml block layouts: type id -> (block bytes, byte offsets of its float16 scales)
# (ggml-common.h: block_q4_0 {d, qs}, block_q4_1 {d, m, qs}, block_q5_0 {d, qh, qs},
#  block_q5_1 {d, m, qh, qs}, block_q8_0 {d, qs}; block_q2_K {scales, qs, d, dmin},
#  block_q3_K {hmask, qs, scales, d}, block_q4_K / q5_K {d, dmin, ...}, block_q6_K {ql, qh, scales, d})
BLOCK_SCALES = {2: (18, (0,)), 3: (20, (0, 2)), 6: (22, (0,)), 7: (24, (0, 2)), 8: (34, (0,)),
                10: (84, (80, 82)), 11: (110, (108,)), 12: (144, (0, 2)), 13: (176, (0, 2)),
                14: (210, (208,))}
F32, F16, BF16 = 0, 1, 30


def _finite_rows(rows: np.ndarray, ggml_type: int) -> bool:
    """Whether raw rows (n, bytes_per_row) of a GGML tensor hold only finite values/scales."""
    if ggml_type in BLOCK_SCALES:
        size, offsets = BLOCK_SCALES[ggml_type]
        blocks = np.ascontiguousarray(rows).view(np.uint8).reshape(-1, size)
        return all(np.isfinite(blocks[:, o:o + 2].copy().view("<f2")).all() for o in offsets)
    if ggml_type == BF16:  # exponent bits all ones: inf or NaN
        return not ((np.ascontiguousarray(rows).view("<u2") & 0x7F80) == 0x7F80).any()
    if ggml_type in (F32, F16):
        return bool(np.isfinite(np.ascontiguousarray(rows).view("<f4" if ggml_type == F32 else "<f2")).all())
    return True  # a type without a known layout: the runtime's NaN check reports it


def _chunks(n_rows: int, row_bytes: int):
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for r in range(0, n_rows, step):
        yield slice(r, min(n_rows, r + step))


def finite(t) -> bool:
    """Whether a checkpoint tensor (GGMLTensor blocks, numpy or torch floats) is all finite."""
    kind = getattr(t, "ggml_type", None)
    if kind is not None:
        data = np.asarray(t.data)
        data = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
        return all(_finite_rows(data[s], int(kind)) for s in _chunks(data.shape[0], data.shape[1]))
    if hasattr(t, "detach"):  # torch
        import torch
        flat = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(1, -1)
        row_bytes = flat.shape[1] * flat.element_size()
        return all(bool(torch.isfinite(flat[s]).all()) for s in _chunks(flat.shape[0], row_bytes))
    a = np.asarray(t)
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    return all(bool(np.isfinite(a[s]).all()) for s in _chunks(a.shape[0], a.strides[0]))


def check_runnable(ckpt) -> None:
    """HomellmError (ModelFileError for the weights) unless `run` can use this checkpoint."""
    from homellm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    if not tokenizer.encode("Hello", add_special_tokens=False):
        raise HomellmError("the tokenizer encodes 'Hello' to no tokens: its vocabulary cannot "
                           "write text")
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True)
    if not ids:
        raise HomellmError("the chat template renders an empty prompt for a one-message "
                           "conversation")
    vocab = ckpt.args.vocab_size
    if max(ids) >= vocab:
        raise HomellmError(f"the tokenizer gives token id {max(ids)} for a one-message "
                           f"conversation, but the network has {vocab} tokens (ids 0..{vocab - 1})")
    for name, t in ckpt.tensors.items():
        if not finite(t):
            if ckpt.format == "gguf":
                from homellm.model.formats.gguf import gguf_name
                name = f"{gguf_name(name) or name} ({name})"
            raise ModelFileError(f"tensor {name} holds NaN or infinite values"
                                 + (" (in its block scales)" if getattr(t, "ggml_type", None)
                                    in BLOCK_SCALES else ""))
