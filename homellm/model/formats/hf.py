"""Hugging Face model folders: config.json, *.safetensors (sharded with an index), tokenizer files.

Tensor names are transformers' own (model.layers.N.self_attn.q_proj.weight, ...), which are
also ours for every LLaMA-like family (llama, mistral, qwen2, qwen3, gemma3_text, stablelm), so
reading is a lookup and writing is `save_file`. Two families store some tensors otherwise, and
are translated here (`network_names` on reading, `family_names` on writing):

- phi3: `self_attn.qkv_proj` is q, k and v stacked by rows, `mlp.gate_up_proj` gate then up;
- gpt_neox: its own names (gpt_neox.embed_in, attention.dense, mlp.dense_h_to_4h, ...) and a
  query_key_value tensor whose rows go head by head, (q, k, v) of each head in turn.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from homellm.errors import HomellmError, ModelFileError
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor, TokenizerSource, cat_rows, split_rows
from homellm.model.formats.hf_config import FAMILIES
from homellm.model.config import ModelArgs

SUPPORTED_MODEL_TYPES = set(FAMILIES)
SHARD_BYTES = 4 << 30  # a new safetensors shard every 4 GiB, as transformers does by default


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_args(folder: Path) -> ModelArgs:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelFileError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    config = _read_json(config_path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(f"{config_path}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    try:
        return ModelArgs.from_hf_config(config)
    except KeyError as e:
        raise ModelFileError(f"{config_path}: required field {e} is missing") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{config_path}: {e}") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those the index names (each inside the folder), else every
    *.safetensors in it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no weight_map")
        names = set(weight_map.values())
        for name in names:
            # a shard is a file name in the folder: no absolute path, no '..', no sub-folder
            # that leads out of it (symlinks included)
            if not isinstance(name, str) or not name or Path(name).is_absolute() \
                    or ".." in Path(name).parts or "\\" in name:
                raise ModelFileError(f"{index}: weight_map names {name!r}: expected a file name "
                                     f"inside the model folder")
            inside = (folder / name).resolve()
            if not inside.is_relative_to(folder.resolve()):
                raise ModelFileError(f"{index}: weight_map names {name!r}, which leads outside "
                                     f"the model folder (to {inside})")
        files = [folder / name for name in sorted(names)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors weights")
    for f in files:
        if not f.exists():
            raise ModelFileError(f"{f}: listed in the index but missing")
    return files


def chat_template_of(value, path: Path) -> str | None:
    """The chat template a tokenizer_config.json's `chat_template` field gives: a string, or
    the list form [{"name": ..., "template": ...}] whose "default" entry is used (as
    transformers does); anything else is a ModelFileError naming the file."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, item in enumerate(value):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ModelFileError(f"{path}: chat_template[{i}] is {str(item)[:80]!r}: expected "
                                     f"an object with a string 'name' and a string 'template'")
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise ModelFileError(f"{path}: chat_template is a list of named templates "
                                 f"({', '.join(named) or 'none'}) without a 'default' one")
        return named["default"]
    raise ModelFileError(f"{path}: chat_template is a {type(value).__name__}: expected a string "
                         f"or a list of named templates")


# GPT-NeoX's names -> ours (per layer without the "gpt_neox.layers.N." / "model.layers.N." prefix)
NEOX_GLOBAL = {"gpt_neox.embed_in.weight": "model.embed_tokens.weight",
               "gpt_neox.final_layer_norm.weight": "model.norm.weight",
               "gpt_neox.final_layer_norm.bias": "model.norm.bias", "embed_out.weight": "lm_head.weight"}
NEOX_BLOCK = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
              "attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
              "mlp.dense_4h_to_h": "mlp.down_proj"}
NEOX_IGNORED = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def neox_split(t, n_heads: int) -> list:
    """GPT-NeoX's query_key_value rows (n_heads x (q, k, v) x head_dim) -> [q, k, v] rows."""
    shape = tuple(t.shape)
    per = t.reshape(n_heads, 3, shape[0] // n_heads // 3, *shape[1:])
    return [per[:, i].reshape(shape[0] // 3, *shape[1:]) for i in range(3)]


def neox_join(q, k, v, n_heads: int):
    """The inverse of neox_split (torch tensors)."""
    stacked = torch.stack([t.reshape(n_heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1)
    return stacked.reshape(-1, *q.shape[1:])


def network_names(args: ModelArgs, tensors: dict, source: Path) -> dict:
    """A family's tensors (as its safetensors name them) under the network's names."""
    d, nq, nkv, ff = args.head_dim, args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    out = {}
    for name, t in tensors.items():
        if args.model_type == "phi3" and name.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")):
            p = name.rsplit(".", 2)[0] + "."  # model.layers.N.self_attn. / .mlp.
            if "qkv" in name:
                parts, names = split_rows(t, [nq * d, nkv * d, nkv * d]), ("q_proj", "k_proj", "v_proj")
            else:
                parts, names = split_rows(t, [ff, ff]), ("gate_proj", "up_proj")
            out.update({f"{p}{n}.weight": x for n, x in zip(names, parts)})
        elif args.model_type == "gpt_neox":
            if name in NEOX_GLOBAL:
                out[NEOX_GLOBAL[name]] = t
                continue
            parts = name.split(".", 3)  # gpt_neox, layers, N, rest
            if len(parts) < 4 or parts[:2] != ["gpt_neox", "layers"] or not parts[2].isdigit():
                raise ModelFileError(f"{source}: unexpected tensor {name} for a gpt_neox model")
            rest, kind = parts[3].rsplit(".", 1) if "." in parts[3] else (parts[3], "")
            p = f"model.layers.{parts[2]}."
            if parts[3] in NEOX_IGNORED:
                continue
            if rest == "attention.query_key_value":
                if t.shape[0] != 3 * nq * d:
                    raise ModelFileError(f"{source}: tensor {name} has shape {list(t.shape)}, "
                                         f"expected {3 * nq * d} rows")
                for n, x in zip(("q_proj", "k_proj", "v_proj"), neox_split(t, nq)):
                    out[f"{p}self_attn.{n}.{kind}"] = x
            elif rest in NEOX_BLOCK:
                out[f"{p}{NEOX_BLOCK[rest]}.{kind}"] = t
            else:
                raise ModelFileError(f"{source}: unexpected tensor {name} for a gpt_neox model")
        else:
            out[name] = t
    return out


def family_names(args: ModelArgs, tensors: dict) -> dict:
    """The inverse of network_names, for the family `args.to_hf_config()` writes."""
    family = args.to_hf_config()["model_type"]
    if family not in ("phi3", "gpt_neox"):
        return dict(tensors)
    out = {}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        if family == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = cat_rows(
                [tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            out[p + "mlp.gate_up_proj.weight"] = cat_rows(
                [tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]])
    if family == "phi3":
        out.update({k: v for k, v in tensors.items() if ".self_attn.q_proj." not in k
                    and ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k
                    and ".mlp.gate_proj." not in k and ".mlp.up_proj." not in k})
        return out
    to_neox = {v: k for k, v in NEOX_GLOBAL.items()}
    block = {v: k for k, v in NEOX_BLOCK.items()}
    for name, t in tensors.items():
        if name in to_neox:
            out[to_neox[name]] = t
            continue
        _, _, i, rest = name.split(".", 3)
        where, kind = rest.rsplit(".", 1)
        if where in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if where == "self_attn.q_proj":
                qkv = [_float_tensor(tensors[f"model.layers.{i}.self_attn.{n}_proj.{kind}"]) for n in "qkv"]
                out[f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"] = neox_join(
                    *qkv, args.num_attention_heads)
            continue
        out[f"gpt_neox.layers.{i}.{block[where]}.{kind}"] = t
    return out


def _float_tensor(t) -> torch.Tensor:
    if isinstance(t, GGMLTensor):
        return t.dequantize()
    return t if isinstance(t, torch.Tensor) else torch.from_numpy(t)


def _check_tensors(folder: Path, args: ModelArgs, tensors: dict) -> None:
    """Every tensor the network needs is there with the shape config.json implies; the layer
    count is bounded by the tensors first (num_hidden_layers = 10**9 fails here, fast)."""
    from homellm.model.formats.gguf import expected_shapes
    config = folder / "config.json"
    layers = {int(n.split(".")[2]) for n in tensors
              if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if args.num_hidden_layers > len(layers):
        raise ModelFileError(f"{config}: num_hidden_layers is {args.num_hidden_layers}, but the "
                             f"safetensors hold tensors for {len(layers)} layers")
    expected = expected_shapes(args)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ModelFileError(f"{folder}: missing tensors {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                             + f" (for the network {config.name} describes)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(f"{folder}: tensor {name} has shape {list(tensors[name].shape)}, "
                                 f"expected {list(shape)} from {config} (hidden_size, "
                                 f"intermediate_size, vocab_size, heads)")


def read_hf(folder: Path) -> Checkpoint:
    """Read a HF folder; tensors come from memory-mapped safetensors files."""
    folder = Path(folder)
    args = read_args(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelFileError(f"{f}: cannot read safetensors ({e})") from None
    try:
        tensors = network_names(args, tensors, folder)
    except ValueError as e:  # a fused tensor of the wrong size
        raise ModelFileError(f"{folder}: {e}") from None
    _check_tensors(folder, args, tensors)
    tokenizer_config = {}
    if (folder / "tokenizer_config.json").exists():
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
    template = chat_template_of(tokenizer_config.get("chat_template"), folder / "tokenizer_config.json")
    if (folder / "chat_template.jinja").exists():  # transformers >= 4.50 saves it on its own
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{folder / 'chat_template.jinja'}: cannot read ({e})") from None
    tok_json = folder / "tokenizer.json"
    config = _read_json(folder / "config.json")
    return Checkpoint(
        args=args, tensors=tensors,
        tokenizer=TokenizerSource(tokenizer_json=tok_json if tok_json.exists() else None,
                                  tokenizer_config=tokenizer_config),
        chat_template=template, source=folder, format="hf",
        metadata={"name": config.get("_name_or_path") or folder.name,
                  "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
                  "tensor_types": _count_dtypes(tensors)})


def _count_dtypes(tensors: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors.values():
        key = t.type_name if isinstance(t, GGMLTensor) else str(t.dtype).removeprefix("torch.").upper()
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_hf(folder: Path, args: ModelArgs, tensors: dict[str, torch.Tensor | GGMLTensor], *,
             dtype: torch.dtype = torch.bfloat16, tokenizer_json: str | None = None,
             tokenizer_config: dict | None = None, chat_template: str | None = None,
             progress=None) -> Path:
    """Write a folder that transformers' `from_pretrained` loads.

    Written into a temporary sibling folder and renamed at the end, so a failure leaves
    nothing half-written at `folder`. Quantized tensors are dequantized to `dtype`.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise HomellmError(f"{folder}: already exists and is not empty")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    except OSError as e:
        raise HomellmError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        config = args.to_hf_config()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        tensors = family_names(args, {n: t for n, t in tensors.items()
                                      if not (args.tie_word_embeddings and n == "lm_head.weight")})
        names = list(tensors)
        for i, name in enumerate(names):
            t = tensors[name]
            if isinstance(t, np.ndarray):
                t = torch.from_numpy(t)
            t = t.dequantize(dtype) if isinstance(t, GGMLTensor) else t.to(dtype)
            if size and size + t.nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += t.nbytes
            if progress:
                progress(i + 1, len(names))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.nbytes for s in shards for t in s.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        tok_config = dict(tokenizer_config or {})
        if chat_template:
            tok_config["chat_template"] = chat_template
        if tok_config:
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is for every reader
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
