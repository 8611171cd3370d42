"""Int4/Int8 linears and the GGUF embedding against float references (engine/quant.py).

Bounds used below (relative = max |y - ref| / max |ref| unless said otherwise):
- Int4Linear.from_ggml with float32 scales: <= 1e-5 (measured ~1e-6: only summation order differs).
- the bfloat16 path (the default): <= 1e-2 (measured ~3.5e-3: bf16 activations, scales and output).
- Int8Linear from Q8_0: each weight within rowmax/254 (+ bf16 scale rounding) of the Q8_0 value.
- from_float on Gaussian weights, norm-relative output error: int8 <= 0.02 (measured ~0.009),
  int4 group 32 <= 0.12 (measured ~0.08).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gguf
from gguf import GGMLQuantizationType as T

from homellm.engine import quant
from homellm.engine.quant import (GGMLEmbedding, Int4Linear, Int8Linear, linear_from_float,
                                  linear_from_ggml, quantize_model_)
from homellm.model.formats.checkpoint import GGMLTensor
from homellm.model.llama import Llama, ModelArgs


def ggml(values: torch.Tensor, qtype: T) -> GGMLTensor:
    """Quantize a float (N, K) tensor with the gguf package's reference code."""
    data = gguf.quants.quantize(values.numpy().astype(np.float32), qtype)
    return GGMLTensor(int(qtype), data, tuple(values.shape))


def q4_k_blocks(n: int, k: int, seed: int = 0) -> GGMLTensor:
    """Random Q4_K blocks (144 bytes per 256): random codes and 6-bit scales/mins, sane f16 d, dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = (rng.uniform(0.5, 2, (n, k // 256, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = (rng.uniform(0.5, 2, (n, k // 256, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return GGMLTensor(int(T.Q4_K), blocks.reshape(n, -1), (n, k))


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def rel_norm(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def make_ggml(qtype: T, n: int, k: int, seed: int = 0) -> GGMLTensor:
    if qtype == T.Q4_K:
        return q4_k_blocks(n, k, seed)
    return ggml(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, qtype)


INT4_CASES = [(T.Q4_0, 48, 64), (T.Q4_0, 40, 96), (T.Q4_1, 96, 160), (T.Q4_1, 24, 32),
              (T.Q4_K, 64, 256), (T.Q4_K, 40, 512)]


@pytest.mark.parametrize("qtype,n,k", INT4_CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("lead", [(1,), (7,), (64,), (2, 5)])
def test_int4_from_ggml_exact(qtype, n, k, lead):
    t = make_ggml(qtype, n, k)
    bias = torch.randn(n)
    layer = Int4Linear.from_ggml(t, bias, dtype=torch.float32)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x.double(), t.dequantize(torch.float64), bias.double())
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    assert rel_max(y, ref) <= 1e-5
    # the default bfloat16 path: same codes, bf16 activations/scales/output
    fast = Int4Linear.from_ggml(t, bias)
    assert fast.scales_and_zeros.dtype == torch.bfloat16
    assert rel_max(fast(x), ref) <= 1e-2


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda v: v.name)
def test_int4_weight_round_trip_and_size(qtype):
    t = make_ggml(qtype, 48, 256)
    layer = Int4Linear.from_ggml(t, dtype=torch.float32)
    torch.testing.assert_close(layer.dequantize(), t.dequantize(), rtol=1e-6, atol=1e-7)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 48 * 256 // 2
    assert not any(b.is_floating_point() and b.numel() >= 48 * 256 for b in layer.buffers())


def test_int4_chunked_conversion_and_padding(monkeypatch):
    """Rows converted in chunks (and a last chunk padded to 16 rows) give the same layer."""
    t = make_ggml(T.Q4_1, 200, 64)
    whole = Int4Linear.from_ggml(t, dtype=torch.float32)
    monkeypatch.setattr(quant, "ROWS_PER_CHUNK", 64)
    chunked = Int4Linear.from_ggml(t, dtype=torch.float32)
    x = torch.randn(5, 64)
    torch.testing.assert_close(chunked(x), whole(x), rtol=0, atol=0)
    assert rel_max(chunked(x), F.linear(x.double(), t.dequantize(torch.float64))) <= 1e-5


def test_int4_rejects_other_types():
    with pytest.raises(ValueError, match="Q8_0"):
        Int4Linear.from_ggml(make_ggml(T.Q8_0, 16, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_from_q8_0_within_bound(dtype):
    t = make_ggml(T.Q8_0, 80, 192)
    w = t.dequantize()
    layer = Int8Linear.from_ggml(t, dtype=dtype)
    rowmax = w.abs().amax(1, keepdim=True)
    # requantizing per row moves each weight by at most half a step, rowmax/254 (+ scale rounding)
    assert ((layer.dequantize() - w).abs() <= rowmax / 254 * (1 + 2 ** -7) + 1e-9).all()
    x = torch.randn(3, 4, 192)
    ref = F.linear(x.double(), w.double())
    y = layer(x)
    assert y.shape == (3, 4, 80) and y.dtype == torch.float32
    assert rel_norm(y, ref) <= 0.02
    assert rel_max(y, ref) <= 0.03


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.12)])
@pytest.mark.parametrize("lead", [(1,), (7,), (64,), (2, 3)])
def test_from_float_close_to_float(mode, bound, lead):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 128, generator=g) * 0.02, torch.randn(96, generator=g)
    layer = linear_from_float(weight, bias, mode)
    assert isinstance(layer, Int8Linear if mode == "int8" else Int4Linear)
    x = torch.randn(*lead, 128, generator=g)
    ref = F.linear(x.double(), weight.double())  # bias excluded from the error measure
    y = layer(x) - bias
    assert y.shape == (*lead, 96)
    assert rel_norm(y, ref) <= bound


@pytest.mark.parametrize("k", [33, 40, 100])
def test_int8_any_in_features(k):
    """K not a multiple of 16 (the bf16 kernel needs one) is padded inside the layer."""
    weight = torch.randn(7, k)
    layer = Int8Linear.from_float(weight)
    assert layer.dequantize().shape == (7, k)
    x = torch.randn(2, 3, k)
    ref = F.linear(x.double(), layer.dequantize(torch.float64))
    assert rel_max(layer(x), ref) <= 1e-2


def test_int4_from_float_float32_matches_its_dequantized_weight():
    weight = torch.randn(50, 64)
    layer = Int4Linear.from_float(weight, group_size=32, dtype=torch.float32)
    w_hat = layer.dequantize()
    assert rel_max(w_hat, weight) <= 2 / 15  # at most half a step of each group's range
    x = torch.randn(7, 64)
    assert rel_max(layer(x), F.linear(x.double(), w_hat.double())) <= 1e-5


def test_linear_policy():
    assert isinstance(linear_from_ggml(make_ggml(T.Q4_1, 32, 64)), Int4Linear)
    assert isinstance(linear_from_ggml(q4_k_blocks(16, 256)), Int4Linear)
    assert isinstance(linear_from_ggml(make_ggml(T.Q8_0, 32, 64)), Int8Linear)
    w = torch.randn(32, 64)
    dense = linear_from_ggml(GGMLTensor(int(T.F32), w.numpy(), (32, 64)))
    assert type(dense) is nn.Linear and torch.equal(dense.weight, w)
    plain = linear_from_float(w.bfloat16(), None, "none")
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.bfloat16
    assert isinstance(linear_from_float(torch.randn(16, 48), None, "int4"), Int8Linear)  # 48 % 32
    with pytest.raises(ValueError, match="int3"):
        linear_from_float(w, None, "int3")


EMBED_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.Q4_K, T.Q5_0]


@pytest.mark.parametrize("qtype", EMBED_TYPES, ids=lambda v: v.name)
def test_ggml_embedding_rows_exact(qtype):
    if qtype == T.F16:
        values = torch.randn(100, 256).half()
        t = GGMLTensor(int(T.F16), values.numpy().view(np.uint8), (100, 256))
    else:
        t = make_ggml(qtype, 100, 256)
    full = t.dequantize()
    emb = GGMLEmbedding(t)
    ids = torch.tensor([[0, 99, 5, 5], [42, 7, 0, 63]])
    out = emb(ids)
    assert out.shape == (2, 4, 256) and out.dtype == torch.float32
    assert torch.equal(out, full[ids])
    assert torch.equal(GGMLEmbedding(t, torch.bfloat16)(ids), full[ids].bfloat16())
    with pytest.raises(IndexError):
        emb(torch.tensor([100]))


def test_ggml_embedding_f16_values_array():
    values = torch.randn(10, 32).half()
    emb = GGMLEmbedding(GGMLTensor(int(T.F16), values.numpy(), (10, 32)))
    assert torch.equal(emb(torch.tensor([3, 1])), values[[3, 1]].float())


def tiny_llama(tied: bool = False) -> Llama:
    torch.manual_seed(0)
    args = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=256, tie_word_embeddings=tied)
    model = Llama(args).eval()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():  # HF-like init scale so logits are not flat
        if p.dim() == 2:
            nn.init.normal_(p, std=0.1)
    return model


# Measured on this tiny random model (2 layers, weights N(0, 0.1)): int8 logits are off by ~1.8%
# (norm-relative, max |diff| ~0.06 for logits of std ~0.8) and keep the argmax; int4 group 32 is
# off by ~21-25% (max |diff| ~0.7): the reference argmax stays in int4's top 5 (measured >= 97%).
@pytest.mark.parametrize("mode,rel,max_diff", [("int8", 0.03, 0.1), ("int4", 0.3, 1.0)])
def test_quantize_model_keeps_logits(mode, rel, max_diff):
    model = tiny_llama()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        quantize_model_(model, mode)
        out = model(tokens)
    kind = Int8Linear if mode == "int8" else Int4Linear
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_quant = sum(isinstance(m, kind) for m in model.modules())
    assert n_linear == 0 and n_quant == 2 * 7 + 1
    assert not any(p.dim() == 2 and p.shape != (256, 64) for p in model.parameters())  # only embeddings
    assert rel_norm(out, ref) <= rel
    assert (out - ref).abs().max().item() <= max_diff
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    in_top5 = (out.topk(5, -1).indices == ref.argmax(-1, keepdim=True)).any(-1).float().mean().item()
    if mode == "int8":
        assert top1 >= 0.95
    else:
        assert top1 >= 0.4 and in_top5 >= 0.9


def test_quantize_model_tied_head_keeps_embedding():
    model = tiny_llama(tied=True)
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_model_(model, "int8")
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, table)


def read_gguf_tensor(path, name: str) -> GGMLTensor:
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    return GGMLTensor(int(t.tensor_type), t.data, tuple(int(n) for n in reversed(t.shape)))


def test_default_model_tensors(default_gguf):
    up = read_gguf_tensor(default_gguf, "blk.0.ffn_up.weight")
    assert up.type_name == "Q4_1" and up.shape == (1536, 576)
    w = up.dequantize(torch.float64)
    x = torch.randn(7, 576)
    ref = F.linear(x.double(), w)
    assert rel_max(Int4Linear.from_ggml(up, dtype=torch.float32)(x), ref) <= 1e-5
    assert rel_max(linear_from_ggml(up)(x), ref) <= 1e-2

    embd = read_gguf_tensor(default_gguf, "token_embd.weight")
    assert embd.type_name == "Q8_0" and embd.shape == (49152, 576)
    ids = torch.tensor([[1, 2, 49151], [100, 5000, 1]])
    rows = GGMLEmbedding(embd)(ids)
    full = embd.dequantize()
    assert torch.equal(rows, full[ids])
    # the tied head as Int8Linear: hidden states that look like the model's (embedding rows)
    head = linear_from_ggml(embd)
    h = full[:16]
    logits, ref = head(h), F.linear(h.double(), full.double())
    assert rel_norm(logits, ref) <= 5e-3
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
