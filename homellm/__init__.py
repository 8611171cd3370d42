"""homellm: the open LLM stack for a home machine.

`homellm.load(name_or_path)` returns a model with `.tokenizer`, `.logits(ids)`,
`.generate(prompt, **sampling)` and `.chat(messages, **sampling)`. Importing this package
does not import torch; `load` does.
"""
__version__ = "0.1.0"

import os as _os

# The CPUs this process may run on, before any import: another library's OpenMP runtime (the
# gguf package's sentencepiece brings one) pins the importing thread to one CPU when
# OMP_PROC_BIND is set, and ours would then see one CPU (engine/kernels/build.py restores it).
START_AFFINITY = frozenset(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else None

# Our C kernels and torch share one OpenMP runtime, left at its defaults here: its threads spin
# a short while after each parallel region (GOMP: 300k spins, then sleep), which a decode step's
# ~250 short regions need (default model, 2 cores: 380 tok/s, against 106 with sleeping threads,
# which a VM wakes slowly; `homellm serve`, 1 / 16 clients: 113 / 445 tok/s against 45 / 335).
# Where other work wants the cores, OMP_WAIT_POLICY=PASSIVE trades that for robustness (decode
# beside a busy process: 160-190 vs 75-120 tok/s).


def load(name_or_path=None, device=None, dtype=None, ctx=None, quant=None, progress=None,
         adapter=None):
    """Load a model by catalog name, GGUF path or Hugging Face folder (None: the default model);
    `adapter`: a LoRA adapter folder applied without merging."""
    from homellm.api import load as _load
    return _load(name_or_path, device=device, dtype=dtype, ctx=ctx, quant=quant, progress=progress,
                 adapter=adapter)
