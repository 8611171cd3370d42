"""A whole sequence's teacher-forced logits, a block of rows at a time (echoed prompts'
logprobs): the C runtime through its own cache, the PyTorch network through a KV cache of
its own. Memory stays at `rows` x vocab floats whatever the length.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from homellm.engine.kernels.native import AdaptedModel, NativeModel
from homellm.engine.sampling import as_numpy


def prompt_logits(network, ids: list[int], rows: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """(a, logits (b - a, vocab) float32) for positions a..b-1 of ids, every position but the
    last: row r predicts ids[a + r + 1]."""
    n = len(ids) - 1
    if isinstance(network, (NativeModel, AdaptedModel)):
        with network.lock:  # (the served network's own cache: one user at a time)
            network.reset()
            for a in range(0, n, rows):
                b = min(a + rows, n)
                yield a, network.forward(ids[a:b], a, last_only=False)
        return
    import torch

    from homellm.engine.kv_cache import KVCache
    cache = KVCache(network.args, max(len(ids), 1), device=network.inv_freq.device)  # (as Engine's)
    with torch.inference_mode():
        for a in range(0, n, rows):
            b = min(a + rows, n)
            tokens = torch.tensor([ids[a:b]], dtype=torch.long, device=network.inv_freq.device)
            yield a, as_numpy(network(tokens, start_pos=a, cache=cache, last_only=False)[0])
