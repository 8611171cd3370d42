"""Tiny GGUF models made in a test: random weights, a byte-level vocabulary, nothing downloaded.

    from gguf_fixtures import TINY_LLAMA, tiny_llama_state, write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, "q8_0")
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import torch

from homellm.model.formats.gguf import expected_shapes, write_gguf
from homellm.model.llama import ModelArgs

# hidden 64, 2 layers, 4 heads of 16, 2 kv heads, vocab 256 (one token per byte)
TINY_LLAMA = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
TINY_TIED = dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True)
TINY_QWEN2 = dataclasses.replace(TINY_LLAMA, attention_bias=True, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0)


def tiny_llama_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights in HF names and layout for `args` (norms near 1, weights ~0.05)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=g)
    return state


def byte_tokens() -> list[str]:
    """The 256 single-byte tokens in GPT-2's byte-level alphabet, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_tokenizer_fields(vocab_size: int = 256) -> dict:
    """tokenizer.ggml.* fields of a gpt2-BPE vocabulary: 256 byte tokens, a few merges."""
    tokens = byte_tokens()
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    return {
        "model": "gpt2", "pre": "default", "tokens": tokens[:vocab_size],
        "token_type": [1] * vocab_size, "merges": ["Ġ t", "h e", "Ġt he"],
        "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": False,
    }


def write_tiny_gguf(path: Path, args: ModelArgs = TINY_LLAMA, out_type: str = "f32",
                    tokenizer_fields: dict | None = None, seed: int = 0) -> Path:
    """A tiny random model written with write_gguf; the default vocabulary is byte-level."""
    if tokenizer_fields is None:
        tokenizer_fields = byte_tokenizer_fields(args.vocab_size)
    return write_gguf(path, args, tiny_llama_state(args, seed), out_type=out_type,
                      tokenizer_fields=tokenizer_fields, chat_template=None,
                      metadata={"name": "tiny"})


# byte offset of the float16 super-block scale d (and dmin) inside one K-quant block
_K_SCALE_OFFSETS = {
    gguf.GGMLQuantizationType.Q2_K: (80, 82),   # scales[16] qs[64] d dmin
    gguf.GGMLQuantizationType.Q3_K: (108,),     # hmask[32] qs[64] scales[12] d
    gguf.GGMLQuantizationType.Q4_K: (0, 2),     # d dmin scales[12] qs[128]
    gguf.GGMLQuantizationType.Q5_K: (0, 2),     # d dmin scales[12] qh[32] qs[128]
    gguf.GGMLQuantizationType.Q6_K: (208,),     # ql[128] qh[64] scales[16] d
}


def random_kquant(qtype: gguf.GGMLQuantizationType, rows: int, cols: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Valid raw K-quant blocks (rows, bytes_per_row): random quants, d = dmin = 0.01.

    gguf.quants cannot quantize K types, so tests build their bytes directly.
    """
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block == 0
    blocks = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = scale
    return blocks.reshape(rows, cols // block * type_size)
