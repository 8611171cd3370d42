"""LoRA adapters for the C runtime: a PEFT folder read without PyTorch, its matrices handed to
network.h, which adds each row's adapter to that row's projections only.

    adapter_config.json         peft_type LORA, r, lora_alpha (rank_pattern / alpha_pattern,
                                use_rslora), target_modules
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in)
                                base_model.model.<module>.lora_B.weight (out, r)

y = W x + scale B (A x) with scale = alpha / r (rsLoRA: alpha / sqrt(r)) (Hu et al. 2021; PEFT's
LoraLayer). <module> is one of the seven projections of a decoder layer
(model.layers.N.self_attn.q_proj ... mlp.down_proj); A and B are kept as float32 (F32, F16 and
BF16 files are read). A request's rows name an adapter, so requests with different adapters
(or none) share one batch and one copy of the base weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import numpy as np

from homellm.engine.kernels import build
from homellm.errors import HomellmError
from homellm.model.config import ModelArgs

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
MAX_RANK = 512  # network.h lora_row's buffer


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as float32 numpy arrays (F32, F16, BF16; the format: an
    8-byte little-endian header size, a JSON header of name -> dtype, shape, data_offsets, then
    the data)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise HomellmError(f"{path}: cannot read the adapter: {e.strerror or e}") from None
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + size])
    except (struct.error, ValueError) as e:
        raise HomellmError(f"{path}: not a safetensors file ({e})") from None
    data = memoryview(raw)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HomellmError(f"{path}: tensor {name}: a malformed header entry") from None
        kinds = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
        if dtype not in kinds:
            raise HomellmError(f"{path}: tensor {name} is {dtype}; expected F32, F16 or BF16")
        n = math.prod(shape)
        if not 0 <= a <= b <= len(data) or b - a != n * np.dtype(kinds[dtype]).itemsize:
            raise HomellmError(f"{path}: tensor {name}: its data is cut short or misplaced")
        x = np.frombuffer(data[a:b], dtype=kinds[dtype]).reshape(shape)
        if dtype == "BF16":  # the high half of a float32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.ascontiguousarray(x, dtype=np.float32)
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that names `module` (a
    key matches the module name or its end after a dot)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?{key}", module):
            return value
    return default


def projection_shape(args: ModelArgs, which: int) -> tuple[int, int]:
    """(out, in) of projection `which` (PROJECTIONS order) of a layer."""
    H, F, q, kv = args.hidden_size, args.intermediate_size, args.num_attention_heads * args.head_dim, \
        args.num_key_value_heads * args.head_dim
    return [(q, H), (kv, H), (kv, H), (H, q), (F, H), (F, H), (H, F)][which]


class LoraAdapter:
    """A PEFT LoRA adapter checked against a model's shapes, ready for the C runtime's rows.

    `mats`: {(layer, which): (A (r, in), B (out, r), scale)}; `handle`: network.h's adapter.
    Raises HomellmError naming the file and what is wrong with it."""

    def __init__(self, folder: str | Path, args: ModelArgs, name: str | None = None):
        folder = Path(folder)
        self.folder, self.name = folder, name or folder.name
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise HomellmError(f"{folder}: not a LoRA adapter (expected {CONFIG} and {WEIGHTS})")
        try:
            config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise HomellmError(f"{folder / CONFIG}: cannot read it: {e}") from None
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise HomellmError(f"{folder / CONFIG}: peft_type {config.get('peft_type') if isinstance(config, dict) else config!r}: "
                               "only LORA adapters are supported")
        for key in ("use_dora", "fan_in_fan_out"):
            if config.get(key):
                raise HomellmError(f"{folder / CONFIG}: {key} adapters are not supported")
        if config.get("modules_to_save"):
            raise HomellmError(f"{folder / CONFIG}: modules_to_save {config['modules_to_save']} "
                               "(whole modules replaced) are not supported, only low-rank updates")
        try:
            alpha = float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            raise HomellmError(f"{folder / CONFIG}: lora_alpha: expected a number") from None
        pairs: dict[str, dict[str, np.ndarray]] = {}
        tensors = read_safetensors(folder / WEIGHTS)
        # what the adapter computes, as a name for its keys and values saved on disk
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(memoryview(tensors[key]).cast("B"))  # (no copy)
        self.identity = digest.hexdigest()[:16]
        for key, t in tensors.items():
            m = KEY.match(key)
            if not m:
                raise HomellmError(f"{folder / WEIGHTS}: unexpected tensor {key} (expected "
                                   "base_model.model.<module>.lora_A.weight / lora_B.weight)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        if not pairs:
            raise HomellmError(f"{folder / WEIGHTS}: no lora_A / lora_B tensors")
        self.mats: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]] = {}
        for module, ab in sorted(pairs.items()):
            m = MODULE.match(module)
            if not m or m.group(2) not in PROJECTIONS:
                raise HomellmError(f"{folder / WEIGHTS}: adapts {module}; the C runtime's adapters "
                                   f"take the layers' projections ({', '.join(PROJECTIONS)})")
            layer, which = int(m.group(1)), PROJECTIONS.index(m.group(2))
            if set(ab) != {"A", "B"}:
                raise HomellmError(f"{folder / WEIGHTS}: {module} lacks lora_A or lora_B")
            if layer >= args.num_hidden_layers:
                raise HomellmError(f"{folder / WEIGHTS}: {module}: the model has "
                                   f"{args.num_hidden_layers} layers")
            a, b = ab["A"], ab["B"]
            out_f, in_f = projection_shape(args, which)
            r = a.shape[0] if a.ndim == 2 else -1
            if a.shape != (r, in_f) or b.shape != (out_f, r) or not 0 < r <= MAX_RANK:
                raise HomellmError(f"{folder / WEIGHTS}: {module}: lora_A {a.shape} and lora_B "
                                   f"{b.shape} do not fit the model's {in_f} -> {out_f} projection "
                                   f"(expected (r, {in_f}) and ({out_f}, r), 1 <= r <= {MAX_RANK})")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise HomellmError(f"{folder / WEIGHTS}: {module}: NaN or infinite weights")
            al = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
            scale = al / math.sqrt(r) if config.get("use_rslora") else al / r
            self.mats[(layer, which)] = (a, b, scale)
        self.args = args
        self.handle = None
        lib = build.load()
        if lib is None:
            raise RuntimeError(f"homellm kernels are unavailable: {build.status()}")
        self.lib = lib
        self.handle = lib.hl_lora_new(args.num_hidden_layers)
        if not self.handle:
            raise MemoryError("hl_lora_new: out of memory")
        for (layer, which), (a, b, scale) in self.mats.items():
            if lib.hl_lora_set(self.handle, layer, which, a.shape[0], scale, a.ctypes.data, b.ctypes.data):
                raise HomellmError(f"{folder}: layer {layer} {PROJECTIONS[which]}: refused by the runtime")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.mats.values())

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, {len(self.mats)} matrices, {self.nbytes >> 10} KiB)"

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.hl_lora_free(handle)
