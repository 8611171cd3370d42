"""GGUF read/write: round trips, parity with transformers' GGUF loader, every tensor type,
the real default model, and bad files."""
from __future__ import annotations

import dataclasses
import mmap
import os
import re

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import (TINY_LLAMA, TINY_QWEN2, TINY_TIED, byte_tokenizer_fields,
                           random_kquant, tiny_llama_state, write_tiny_gguf)

from homellm.errors import HomellmError, ModelFileError
from homellm.model.formats import gguf_file
from homellm.model.formats.checkpoint import GGMLTensor
from homellm.model.formats.gguf import read_gguf, write_gguf
from homellm.model.llama import ModelArgs, rope_inv_freq

Q = gguf.GGMLQuantizationType
ARGS = {"llama": TINY_LLAMA, "tied": TINY_TIED, "qwen2": TINY_QWEN2}


def llama_cpp_rows(n_rows: int, n_heads: int) -> list[int]:
    """GGUF row r holds HF row llama_cpp_rows(..)[r] (convert_hf_to_gguf.py's permute).

    Within each head of d rows, HF keeps the rotate-half layout (x_0..x_{d/2-1}, y_0..),
    llama.cpp interleaves the pairs (x_0, y_0, x_1, y_1, ..). Written as an index table,
    independently of the reshape in gguf.py.
    """
    d = n_rows // n_heads
    order = []
    for h in range(n_heads):
        for i in range(d // 2):
            order += [h * d + i, h * d + d // 2 + i]
    return order


def to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w[llama_cpp_rows(w.shape[0], n_heads)]


def to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    out = np.empty_like(w)
    out[llama_cpp_rows(w.shape[0], n_heads)] = w
    return out


def as_float(t) -> torch.Tensor:
    return t.dequantize() if isinstance(t, GGMLTensor) else t.float()


def quant_roundtrip(x: torch.Tensor, qtype: Q) -> torch.Tensor:
    """What gguf.quants makes of x when quantized to qtype and back (float32)."""
    q = gguf.quants.quantize(x.numpy().astype(np.float32), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype)).reshape(x.shape)


def write_raw(path, arch: str, kv: dict, tensors: dict, tokenizer: bool = True):
    """A GGUF written with GGUFWriter directly: kv {key: (value, GGUFValueType)},
    tensors {gguf_name: float numpy array, or (raw uint8 bytes, ggml type)}."""
    w = gguf.GGUFWriter(path, arch)
    for key, (value, vtype) in kv.items():
        w.add_key_value(key, value, vtype)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(byte_tokenizer_fields()["tokens"])
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_kv(args: ModelArgs, arch: str = "llama", drop: str | None = None) -> dict:
    V = gguf.GGUFValueType
    kv = {
        f"{arch}.context_length": (args.max_position_embeddings, V.UINT32),
        f"{arch}.embedding_length": (args.hidden_size, V.UINT32),
        f"{arch}.block_count": (args.num_hidden_layers, V.UINT32),
        f"{arch}.feed_forward_length": (args.intermediate_size, V.UINT32),
        f"{arch}.attention.head_count": (args.num_attention_heads, V.UINT32),
        f"{arch}.attention.head_count_kv": (args.num_key_value_heads, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (args.rms_norm_eps, V.FLOAT32),
        f"{arch}.rope.freq_base": (args.rope_theta, V.FLOAT32),
    }
    kv.pop(drop, None)
    return kv


# --- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2"])
def test_round_trip_f32_is_exact(tmp_path, variant):
    args, state = ARGS[variant], tiny_llama_state(ARGS[variant], seed=1)
    fields = byte_tokenizer_fields()
    calls = []
    path = write_gguf(tmp_path / "m.gguf", args, state, out_type="f32", tokenizer_fields=fields,
                      chat_template="{{ messages }}", metadata={"name": "tiny", "license": "mit"},
                      progress=lambda done, total: calls.append((done, total)))
    ckpt = read_gguf(path)

    assert ckpt.args == args
    assert ckpt.format == "gguf" and ckpt.source == path
    assert set(ckpt.tensors) == set(state) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    for name, value in ckpt.tensors.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[name]), name
    assert ckpt.tokenizer.gguf_fields == fields
    assert ckpt.chat_template == "{{ messages }}"
    assert ckpt.metadata["name"] == "tiny" and ckpt.metadata["license"] == "mit"
    assert ckpt.metadata["architecture"] == ("qwen2" if variant == "qwen2" else "llama")
    assert ckpt.metadata["file_type"] == gguf.LlamaFileType.ALL_F32
    assert ckpt.metadata["tensor_types"] == {"F32": len(ckpt.tensors)}
    assert calls[-1] == (len(ckpt.tensors), len(ckpt.tensors)) and len(calls) == len(ckpt.tensors)
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_round_trip_typed_matches_gguf_quants(tmp_path, variant, out_type):
    """Each weight equals what gguf.quants (or a dtype cast) makes of the original tensor."""
    args, state = ARGS[variant], tiny_llama_state(ARGS[variant], seed=2)
    ckpt = read_gguf(write_tiny_gguf(tmp_path / "m.gguf", args, out_type, seed=2))
    assert ckpt.args == args
    qtype = Q[out_type.upper()]
    for name, value in ckpt.tensors.items():
        original = state[name]
        if original.ndim == 1:  # norms and biases stay float32
            assert value.dtype == torch.float32 and torch.equal(value, original), name
        elif out_type == "f16":
            assert value.dtype == torch.float16 and torch.equal(value, original.half()), name
        elif out_type == "bf16":
            assert value.dtype == torch.bfloat16 and torch.equal(value, original.bfloat16()), name
        else:
            assert isinstance(value, GGMLTensor) and value.type_name == qtype.name, name
            assert value.shape == tuple(original.shape)
            # quantization works per row, so it commutes with the Q/K row permutation
            assert torch.equal(value.dequantize(), quant_roundtrip(original, qtype)), name
    assert ckpt.metadata["file_type"] == gguf.LlamaFileType[
        "MOSTLY_" + out_type.upper()]


def test_quantized_rewrite_copies_blocks(tmp_path):
    """A GGMLTensor written as its own type is copied block for block (Q/K permuted back)."""
    first = read_gguf(write_tiny_gguf(tmp_path / "a.gguf", TINY_LLAMA, "q4_1"))
    again = read_gguf(write_gguf(tmp_path / "b.gguf", first.args, first.tensors, out_type="q4_1",
                                 tokenizer_fields=first.tokenizer.gguf_fields, chat_template=None))
    for name, value in first.tensors.items():
        other = again.tensors[name]
        if isinstance(value, GGMLTensor):
            assert np.array_equal(value.data, other.data), name
        else:
            assert torch.equal(value, other), name
    # across types: dequantized, then quantized again
    q8 = read_gguf(write_gguf(tmp_path / "c.gguf", first.args, first.tensors, out_type="q8_0",
                              tokenizer_fields=None, chat_template=None))
    w = "model.layers.1.self_attn.k_proj.weight"
    assert q8.tensors[w].type_name == "Q8_0"
    assert torch.equal(q8.tensors[w].dequantize(), quant_roundtrip(first.tensors[w].dequantize(), Q.Q8_0))


@pytest.mark.parametrize("change", [
    {"head_dim": 32},  # attention.key_length differs from hidden / heads
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_scaling": {"rope_type": "freq_factors", "factors": [1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]}},
])
def test_round_trip_args(tmp_path, change):
    args = dataclasses.replace(TINY_LLAMA, **change)
    ckpt = read_gguf(write_tiny_gguf(tmp_path / "m.gguf", args, "f32"))
    assert ckpt.args == args
    assert "model.rotary_emb.inv_freq" not in ckpt.tensors


def test_llama3_scaling_becomes_freq_factors(tmp_path):
    args = dataclasses.replace(TINY_LLAMA, max_position_embeddings=8192, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64})
    ckpt = read_gguf(write_tiny_gguf(tmp_path / "m.gguf", args, "f16"))
    assert ckpt.args.rope_scaling["rope_type"] == "freq_factors"
    assert ckpt.metadata["tensor_types"]["F32"] == 6  # 5 norms + rope_freqs
    assert max(ckpt.args.rope_scaling["factors"]) == 8.0 and min(ckpt.args.rope_scaling["factors"]) == 1.0
    torch.testing.assert_close(rope_inv_freq(ckpt.args), rope_inv_freq(args))


# --- parity with transformers' own GGUF loader ------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2"])
def test_transformers_reads_our_gguf(tmp_path, variant):
    """A transformers model saved, exported with write_gguf, and loaded back by transformers'
    GGUF loader (which un-permutes Q/K its own way) gives the same logits.

    `from_pretrained(gguf_file=)` needs the `accelerate` package, which the test extra does not
    install, so this uses the loader that from_pretrained calls (load_gguf_checkpoint).
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    a = ARGS[variant]
    cls = "Qwen2" if a.attention_bias else "Llama"
    config = getattr(transformers, f"{cls}Config")(
        hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        intermediate_size=a.intermediate_size, vocab_size=a.vocab_size,
        max_position_embeddings=a.max_position_embeddings, rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta, tie_word_embeddings=a.tie_word_embeddings)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():  # random biases and norms, so a wrong layout cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    args = ModelArgs.from_hf_config(model.config.to_dict())
    assert args == a
    write_gguf(tmp_path / "hf" / "tiny.gguf", args, model.state_dict(), out_type="f32",
               tokenizer_fields=byte_tokenizer_fields(), chat_template=None)

    path = str(tmp_path / "hf" / "tiny.gguf")
    parsed = load_gguf_checkpoint(path)
    loaded = getattr(transformers, f"{cls}ForCausalLM")(
        transformers.AutoConfig.for_model(**parsed["config"])).eval()
    weights = load_gguf_checkpoint(path, return_tensors=True, model_to_load=loaded)["tensors"]
    result = loaded.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if k != "lm_head.weight"]
    if a.tie_word_embeddings:
        loaded.tie_weights()
    tokens = torch.randint(0, a.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)

    # and the file really holds llama.cpp's interleaved Q/K rows (none for qwen2)
    reader = gguf.GGUFReader(path)
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    q_hf = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    k_hf = model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy()
    if a.attention_bias:
        assert np.array_equal(raw["blk.0.attn_q.weight"], q_hf)
    else:
        assert np.array_equal(raw["blk.0.attn_q.weight"], to_gguf_rows(q_hf, a.num_attention_heads))
        assert np.array_equal(raw["blk.0.attn_k.weight"], to_gguf_rows(k_hf, a.num_key_value_heads))
        assert not np.array_equal(raw["blk.0.attn_q.weight"], q_hf)


# --- every tensor type ------------------------------------------------------------------

# hidden 256 so that K-quant rows (256 values a super-block) fit every weight
TYPES_ARGS = ModelArgs(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, vocab_size=256,
                       max_position_embeddings=64)
TYPE_OF = {
    "token_embd.weight": Q.F32, "output.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K,
    "blk.0.attn_v.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.Q4_0,
    "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q5_1, "blk.0.ffn_down.weight": Q.Q2_K,
    "blk.1.attn_q.weight": Q.Q5_0, "blk.1.attn_k.weight": Q.BF16,
    "blk.1.attn_v.weight": Q.Q3_K, "blk.1.attn_output.weight": Q.Q5_K,
    "blk.1.ffn_gate.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.F16, "blk.1.ffn_down.weight": Q.Q4_0,
}


def test_every_supported_type(tmp_path):
    args, rng = TYPES_ARGS, np.random.default_rng(0)
    state = tiny_llama_state(args, seed=3)
    stored = {}  # gguf name -> float32 or raw uint8 bytes, in GGUF layout
    for hf, value in state.items():
        name = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                "model.norm.weight": "output_norm.weight"}.get(hf) or (
            hf.replace("model.layers.", "blk.").replace("self_attn.", "").replace("mlp.", "")
              .replace("q_proj", "attn_q").replace("k_proj", "attn_k").replace("v_proj", "attn_v")
              .replace("o_proj", "attn_output").replace("gate_proj", "ffn_gate")
              .replace("up_proj", "ffn_up").replace("down_proj", "ffn_down")
              .replace("post_attention_layernorm", "ffn_norm").replace("input_layernorm", "attn_norm"))
        x = value.numpy()
        if name.endswith("attn_q.weight"):
            x = to_gguf_rows(x, args.num_attention_heads)
        if name.endswith("attn_k.weight"):
            x = to_gguf_rows(x, args.num_key_value_heads)
        qtype = TYPE_OF.get(name, Q.F32)
        if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            stored[name] = (random_kquant(qtype, *x.shape, rng), qtype)
        elif qtype == Q.F16:
            stored[name] = x.astype(np.float16)
        elif qtype != Q.F32:
            stored[name] = (gguf.quants.quantize(x, qtype), qtype)
        else:
            stored[name] = x
    assert {t for t in TYPE_OF.values()} | {Q.F32} == {
        Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    path = write_raw(tmp_path / "types.gguf", "llama", llama_kv(args), stored)

    ckpt = read_gguf(path)
    assert ckpt.args == args
    n_heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
    for name, value in stored.items():
        hf = next(k for k in state if _same_tensor(k, name))
        got = ckpt.tensors[hf]
        raw, qtype = value if isinstance(value, tuple) else (value, TYPE_OF.get(name, Q.F32))
        assert tuple(got.shape) == tuple(state[hf].shape), name
        if isinstance(got, GGMLTensor):
            assert got.type_name == qtype.name, name
        else:
            assert got.dtype == {Q.F32: torch.float32, Q.F16: torch.float16,
                                 Q.BF16: torch.bfloat16}[qtype], name
        expected = gguf.quants.dequantize(raw, qtype).reshape(got.shape)
        kind = name.split(".")[-2]
        if kind in n_heads:  # un-permuted rows of the quantized tensor == un-permuted floats
            expected = to_hf_rows(expected, n_heads[kind])
        assert torch.equal(as_float(got), torch.from_numpy(np.ascontiguousarray(expected))), name
    assert ckpt.metadata["tensor_types"]["Q8_0"] == 2


def _same_tensor(hf: str, gguf_name: str) -> bool:
    from homellm.model.formats.gguf import gguf_name as to_gguf
    return to_gguf(hf) == gguf_name


# --- the real default model -------------------------------------------------------------

def _mmap_range(arr: np.ndarray) -> tuple[int, int]:
    """The address range of the memory map an array views (fails if it owns its data)."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) and isinstance(base.base, mmap.mmap), type(base)
    start = base.__array_interface__["data"][0]
    return start, start + base.nbytes


@pytest.fixture(scope="module")
def default_reader(default_gguf) -> gguf.GGUFReader:
    """The `gguf` package's reader on the default model: the reference (slow, ~2 s)."""
    return gguf.GGUFReader(default_gguf)


def test_default_model(default_gguf, default_reader):
    ckpt = read_gguf(default_gguf)
    assert ckpt.args == ModelArgs(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
    assert ckpt.metadata["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert ckpt.metadata["file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert ckpt.metadata["architecture"] == "llama" and "lm_head.weight" not in ckpt.tensors
    embed = ckpt.tensors["model.embed_tokens.weight"]
    assert embed.type_name == "Q8_0" and embed.shape == (49152, 576) and embed.data.shape == (49152, 612)
    down = ckpt.tensors["model.layers.29.mlp.down_proj.weight"]
    assert down.type_name == "Q4_1" and down.shape == (576, 1536)
    assert ckpt.tensors["model.norm.weight"].dtype == torch.float32

    # zero-copy: quantized rows and float32 norms point into the file's memory map
    lo, hi = _mmap_range(down.data)
    assert lo <= down.data.ctypes.data < hi and lo <= embed.data.ctypes.data < hi
    assert lo <= ckpt.tensors["model.layers.0.input_layernorm.weight"].data_ptr() < hi

    tok = ckpt.tokenizer.gguf_fields
    assert tok["model"] == "gpt2" and len(tok["tokens"]) == 49152 and tok["tokens"][1] == "<|im_start|>"
    assert len(tok["merges"]) == 48900 and tok["bos_token_id"] == 1 and tok["eos_token_id"] == 2
    assert tok["add_bos_token"] is False and isinstance(tok["token_type"][0], int)
    assert "<|im_start|>" in ckpt.chat_template

    # the Q/K rows of a real llama.cpp file, un-permuted on the quantized blocks
    raw = {t.name: t for t in default_reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    for name, heads, hf in (("blk.0.attn_q.weight", 9, "model.layers.0.self_attn.q_proj.weight"),
                            ("blk.0.attn_k.weight", 3, "model.layers.0.self_attn.k_proj.weight")):
        floats = gguf.quants.dequantize(np.array(raw[name].data), Q.Q4_1)
        assert torch.equal(ckpt.tensors[hf].dequantize(), torch.from_numpy(to_hf_rows(floats, heads)))


# --- our parser == the gguf package's GGUFReader ----------------------------------------

def assert_same_as_gguf_reader(ours: gguf_file.GGUFFile, reader: gguf.GGUFReader) -> None:
    """Every metadata value and type, tensor info and tensor byte equals GGUFReader's."""
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)  # same keys, in file order
    for key, field in fields.items():
        assert ours.metadata[key] == field.contents(), key
        assert type(ours.metadata[key]) is type(field.contents()), key
        assert ours.types[key] == tuple(field.types), key
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert ours.alignment == reader.alignment and ours.data_offset == reader.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for t, ref in zip(ours.tensors, reader.tensors):
        assert t.dims == tuple(ref.shape.tolist()), t.name
        assert t.ggml_type == ref.tensor_type and type(t.ggml_type) is Q, t.name
        assert (t.offset, t.n_bytes) == (ref.data_offset, ref.n_bytes), t.name
        assert t.data.nbytes == t.n_bytes, t.name
        if t.ggml_type in (Q.F32, Q.F16):
            assert t.data.dtype == ref.data.dtype and t.data.shape == t.shape, t.name
        else:
            assert t.data.dtype == np.uint8 and t.data.shape[1] == ref.data.shape[-1], t.name
        assert np.array_equal(t.data.reshape(-1).view(np.uint8),
                              np.asarray(ref.data).reshape(-1).view(np.uint8)), t.name


@pytest.mark.parametrize("variant,out_type", [("llama", "f32"), ("qwen2", "q4_1"),
                                              ("tied", "bf16"), ("llama", "q8_0")])
def test_parser_matches_gguf_reader(tmp_path, variant, out_type):
    fields = {**byte_tokenizer_fields(), "scores": [0.25 * i for i in range(256)],
              "add_space_prefix": True, "eot_token_id": 3, "pre": "ünïcödé ✓"}
    path = write_gguf(tmp_path / "m.gguf", ARGS[variant], tiny_llama_state(ARGS[variant]),
                      out_type=out_type, tokenizer_fields=fields, chat_template="{{ x }}",
                      metadata={"name": "tiny", "size_label": "1K"})
    assert_same_as_gguf_reader(gguf_file.read(path), gguf.GGUFReader(path))
    # every scalar type, int64/float64 arrays, a custom alignment and every tensor type
    V = gguf.GGUFValueType
    kv = {f"x.{t.name.lower()}": (v, t) for t, v in [
        (V.UINT8, 200), (V.INT8, -100), (V.UINT16, 60000), (V.INT16, -30000), (V.UINT32, 2**31 + 5),
        (V.INT32, -2**31), (V.FLOAT32, 0.1), (V.BOOL, False), (V.UINT64, 2**63 + 1),
        (V.INT64, -2**62), (V.FLOAT64, 0.1), (V.STRING, "")]}
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
               "scalar": np.ones(1, np.float32)}
    for q in (Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.BF16):
        tensors[q.name] = (gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), q), q)
    for q in (Q.Q2_K, Q.Q4_K, Q.Q6_K):
        tensors[q.name] = (random_kquant(q, 2, 256, rng), q)
    path = write_raw(tmp_path / "all.gguf", "llama", kv, tensors)
    w = gguf.GGUFWriter(tmp_path / "arrays.gguf", "llama")
    w.add_custom_alignment(64)
    w.add_key_value("x.i64", [-(2**40), 7], V.ARRAY, sub_type=V.INT64)
    w.add_key_value("x.f64", [0.1, 1e300], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("x.bools", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("x.u8", list(b"\x00\xff"), V.ARRAY, sub_type=V.UINT8)
    w.add_tensor("t", np.arange(6, dtype=np.float32)), w.add_tensor("u", np.ones((2, 3), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for p in (path, tmp_path / "arrays.gguf"):
        ours = gguf_file.read(p)
        assert_same_as_gguf_reader(ours, gguf.GGUFReader(p))
    assert ours.metadata["x.i64"] == [-(2**40), 7] and ours.metadata["x.f64"] == [0.1, 1e300]
    assert ours.metadata["x.bools"] == [True, False, True] and ours.metadata["x.u8"] == [0, 255]
    assert ours.alignment == 64 and all(t.offset % 64 == 0 for t in ours.tensors)
    all_types = gguf_file.read(path)
    assert all_types.metadata["x.float32"] == float(np.float32(0.1))
    assert all_types.metadata["x.uint64"] == 2**63 + 1


def test_parser_matches_gguf_reader_on_default_model(default_gguf, default_reader):
    ours = gguf_file.read(default_gguf)
    assert_same_as_gguf_reader(ours, default_reader)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_parser_is_lean_on_default_model(default_gguf):
    """Opening the default model costs a few MB (GGUFReader: ~160 MB and seconds)."""
    import subprocess
    import sys
    code = (
        "import resource, sys, time\n"
        "from homellm.model.formats import gguf_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "f = gguf_file.read(sys.argv[1])\n"
        "seconds = time.perf_counter() - start\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(grown / 1024, seconds)\n")
    out = subprocess.run([sys.executable, "-c", code, str(default_gguf)], check=True,
                         capture_output=True, text=True).stdout
    peak_mb, seconds = map(float, out.split())
    # ~2 MB of metadata pages and ~9 MB of Python strings (98k tokens and merges)
    assert peak_mb < 25, f"gguf_file.read grew the peak RSS by {peak_mb:.1f} MB"
    assert seconds < 1.0, f"gguf_file.read took {seconds:.2f} s"


@pytest.mark.slow
def test_default_model_matches_transformers_loader(default_gguf):
    """Every tensor of the real file, dequantized, equals what transformers' GGUF loader reads."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(default_gguf))
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**parsed["config"]))
    theirs = load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=model)["tensors"]
    ours = read_gguf(default_gguf).tensors
    assert set(ours) <= set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(as_float(value), theirs[name].float(), rtol=0, atol=0, msg=name)


# --- bad files --------------------------------------------------------------------------

def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 4)
    with pytest.raises(ModelFileError, match=r"model\.gguf is not a GGUF file"):
        read_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"model\.gguf is not a GGUF file"):
        read_gguf(path)
    with pytest.raises(ModelFileError, match=r"missing\.gguf: no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.02, 40])
def test_truncated(tmp_path, keep):
    data = write_tiny_gguf(tmp_path / "full.gguf", TINY_LLAMA, "q8_0").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ModelFileError, match=r"cut\.gguf is truncated"):
        read_gguf(cut)


def test_corrupt_header(tmp_path):
    data = bytearray(write_tiny_gguf(tmp_path / "m.gguf", TINY_LLAMA, "f16").read_bytes())
    data[16:24] = (2**40).to_bytes(8, "little")  # kv count
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"bad\.gguf is truncated or its GGUF header is corrupt"):
        read_gguf(tmp_path / "bad.gguf")


def _patch(data: bytes, at: int, value: int, size: int = 8) -> bytes:
    return data[:at] + value.to_bytes(size, "little") + data[at + size:]


@pytest.mark.parametrize("corrupt,problem", [
    # counts and lengths that would ask for petabytes: refused before anything is allocated
    (lambda d, k: _patch(d, 8, 2**50), r"claims \d+ metadata keys and 1125899906842624 tensors, more than \d+ bytes"),
    (lambda d, k: _patch(d, k("tokenizer.ggml.tokens") + 8, 2**60),
     r"1152921504606846976 strings of tokenizer\.ggml\.tokens .* needs"),
    (lambda d, k: _patch(d, k("tokenizer.ggml.tokens") + 16, 2**62),
     r"tokenizer\.ggml\.tokens\[0\] at byte \d+ has length 4611686018427387904"),
    (lambda d, k: _patch(d, k("tokenizer.ggml.token_type") + 8, 2**61), r"items of tokenizer\.ggml\.token_type"),
    (lambda d, k: _patch(d, k("general.name") - len("general.name") - 8, 2**63),
     r"metadata key #\d+ at byte \d+ needs 9223372036854775808 bytes"),
    (lambda d, k: _patch(d, k("token_embd.weight"), 9, 4), r"token_embd\.weight has 9 dimensions"),
    (lambda d, k: _patch(d, k("token_embd.weight") + 4 + 16, 99, 4), r"token_embd\.weight has unknown ggml type 99"),
    (lambda d, k: _patch(d, k("token_embd.weight") + 4, 2**40), r"token_embd\.weight ends at byte"),
    # bad values
    (lambda d, k: d.replace(b"<0x00>", b"\xff0x00>"),
     r"tokenizer\.ggml\.tokens\[0\] at byte \d+ is not UTF-8"),
    (lambda d, k: d.replace(b"bos_token_id", b"eos_token_id"), r"key 'tokenizer\.ggml\.eos_token_id' appears twice"),
    (lambda d, k: d.replace(b"blk.0.attn_q.weight", b"blk.0.attn_k.weight"), r"tensor blk\.0\.attn_k\.weight appears twice"),
    (lambda d, k: _patch(d, k("general.name"), 13, 4), r"general\.name has unknown value type 13"),
])
def test_corrupt_metadata(tmp_path, corrupt, problem):
    """A corrupt count, length, type or name is a ModelFileError saying what is wrong."""
    fields = {**byte_tokenizer_fields(), "tokens": ["<0x00>", *byte_tokenizer_fields()["tokens"][1:]]}
    data = write_tiny_gguf(tmp_path / "m.gguf", TINY_LLAMA, "q8_0", tokenizer_fields=fields).read_bytes()

    def after(key: str) -> int:  # the byte after a key or tensor name (its first occurrence)
        return data.index(len(key).to_bytes(8, "little") + key.encode()) + 8 + len(key)

    bad = corrupt(data, after)
    assert bad != data and len(bad) == len(data)
    (tmp_path / "bad.gguf").write_bytes(bad)
    with pytest.raises(ModelFileError, match=r"bad\.gguf is truncated") as e:
        read_gguf(tmp_path / "bad.gguf")
    assert re.search(problem, str(e.value)), str(e.value)


def test_unsupported_version_endianness_alignment(tmp_path):
    data = write_tiny_gguf(tmp_path / "m.gguf", TINY_LLAMA, "f32").read_bytes()
    for version, match in ((1, r"v1\.gguf is GGUF version 1: supported versions: 2, 3"),
                           (3 << 24, r"be\.gguf is a big-endian GGUF file")):
        path = tmp_path / ("v1.gguf" if version == 1 else "be.gguf")
        path.write_bytes(_patch(data, 4, version, 4))
        with pytest.raises(ModelFileError, match=match):
            read_gguf(path)
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    w.add_custom_alignment(64)
    w.add_tensor("t", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    data = (tmp_path / "a.gguf").read_bytes()
    at = data.index(b"general.alignment") + len("general.alignment") + 4
    (tmp_path / "a.gguf").write_bytes(_patch(data, at, 48, 4))
    with pytest.raises(ModelFileError, match=r"a\.gguf is truncated or its GGUF header is corrupt: "
                                             r"general\.alignment must be a uint32 power of two, not 48"):
        read_gguf(tmp_path / "a.gguf")

def test_unsupported_tensor_type(tmp_path):
    args = TINY_LLAMA
    stored = {}
    for hf, value in tiny_llama_state(args).items():
        from homellm.model.formats.gguf import gguf_name
        stored[gguf_name(hf)] = value.numpy()
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    rows, cols = stored["blk.0.attn_q.weight"].shape
    stored["blk.0.attn_q.weight"] = (np.zeros((rows, cols // block * size), np.uint8), Q.IQ4_NL)
    path = write_raw(tmp_path / "iq.gguf", "llama", llama_kv(args), stored)
    with pytest.raises(ModelFileError, match=r"unsupported tensor type IQ4_NL in blk\.0\.attn_q\.weight "
                                             r"of .*iq\.gguf; supported: F32, F16, BF16, Q8_0"):
        read_gguf(path)


def test_missing_key_unknown_arch_and_bad_shape(tmp_path):
    args = TINY_LLAMA
    from homellm.model.formats.gguf import gguf_name
    stored = {gguf_name(k): v.numpy() for k, v in tiny_llama_state(args).items()}
    path = write_raw(tmp_path / "nokey.gguf", "llama", llama_kv(args, drop="llama.block_count"), stored)
    with pytest.raises(ModelFileError, match=r"nokey\.gguf: required metadata key 'llama\.block_count' is missing"):
        read_gguf(path)
    path = write_raw(tmp_path / "gpt2.gguf", "gpt2", llama_kv(args, arch="gpt2"), stored)
    with pytest.raises(ModelFileError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        read_gguf(path)
    stored["blk.1.ffn_down.weight"] = stored["blk.1.ffn_down.weight"][:, :64]
    path = write_raw(tmp_path / "shape.gguf", "llama", llama_kv(args), stored)
    with pytest.raises(ModelFileError, match=r"shape\.gguf: tensor blk\.1\.ffn_down\.weight "
                                             r"\(model\.layers\.1\.mlp\.down_proj\.weight\) has shape \[64, 64\], "
                                             r"expected \[64, 128\]"):
        read_gguf(path)


# --- writing errors ---------------------------------------------------------------------

def test_write_to_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(HomellmError, match=r"cannot write .*file/sub/m\.gguf"):
        write_tiny_gguf(tmp_path / "file" / "sub" / "m.gguf")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(HomellmError, match=r"cannot write .*locked/m\.gguf"):
            write_tiny_gguf(locked / "m.gguf")
        assert not list(locked.iterdir())


def test_failed_write_leaves_nothing(tmp_path):
    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tmp_path / "m.gguf", TINY_LLAMA, tiny_llama_state(TINY_LLAMA), out_type="q8_0",
                   tokenizer_fields=None, chat_template=None, progress=stop)
    assert not list(tmp_path.iterdir())

    bad = tiny_llama_state(TINY_LLAMA)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(HomellmError, match=r"up_proj\.weight has shape \[3, 3\], expected \[128, 64\]"):
        write_gguf(tmp_path / "m.gguf", TINY_LLAMA, bad, tokenizer_fields=None, chat_template=None)
    with pytest.raises(HomellmError, match="out_type 'q3_k' is not supported"):
        write_gguf(tmp_path / "m.gguf", TINY_LLAMA, tiny_llama_state(TINY_LLAMA), out_type="q3_k",
                   tokenizer_fields=None, chat_template=None)
    assert not list(tmp_path.iterdir())


def test_tokenizer_field_types(tmp_path):
    """Token lists are string arrays, token_type int32, scores float32, ids uint32, flags bool."""
    fields = {**byte_tokenizer_fields(), "scores": [0.5] * 256, "add_space_prefix": True,
              "eot_token_id": 3}
    path = write_tiny_gguf(tmp_path / "m.gguf", TINY_LLAMA, "f16", tokenizer_fields=fields)
    V = gguf.GGUFValueType
    types = {k: f.types for k, f in gguf.GGUFReader(path).fields.items()}
    p = "tokenizer.ggml."
    assert types[p + "tokens"] == [V.ARRAY, V.STRING] and types[p + "merges"] == [V.ARRAY, V.STRING]
    assert types[p + "token_type"] == [V.ARRAY, V.INT32] and types[p + "scores"] == [V.ARRAY, V.FLOAT32]
    assert types[p + "bos_token_id"] == [V.UINT32] and types[p + "eot_token_id"] == [V.UINT32]
    assert types[p + "add_bos_token"] == [V.BOOL] and types[p + "model"] == [V.STRING]
    assert read_gguf(path).tokenizer.gguf_fields == fields


# -- hostile headers and broken weights -----------------------------------------------------------

def test_numpy_reference_of_the_network_matches_pytorch(tmp_path):
    """model/numpy_forward.py (what names the layer where NaN first appears) computes the same
    network as model/llama.py: its logits equal the PyTorch model's."""
    from homellm.engine.loader import build_model
    from homellm.model.numpy_forward import stages
    for args in (TINY_LLAMA, TINY_QWEN2):
        path = write_tiny_gguf(tmp_path / f"{args.attention_bias}.gguf", args, "q8_0")
        ckpt = read_gguf(path)
        ids = [3, 17, 200, 5, 99, 42, 7]
        *_, (where, logits) = stages(ckpt.args, ckpt.tensors, ids)
        assert where.startswith("the output head")
        model = build_model(read_gguf(path), device="cpu", quant="none")
        with torch.inference_mode():
            expected = model(torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_first_nonfinite_names_the_stage(tmp_path):
    from homellm.model.numpy_forward import first_nonfinite
    ckpt = read_gguf(write_tiny_gguf(tmp_path / "t.gguf", TINY_LLAMA, "f32"))
    ids = [1, 2, 3]
    assert first_nonfinite(ckpt.args, ckpt.tensors, ids) is None
    for name, where in (("model.layers.1.mlp.down_proj.weight", "layer 1 (MLP)"),
                        ("model.layers.0.self_attn.v_proj.weight", "layer 0 (attention)"),
                        ("model.norm.weight", "the final norm"),
                        ("model.embed_tokens.weight", "the token embedding")):
        tensors = dict(ckpt.tensors)
        broken = tensors[name].clone()
        broken.view(-1)[:broken.shape[-1]] = float("nan")  # (row 0 of the embedding: id 1 reads row 1)
        if name == "model.embed_tokens.weight":
            broken[1] = float("inf")
        tensors[name] = broken
        assert first_nonfinite(ckpt.args, tensors, ids).startswith(where), name


def test_a_huge_block_count_fails_before_anything_per_layer(tmp_path):
    """llama.block_count = 2**32 - 1 used to build 51 billion expected-shape entries (a
    MemoryError after 20 s under a 4 GB cap); now the layer count is checked against the
    tensors first: an error at once, with next to no memory."""
    import tracemalloc

    from test_hostile_files import Parts
    path = write_tiny_gguf(tmp_path / "t.gguf", TINY_LLAMA, "q8_0")
    parts = Parts(path)
    parts.kv["llama.block_count"] = ((gguf.GGUFValueType.UINT32,), 2**32 - 1)
    bad = parts.write(tmp_path / "bad.gguf")
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="block_count is 4294967295, but the file has "
                                                 "tensors for 2 layers"):
            read_gguf(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_tensor_data_must_follow_llama_cpps_layout(tmp_path):
    """Overlapping, reordered or gapped tensor data is refused, as llama.cpp's loader refuses
    it (the parser used to check only that each tensor ended before the end of the file)."""
    from test_hostile_files import Parts
    path = write_tiny_gguf(tmp_path / "t.gguf", TINY_LLAMA, "q8_0")
    assert read_gguf(path)  # what our writer writes is consecutive and aligned
    base = Parts(path)
    for change in ("overlap", "gap", "retype"):
        parts = base.copy()
        second = parts.tensors[1]
        if change == "overlap":
            second["offset"] = 0
        elif change == "gap":
            second["offset"] += 32
        else:  # a Q8_0 weight called Q4_0: fewer bytes, so the next one no longer follows it
            q8 = next(t for t in parts.tensors if t["type"] == gguf.GGMLQuantizationType.Q8_0)
            q8["type"] = int(gguf.GGMLQuantizationType.Q4_0)
        with pytest.raises(ModelFileError, match="data offset"):
            read_gguf(parts.write(tmp_path / f"{change}.gguf"))
