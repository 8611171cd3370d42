"""Hostile model files: corrupted GGUFs made from the default model, broken Hugging Face
folders made from a tiny one, each given to `run` and to `pull` under a 4 GB address-space
limit. Every one must end in a clean error (`error: ...`, exit 1, never the "unexpected"
fallback), and a refused pull must leave the catalog as it was (no entry, no staging folder).

The files are written here, in the test, by a small GGUF writer that reproduces the default
model's header field by field and lets a variant change any of it (values, types, counts,
tensor offsets and types, the data itself). One subprocess (with RLIMIT_AS set) builds each
variant, runs the CLI's `main` on it in-process, and reports one JSON line per case: a
variant that asks for gigabytes shows up as a MemoryError ("unexpected") or a dead process.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
MEMORY_LIMIT = 4_000_000_000  # bytes of address space for the process that runs the cases
TESTS = Path(__file__).parent
_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
        V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
        V.FLOAT64: "<d"}


# -- a GGUF file as editable parts ---------------------------------------------------------------

class Parts:
    """A GGUF file as header fields, tensor infos and data bytes; `write` lays them out
    again (offsets as given: a variant may break them)."""

    def __init__(self, path: Path):
        from homellm.model.formats import gguf_file
        src = gguf_file.read(path, mode="r")
        self.kv = {k: (tuple(src.types[k]), v) for k, v in src.metadata.items()}
        self.tensors = [{"name": t.name, "dims": list(t.dims), "type": int(t.ggml_type),
                         "offset": t.offset - src.data_offset, "n_bytes": t.n_bytes}
                        for t in src.tensors]
        with open(path, "rb") as f:
            f.seek(src.data_offset)
            self.data = f.read()
        self.pad, self.n_tensors, self.n_kv, self.cut = 32, None, None, None

    def copy(self) -> "Parts":
        new = object.__new__(Parts)
        new.kv = dict(self.kv)
        new.tensors = [dict(t) for t in self.tensors]
        new.data, new.pad, new.n_tensors, new.n_kv, new.cut = self.data, 32, None, None, None
        return new

    def tensor(self, name: str) -> dict:
        return next(t for t in self.tensors if t["name"] == name)

    def writable(self) -> bytearray:
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        return self.data

    def blocks(self, name: str) -> np.ndarray:
        """A tensor's raw bytes as (blocks, block bytes), writable."""
        t = self.tensor(name)
        size = gguf.GGML_QUANT_SIZES[Q(t["type"])][1]
        return np.frombuffer(self.writable(), np.uint8, t["n_bytes"], t["offset"]).reshape(-1, size)

    def write(self, path: Path) -> Path:
        out = [b"GGUF", struct.pack("<IQQ", 3, len(self.tensors) if self.n_tensors is None
                                    else self.n_tensors, len(self.kv) if self.n_kv is None else self.n_kv)]
        for key, (types, value) in self.kv.items():
            out += [_string(key), struct.pack("<I", types[0]), _value(types, value)]
        for t in self.tensors:
            out += [_string(t["name"]), struct.pack("<I", len(t["dims"])),
                    struct.pack(f"<{len(t['dims'])}Q", *t["dims"]), struct.pack("<IQ", t["type"], t["offset"])]
        header = b"".join(out)
        header += b"\0" * (-len(header) % self.pad)
        with open(path, "wb") as f:
            f.write(header)
            f.write(self.data if self.cut is None else self.data[:self.cut])
        return path


def _string(s) -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _value(types, value) -> bytes:
    if types[0] == V.STRING:
        return _string(value)
    if types[0] == V.ARRAY:
        item, out = types[1], [struct.pack("<IQ", types[1], len(value))]
        if item == V.STRING:
            out += [_string(v) for v in value]
        else:
            out.append(np.asarray(value, dtype=np.dtype(_FMT[item])).tobytes())
        return b"".join(out)
    return struct.pack(_FMT[types[0]], value)


def _set(key, value, vtype=None):
    def change(p: Parts):
        types = (vtype,) if vtype is not None else p.kv[key][0]
        p.kv[key] = (types, value)
    return change


def _drop(*keys):
    def change(p: Parts):
        for k in keys:
            p.kv.pop(k, None)
    return change


def _template(text, vtype=V.STRING):
    return _set("tokenizer.chat_template", text, vtype)


def _all(*changes):
    def change(p: Parts):
        for c in changes:
            c(p)
    return change


def _offsets_zero(p: Parts):
    for t in p.tensors:
        t["offset"] = 0


def _embd_at_end(p: Parts):
    t = p.tensor("token_embd.weight")
    t["offset"] = len(p.data) - t["n_bytes"]


def _retype(name, ggml_type):
    def change(p: Parts):
        for t in p.tensors:
            if t["name"] == name or (name.startswith("*") and t["name"].endswith(name[1:])):
                t["type"] = int(ggml_type)
    return change


def _nan_norm(p: Parts):
    t = p.tensor("output_norm.weight")
    np.frombuffer(p.writable(), np.float32, t["n_bytes"] // 4, t["offset"])[:] = np.nan


def _inf_embd_scales(p: Parts):  # Q8_0 blocks: float16 d first; the first 2000 rows' scales +inf
    p.blocks("token_embd.weight")[:2000 * 576 // 32, 0:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)


def _nan_scales(name):  # Q4_1 blocks: float16 d, m first
    def change(p: Parts):
        p.blocks(name)[:, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    return change


def _spm(scores: int | None):
    """The vocabulary relabelled as a SentencePiece ('llama') one, with `scores` scores."""
    def change(p: Parts):
        p.kv["tokenizer.ggml.model"] = ((V.STRING,), "llama")
        if scores is not None:
            p.kv["tokenizer.ggml.scores"] = ((V.ARRAY, V.FLOAT32), [0.0] * scores)
    return change


def _cut(fraction):
    def change(p: Parts):
        p.cut = int(len(p.data) * fraction)
    return change


def _count(n_tensors=None, n_kv=None):
    def change(p: Parts):
        p.n_tensors, p.n_kv = n_tensors, n_kv
    return change


def _offset(name, value):
    def change(p: Parts):
        p.tensor(name)["offset"] = value
    return change


def _align_1(p: Parts):  # the key says 1, the header is still padded to 32
    p.kv["general.alignment"] = ((V.UINT32,), 1)


N_VOCAB = 49152
# name -> (change, what `run`'s error must say, what `pull`'s must say); None: must succeed
GGUF_CASES = {
    "control": (lambda p: None, None, None),
    "trunc_half": (_cut(0.5), "is truncated", "is truncated"),
    "ntensors_u64max": (_count(n_tensors=2**64 - 1), "the header claims", "the header claims"),
    "offset_past_eof": (_offset("blk.0.ffn_norm.weight", 2**40), "data offset", "data offset"),
    "offset_all_zero": (_offsets_zero, "data offset", "data offset"),
    "embd_at_file_end": (_embd_at_end, "data offset", "data offset"),
    "type_q41_to_q80": (_retype("blk.0.attn_q.weight", Q.Q8_0), "data offset", "data offset"),
    "type_q41_to_q40": (_retype("blk.0.attn_q.weight", Q.Q4_0), "data offset", "data offset"),
    "type_ffn_down_q2k": (_retype("*ffn_down.weight", Q.Q2_K), "data offset", "data offset"),
    "type_embd_bf16": (_retype("token_embd.weight", Q.BF16), "data offset", "data offset"),
    "block_count_u32max": (_set("llama.block_count", 2**32 - 1), "block_count", "block_count"),
    "block_count_i64max": (_set("llama.block_count", 2**63 - 1, V.INT64), "block_count", "block_count"),
    "block_count_string": (_set("llama.block_count", "30", V.STRING), "block_count", "block_count"),
    "context_length_0": (_set("llama.context_length", 0), "context_length", "context_length"),
    "context_length_1": (_set("llama.context_length", 1), "context_length", "context_length"),
    "context_length_minus1": (_set("llama.context_length", -1, V.INT32), "context_length", "context_length"),
    "head_count_0": (_set("llama.attention.head_count", 0), "head_count", "head_count"),
    "head_count_kv_0": (_set("llama.attention.head_count_kv", 0), "head_count_kv", "head_count_kv"),
    "heads_576_192_hd1": (_all(_set("llama.attention.head_count", 576),
                               _set("llama.attention.head_count_kv", 192),
                               _set("llama.attention.key_length", 1, V.UINT32)), "head_dim", "head_dim"),
    "eps_nan": (_set("llama.attention.layer_norm_rms_epsilon", math.nan), "layer_norm_rms_epsilon",
                "layer_norm_rms_epsilon"),
    "eps_minus1": (_set("llama.attention.layer_norm_rms_epsilon", -1.0), "layer_norm_rms_epsilon",
                   "layer_norm_rms_epsilon"),
    "freq_base_0": (_set("llama.rope.freq_base", 0.0), "rope.freq_base", "rope.freq_base"),
    "freq_base_nan": (_set("llama.rope.freq_base", math.nan), "rope.freq_base", "rope.freq_base"),
    "freq_base_minus1": (_set("llama.rope.freq_base", -1.0), "rope.freq_base", "rope.freq_base"),
    "rope_factor_0": (_all(_set("llama.rope.scaling.type", "linear", V.STRING),
                           _set("llama.rope.scaling.factor", 0.0, V.FLOAT32)),
                      "rope.scaling.factor", "rope.scaling.factor"),
    "rope_factor_nan": (_all(_set("llama.rope.scaling.type", "linear", V.STRING),
                             _set("llama.rope.scaling.factor", math.nan, V.FLOAT32)),
                        "rope.scaling.factor", "rope.scaling.factor"),
    "tok_model_missing": (_drop("tokenizer.ggml.model"), "tokenizer.ggml.model", "tokenizer.ggml.model"),
    "tok_model_bert": (_set("tokenizer.ggml.model", "bert"), "tokenizer.ggml.model", "tokenizer.ggml.model"),
    "tok_tokens_missing": (_drop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens", "tokenizer.ggml.tokens"),
    "tok_tokens_empty": (_set("tokenizer.ggml.tokens", []), "tokenizer.ggml.tokens is empty",
                         "tokenizer.ggml.tokens is empty"),
    "tok_tokens_ints": (lambda p: p.kv.update({"tokenizer.ggml.tokens": ((V.ARRAY, V.INT32), list(range(N_VOCAB)))}),
                        "tokenizer.ggml.tokens", "tokenizer.ggml.tokens"),
    "tok_merges_missing": (_drop("tokenizer.ggml.merges"), "tokenizer.ggml.merges", "tokenizer.ggml.merges"),
    "tok_spm_no_scores": (_spm(None), "tokenizer.ggml.scores", "tokenizer.ggml.scores"),
    "tok_spm_scores_short": (_spm(10), "disagree", "disagree"),
    "tmpl_syntax_error": (_template("{% for m in messages %}{{ m.content }"), "does not compile",
                          "does not compile"),
    "tmpl_escape_mro": (_template("{{ ''.__class__.__mro__[1].__subclasses__() }}"), "unsafe", "unsafe"),
    "tmpl_loop_1e10": (_template("{% for i in range(100000) %}{% for j in range(100000) %}x"
                                 "{% endfor %}{% endfor %}"), "limit", "limit"),
    "tmpl_str_mul_4g": (_template("{{ 'a' * 4000000000 }}"), "limit", "limit"),
    "tmpl_huge_output": (_template("{% for i in range(100000) %}{{ 'word ' * 100 }}{% endfor %}"),
                         "limit", "limit"),
    "tmpl_recursion": (_template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
                       "recursed", "recursed"),
    "tmpl_raise": (_template("{{ raise_exception('boom from template') }}"), "boom", "boom"),
    "tmpl_not_string": (_template(7, V.INT32), "tokenizer.chat_template", "tokenizer.chat_template"),
    "tmpl_empty": (_template(""), "empty", "empty"),
    "data_nan_norm": (_nan_norm, "output_norm.weight", "output_norm.weight"),
    "data_inf_embd_scales": (_inf_embd_scales, "NaN/inf values at the token embedding",
                             "token_embd.weight"),
    "data_nan_scales_layer5": (_nan_scales("blk.5.ffn_down.weight"), "NaN/inf values at layer 5",
                               "blk.5.ffn_down.weight"),
}
# ran by the ASan test too: the variants the C runtime computes on
RUNTIME_CASES = ["control", "data_inf_embd_scales", "data_nan_scales_layer5"]


# -- a tiny Hugging Face folder and its broken variants -------------------------------------------

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 256,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32"}


def write_tiny_hf(folder: Path) -> Path:
    """config.json, one model.safetensors of random float32 weights, a byte-level tokenizer."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from gguf_fixtures import tiny_llama_state
    from homellm.model.config import ModelArgs

    folder.mkdir(parents=True)
    args = ModelArgs.from_hf_config(HF_CONFIG)
    save_file({k: v.contiguous() for k, v in tiny_llama_state(args).items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    del torch
    return folder


def _config(**changes):
    def change(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))  # (NaN written as NaN, as Python does)
    return change


def _tok_config(**changes):
    def change(folder: Path):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(changes)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return change


def _config_list(folder: Path):
    (folder / "config.json").write_text(json.dumps([HF_CONFIG]))


def _empty_vocab(folder: Path):
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"], spec["model"]["merges"], spec["added_tokens"] = {}, [], []
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def _index_to(target: str):
    """Weights moved out of the folder, an index naming them by `target` (relative to the folder)."""
    def change(folder: Path):
        outside = folder.parent / f"{folder.name}-outside"
        outside.mkdir()
        shutil.move(folder / "model.safetensors", outside / "model.safetensors")
        from safetensors import safe_open
        with safe_open(outside / "model.safetensors", framework="np") as st:
            names = list(st.keys())
        name = str(outside / "model.safetensors") if target == "absolute" else \
            f"../{outside.name}/model.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: name for n in names}}))
    return change


HF_CASES = {
    "hf_control": (lambda f: None, None, None),
    "cfg_is_list": (_config_list, "expected a JSON object", "expected a JSON object"),
    "cfg_heads_0": (_config(num_attention_heads=0), "num_attention_heads", "num_attention_heads"),
    "cfg_kv_heads_0": (_config(num_key_value_heads=0), "num_key_value_heads", "num_key_value_heads"),
    "cfg_hidden_str": (_config(hidden_size="abc"), "hidden_size", "hidden_size"),
    "cfg_layers_neg": (_config(num_hidden_layers=-1), "num_hidden_layers", "num_hidden_layers"),
    "cfg_layers_float": (_config(num_hidden_layers=2.5), "num_hidden_layers", "num_hidden_layers"),
    "cfg_layers_1e9": (_config(num_hidden_layers=10**9), "num_hidden_layers", "num_hidden_layers"),
    "cfg_layers_1e6": (_config(num_hidden_layers=10**6), "num_hidden_layers", "num_hidden_layers"),
    "cfg_hidden_1e9": (_config(hidden_size=10**9, head_dim=16), "config.json", "config.json"),
    "cfg_rope_llama3_partial": (_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                "low_freq_factor", "low_freq_factor"),
    "cfg_rope_yarn": (_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "not supported",
                      "not supported"),
    "cfg_eps_nan": (_config(rms_norm_eps=math.nan), "rms_norm_eps", "rms_norm_eps"),
    "cfg_vocab_mismatch": (_config(vocab_size=300), "embed_tokens", "embed_tokens"),
    "cfg_maxpos_0": (_config(max_position_embeddings=0), "max_position_embeddings",
                     "max_position_embeddings"),
    "tok_empty_vocab": (_empty_vocab, "vocabulary is empty", "vocabulary is empty"),
    "tok_missing": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer", "no tokenizer"),
    "tmpl_list_form": (_tok_config(chat_template=[{"name": "default", "template": 5}]),
                       "chat_template[0]", "chat_template[0]"),
    "tmpl_list_no_default": (_tok_config(chat_template=[{"name": "tool_use", "template": "x"}]),
                             "without a 'default'", "without a 'default'"),
    "tmpl_loop": (_tok_config(chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                                            "x{% endfor %}{% endfor %}"), "limit", "limit"),
    "index_absolute": (_index_to("absolute"), "weight_map", "weight_map"),
    "index_traversal": (_index_to("traversal"), "weight_map", "weight_map"),
}


# -- the process that runs the cases under the memory limit ---------------------------------------

def _main(argv: list[str]) -> tuple[int, str]:
    """`homellm ARGV` in this process: (exit code, what it wrote to stderr)."""
    from homellm.cli.main import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, err.getvalue()


def drive(kind: str, names: list[str], work: str, source: str | None = None) -> None:
    """Run each case with `run` and `pull`; print one JSON line per (case, command)."""
    import resource
    limit = int(os.environ.get("HOSTILE_AS_LIMIT", MEMORY_LIMIT))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    work = Path(work)
    models = Path(os.environ["HOMELLM_HOME"]) / "models"
    base = Parts(Path(source)) if kind == "gguf" else None
    for name in names:
        t0 = time.perf_counter()
        if kind == "gguf":
            parts = base.copy()
            GGUF_CASES[name][0](parts)
            path = parts.write(work / f"{name}.gguf")
            del parts
        else:
            path = work / name / "Tiny-HF"
            write_tiny_hf(path)
            HF_CASES[name][0](path)
        for command in ("run", "pull"):
            argv = (["run", "-m", str(path), "--max-tokens", "2", "--temperature", "0", "hi"]
                    if command == "run" else ["pull", str(path), "--name", f"x:{name}"])
            rc, err = _main(argv)
            left = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
            print(json.dumps({"case": name, "command": command, "rc": rc, "stderr": err[-3000:],
                              "left": left, "s": round(time.perf_counter() - t0, 2)}), flush=True)
            if command == "pull" and rc == 0:
                _main(["rm", f"x:{name}"])
        if kind == "gguf":
            path.unlink()
        else:
            shutil.rmtree(path.parent, ignore_errors=True)


def run_cases(kind: str, names: list[str], tmp_path: Path, source: Path | None = None,
              env: dict | None = None, timeout: float = 1500) -> dict[tuple[str, str], dict]:
    """drive() in a subprocess; {(case, command): result}."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_hostile_files as t; "
            f"t.drive({kind!r}, {names!r}, {str(work)!r}, {str(source) if source else None!r})")
    full_env = {**os.environ, "HOMELLM_HOME": str(home), **(env or {})}
    full_env.pop("HOMELLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[(r["case"], r["command"])] = r
    missing = [(n, c) for n in names for c in ("run", "pull") if (n, c) not in results]
    assert proc.returncode == 0 and not missing, (
        f"the case runner died (rc {proc.returncode}) before {missing[:3]}:\n{proc.stderr[-4000:]}")
    return results


def check_results(results: dict, cases: dict) -> list[str]:
    """Every expectation of `cases` that a result breaks, as lines."""
    bad = []
    for (name, command), r in sorted(results.items()):
        expected = cases[name][1 if command == "run" else 2]
        err = r["stderr"]
        if expected is None:
            if r["rc"] != 0:
                bad.append(f"{name} {command}: expected success, got rc {r['rc']}: {err[-300:]}")
            continue
        last = [line for line in err.splitlines() if line.startswith("error:")]
        if r["rc"] != 1 or not last:
            bad.append(f"{name} {command}: expected a clean error, got rc {r['rc']}: {err[-300:]}")
        elif "error: unexpected" in err or "Traceback" in err:
            bad.append(f"{name} {command}: not a clean error: {last[-1][:300]}")
        elif expected not in last[-1]:
            bad.append(f"{name} {command}: {expected!r} not in {last[-1][:300]!r}")
        if command == "pull" and r["left"]:
            bad.append(f"{name} pull: the catalog changed: {r['left']}")
    return bad


@pytest.mark.slow
def test_corrupted_gguf_corpus(default_gguf, tmp_path):
    results = run_cases("gguf", list(GGUF_CASES), tmp_path, default_gguf)
    bad = check_results(results, GGUF_CASES)
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_broken_hf_folders(tmp_path):
    results = run_cases("hf", list(HF_CASES), tmp_path)
    bad = check_results(results, HF_CASES)
    assert not bad, "\n".join(bad)


# -- the C runtime under AddressSanitizer ------------------------------------------------------

ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
# the C runtime's own tests, the cases that exercise it: every kernel path, type and packing
ASAN_TESTS = ["tests/test_native.py",
              "tests/test_kernels.py::test_matmul_matches_reference",
              "tests/test_kernels.py::test_packed_q4_matches_raw_kernel",
              "tests/test_kernels.py::test_attention_causal_matches_sdpa",
              "tests/test_kernels.py::test_fast_decoder_tiny_quantized",
              "tests/test_kernels_quants.py::test_dequant_rows_equal_gguf",
              "tests/test_kernels_quants.py::test_matmul_matches_reference",
              "tests/test_kernels_quants.py::test_native_model_prefill_and_decode",
              "tests/test_kernels_quants.py::test_packed_kquants_equal_the_raw_kernels"]
# run before anything else in a process under ASan: load() then takes the ASan build
ASAN_BOOT = ("import pathlib, sys; sys.path.insert(0, {tests!r})\n"
             "from homellm.engine.kernels import build\n"
             "build.build = lambda force=False: pathlib.Path({lib!r})\n"
             "build.reset()\n")


def asan_build() -> tuple[Path, Path]:
    """(the C runtime built with AddressSanitizer, the ASan runtime to preload), from the
    kernels' own compiler and flags (engine/kernels/build.py) plus -fsanitize=address;
    cached beside the normal build under a key of the sources, compiler and flags. Skips
    the test when the compiler has no ASan."""
    import hashlib

    from homellm.engine.kernels import build
    cc = build.compiler()
    if cc is None:
        pytest.skip("no C compiler: the C runtime is not built at all")
    found = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    runtime = Path(found.stdout.strip())
    if found.returncode != 0 or not runtime.is_absolute() or not runtime.exists():
        pytest.skip(f"{cc} has no AddressSanitizer runtime (libasan.so): the ASan run is skipped")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    sources = [build.SOURCE, *sorted(build.SOURCE.parent.glob("*.h"))]
    flags = [*build.FLAGS, *ASAN_FLAGS]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + version.encode()
                         + " ".join(flags).encode()).hexdigest()[:16]
    out = build.cache_dir() / f"ggml_cpu-asan-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cc, *flags, "-o", str(tmp), str(build.SOURCE), "-lm"],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            if "sanitize" in res.stderr or "asan" in res.stderr.lower():
                pytest.skip(f"{cc} cannot build with -fsanitize=address: {res.stderr[-300:]}")
            raise AssertionError(f"the ASan build failed: {res.stderr[-2000:]}")
        os.replace(tmp, out)
    return out, runtime


def asan_env(runtime: Path, home: Path) -> dict:
    env = {**os.environ, "LD_PRELOAD": str(runtime), "HOMELLM_HOME": str(home),
           "HOSTILE_AS_LIMIT": "0",  # ASan maps terabytes of shadow memory: no RLIMIT_AS
           # Python's own allocations live until exit: leaks are not the C runtime's
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:exitcode=86"}
    env.pop("HOMELLM_DEBUG", None)
    return env


def asan_report(proc) -> str | None:
    text = proc.stdout + proc.stderr
    if "AddressSanitizer" in text or proc.returncode == 86:
        start = text.find("==ERROR: AddressSanitizer")
        return text[start:start + 6000] if start >= 0 else text[-6000:]
    return None


@pytest.mark.slow
def test_c_runtime_under_address_sanitizer(default_gguf, tmp_path):
    """The C runtime's core tests and the corrupted files that reach it, with the library built
    under AddressSanitizer: no report. A planted overflow first shows the harness catches one."""
    lib, runtime = asan_build()
    boot = ASAN_BOOT.format(tests=str(TESTS), lib=str(lib))
    env = asan_env(runtime, tmp_path / "home")
    root = TESTS.parent

    # the harness works: a read past a numpy buffer inside the library is reported
    planted = boot + (
        "import numpy as np\n"
        "lib = build.load()\n"
        "w = np.zeros((1, 34), np.uint8); out = np.zeros((4, 32), np.float32)\n"
        "lib.hl_dequant_rows(8, w.ctypes.data, 34, 4, 32, out.ctypes.data)  # 4 rows of 1\n")
    proc = subprocess.run([sys.executable, "-c", planted], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert asan_report(proc) and "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]

    code = boot + ("import pytest\nsys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', "
                   f"'-k', 'not never_imports_torch', *{ASAN_TESTS!r}]))\n")  # (that one: a subprocess)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=root)
    assert asan_report(proc) is None, asan_report(proc)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    work = tmp_path / "work"
    work.mkdir()
    code = boot + (f"import test_hostile_files as t\n"
                   f"t.drive('gguf', {RUNTIME_CASES!r}, {str(work)!r}, {str(default_gguf)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=root)
    assert asan_report(proc) is None, asan_report(proc)
    results = {(r["case"], r["command"]): r for r in
               (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert len(results) == 2 * len(RUNTIME_CASES), proc.stderr[-3000:]
    bad = check_results(results, GGUF_CASES)
    assert not bad, "\n".join(bad)
