"""homellm: the open LLM stack for a home machine.

`homellm.load(name_or_path)` returns a model with `.tokenizer`, `.logits(ids)`,
`.generate(prompt, **sampling)` and `.chat(messages, **sampling)`. Importing this package
does not import torch; `load` does.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Our C kernels and torch share one OpenMP runtime. Its default of spinning idle threads for
# a while after each parallel region collapses throughput as soon as anything else wants the
# cores (measured on 2 cores under load: 10 vs 88 tok/s decode); sleeping threads cost a few
# microseconds per region instead. It only takes effect before torch loads the runtime, and
# a value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load(name_or_path=None, device=None, dtype=None, ctx=None, quant=None, progress=None,
         adapter=None):
    """Load a model by catalog name, GGUF path or Hugging Face folder (None: the default model);
    `adapter`: a LoRA adapter folder applied without merging."""
    from homellm.api import load as _load
    return _load(name_or_path, device=device, dtype=dtype, ctx=ctx, quant=quant, progress=progress,
                 adapter=adapter)
