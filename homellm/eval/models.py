"""Which models an eval runs on: `-m base,base+./adapter` lists, opened the same way by every
eval (perplexity, lm-eval tasks, the judge).

    refs = parse_model_list("smollm2,smollm2+./runs/sft/adapter")
    for ref in refs:
        model = open_model(ref, ctx=512)     # homellm.api.Model (the C runtime for a GGUF)
        run_hash = model_hash(ref)           # what results.record() keeps

Syntax: models are separated by commas; `NAME+ADAPTER_DIR` is a LoRA adapter folder (PEFT
layout, `homellm tune`) on the base NAME, applied without merging. NAME is anything `homellm
run -m` takes (a catalog name, a .gguf file, a Hugging Face folder). A path that itself
contains '+' is taken whole when it exists; otherwise the item is cut at the first '+' whose
right side is an existing folder, else at the first '+'.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from homellm.errors import HomellmError

if TYPE_CHECKING:
    from homellm.api import Model


@dataclass(frozen=True)
class ModelRef:
    name: str | None  # None: the default model
    adapter: str | None = None  # a LoRA adapter folder, or None

    @property
    def label(self) -> str:
        """How results and tables name it: "smollm2", "smollm2+runs/sft/adapter"."""
        base = self.name or "default"
        return f"{base}+{self.adapter}" if self.adapter else base


def parse_model_list(text: str | None) -> list[ModelRef]:
    """`a,b+DIR,...` -> ModelRefs, in order. None or "" is the default model alone."""
    if text is None or not text.strip():
        return [ModelRef(None)]
    refs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise HomellmError(f"model list {text!r}: an empty name between commas "
                               f"(expected NAME or NAME+ADAPTER_DIR, separated by commas)")
        refs.append(parse_model(item))
    return refs


def parse_model(item: str) -> ModelRef:
    """One `NAME` or `NAME+ADAPTER_DIR`."""
    if "+" not in item or Path(item).expanduser().exists():
        return ModelRef(item)
    cuts = [i for i, ch in enumerate(item) if ch == "+"]
    cut = next((i for i in cuts if Path(item[i + 1:]).expanduser().is_dir()), cuts[0])
    name, adapter = item[:cut].strip(), item[cut + 1:].strip()
    if not name or not adapter:
        raise HomellmError(f"model {item!r}: expected NAME+ADAPTER_DIR with both parts given")
    return ModelRef(name, adapter)


def check_adapter(ref: ModelRef) -> None:
    """A clear error for an adapter folder that is missing or not an adapter."""
    if ref.adapter is None:
        return
    folder = Path(ref.adapter).expanduser()
    if not folder.is_dir():
        raise HomellmError(f"model {ref.label}: adapter folder {folder}: no such folder")
    from homellm.train.adapter import CONFIG, WEIGHTS
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise HomellmError(f"model {ref.label}: {folder} is not a LoRA adapter folder "
                               f"(no {name}; expected PEFT's layout, as `homellm tune` writes)")


def model_path(ref: ModelRef) -> Path:
    """The file or folder the base model is read from (pulling a known name if needed)."""
    from homellm.catalog import resolve
    return Path(resolve(ref.name))


def model_hash(ref: ModelRef) -> str:
    """results.model_identity of the base file(s) and the adapter."""
    from homellm.eval.results import model_identity
    check_adapter(ref)
    return model_identity(model_path(ref), Path(ref.adapter).expanduser() if ref.adapter else None)


def open_model(ref: ModelRef, *, ctx: int | None = None, device: str | None = None, dtype=None,
               quant: str | None = None, progress=None) -> "Model":
    """homellm.load for a ModelRef: the C runtime for a GGUF file on the CPU, PyTorch for a
    Hugging Face folder, a GPU or an adapter (an adapter's scores stay PyTorch's, the float
    computation PEFT and lm-eval's hf back end compare with)."""
    from homellm.api import load
    check_adapter(ref)
    return load(ref.name, device=device, dtype=dtype, ctx=ctx, quant=quant, progress=progress,
                adapter=Path(ref.adapter).expanduser() if ref.adapter else None, native_adapter=False)
