"""homellm: the open LLM stack for a home machine.

`homellm.load(name_or_path)` returns a model with `.tokenizer`, `.logits(ids)`,
`.generate(prompt, **sampling)` and `.chat(messages, **sampling)`. Importing this package
does not import torch; `load` does.
"""
__version__ = "0.1.0"


def load(name_or_path=None, device=None, dtype=None, ctx=None, quant=None, progress=None):
    """Load a model by catalog name, GGUF path or Hugging Face folder (None: the default model)."""
    from homellm.api import load as _load
    return _load(name_or_path, device=device, dtype=dtype, ctx=ctx, quant=quant, progress=progress)
