"""homellm: the open LLM stack for a home machine.

`homellm.load(name_or_path)` returns a model with `.tokenizer`, `.logits(ids)`,
`.generate(prompt, **sampling)` and `.chat(messages, **sampling)`. Importing this package
does not import torch; `load` does.
"""
__version__ = "0.1.0"

import os as _os

# The CPUs this process may run on, before any import: another library's OpenMP runtime (the
# gguf package's sentencepiece brings one) pins the importing thread to one CPU when
# OMP_PROC_BIND is set, and the C kernels' pool threads, started from that thread, would then
# all run on that one CPU (engine/kernels/build.py gives it its CPUs back first).
START_AFFINITY = frozenset(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else None

# The C kernels run on their own thread pool (engine/kernels/thread_pool.h), not OpenMP: its
# threads spin briefly between a token's parallel steps and then sleep, and it runs on fewer
# threads while other programs keep the CPUs busy. OMP_* settings concern PyTorch alone.


def load(name_or_path=None, device=None, dtype=None, ctx=None, quant=None, progress=None,
         adapter=None):
    """Load a model by catalog name, GGUF path or Hugging Face folder (None: the default model);
    `adapter`: a LoRA adapter folder applied without merging."""
    from homellm.api import load as _load
    return _load(name_or_path, device=device, dtype=dtype, ctx=ctx, quant=quant, progress=progress,
                 adapter=adapter)
