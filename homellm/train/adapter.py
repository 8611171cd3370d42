"""LoRA adapters on disk in PEFT's layout, so PEFT and our runtime read the same files.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in)
                                base_model.model.<module>.lora_B.weight (out, r)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...

<module> is the HF module path (model.layers.3.self_attn.q_proj): our parameter names are
transformers', so the keys are exactly those `PeftModel.save_pretrained` writes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from homellm.errors import HomellmError
from homellm.train.config import TARGETS, LoraConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from homellm.train.lora import lora_layers
    out = {}
    for name, layer in lora_layers(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
    return out


def peft_config(lora: LoraConfig, base_model: str | None) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": sorted(lora.module_names), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
            "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": base_model, "revision": None}


def save_adapter(model: nn.Module, lora: LoraConfig, folder: Path, base_model: str | None = None) -> Path:
    """Write the adapter into `folder` (created; files replaced atomically)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter.", suffix=".part")
        os.close(fd)
        save_file(adapter_tensors(model), tmp, metadata={"format": "pt"})
        os.replace(tmp, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(peft_config(lora, base_model), indent=2) + "\n")
    except OSError as e:
        raise HomellmError(f"cannot write the adapter to {folder}: {e.strerror or e}") from None
    return folder


def read_adapter(folder: Path) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(LoraConfig, {module name: (A, B)}) from a PEFT LoRA folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise HomellmError(f"{folder}: not a LoRA adapter (expected {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / WEIGHTS)
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise HomellmError(f"{folder}: cannot read the adapter: {e}") from None
    if config.get("peft_type") != "LORA":
        raise HomellmError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r}: only LORA adapters are supported")
    if config.get("use_rslora") or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise HomellmError(f"{folder / CONFIG}: rsLoRA, DoRA and fan_in_fan_out adapters are not supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    short = [t.removesuffix("_proj") for t in targets if t in TARGETS.values()]
    lora = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), targets=short)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key.replace(".default.", "."))
        if not m:
            raise HomellmError(f"{folder / WEIGHTS}: unexpected tensor {key} (expected "
                               f"{PREFIX}<module>.lora_A.weight / lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    incomplete = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise HomellmError(f"{folder / WEIGHTS}: {incomplete[0]} lacks lora_A or lora_B")
    return lora, {k: (v["A"], v["B"]) for k, v in pairs.items()}


@torch.no_grad()
def apply_adapter(model: nn.Module, folder: Path) -> LoraConfig:
    """Wrap the model's projections in LoRALinear layers holding the adapter's weights
    (not merged: the base layers are kept as they are, quantized or not)."""
    from homellm.train.lora import apply_lora, lora_layers
    lora, pairs = read_adapter(folder)
    apply_lora(model, lora)
    layers = dict(lora_layers(model))
    missing = [k for k in pairs if k not in layers]
    if missing:
        raise HomellmError(f"{folder}: the adapter has weights for {missing[0]}, which this model lacks")
    for name, layer in layers.items():
        if name not in pairs:
            layer.enabled = False  # a target module name this adapter leaves out (e.g. layers_to_transform)
            continue
        a, b = pairs[name]
        if tuple(a.shape) != tuple(layer.lora_A.shape) or tuple(b.shape) != tuple(layer.lora_B.shape):
            raise HomellmError(f"{folder}: {name}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                               f"not fit this model's layer ({layer.in_features} -> {layer.out_features})")
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    model.requires_grad_(False)
    return lora
