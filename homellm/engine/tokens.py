"""Token id sequences: the longest common prefix, which every KV-cache reuse is built on
(the engine's cache, the C runtime's, the batch slots and the server's prefix cache).

Plain Python and numpy, no PyTorch: the C runtime imports it too.
"""
from __future__ import annotations

import numpy as np


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences (lists, arrays or tensors)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n
