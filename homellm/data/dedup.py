"""Duplicate documents out: exact copies by hash, near copies by MinHash LSH.

Exact: the BLAKE2b digest of the normalized text; the first copy seen is kept.

Near: each document becomes the set of its word 5-grams (lowercased, punctuation dropped,
as datatrove's and the Pile's MinHash dedup shingle text); MinHash (Broder 1997) estimates
the Jaccard similarity of two such sets from `num_perm` minima, and locality-sensitive
hashing over bands of those minima finds the candidates with similarity above `threshold`
without comparing every pair. The bands are chosen for recall (see NearDedup), and a
candidate counts only when its estimated Jaccard similarity really is >= threshold. The first document of
a cluster is kept. MinHash and the LSH index are `datasketch`'s (a well-kept library that
does exactly this, vectorized with numpy); the shingles are hashed with zlib's crc32, which
is C and deterministic across runs (datasketch's default SHA-1 is ~2x slower here).
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

from homellm.errors import HomellmError

SHINGLE = 5  # words per shingle
NUM_PERM = 128
LSH_WEIGHTS = (0.05, 0.95)  # (false candidates, misses)
SCHEME = "affine32"  # datasketch >= 2.0's name for the classic (a x + b) mod 2^61-1, 32-bit minima
_WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int = SHINGLE) -> list[bytes]:
    """The document's word n-grams as bytes (a document of fewer words: its words joined)."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


class NearDedup:
    """`seen(key, text)` -> True when `text` is a near copy of a document added before
    (estimated Jaccard similarity of word 5-grams >= threshold); else adds it and says False."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM, seed: int = 1):
        if not 0 < threshold <= 1:
            raise HomellmError(f"dedup threshold {threshold}: expected 0 < threshold <= 1")
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise HomellmError("near-duplicate removal needs datasketch: pip install "
                               "'homellm[pretrain]' (or give --dedup-threshold 0 to keep near copies)") from None
        self._minhash = MinHash
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # bands for recall: datasketch's default weighs misses and false candidates alike,
        # which misses ~60% of pairs right at the threshold (9 bands of 13 minima at 0.8);
        # weights (0.05, 0.95) give 16 bands of 8: 95% found at 0.8, 99.4% at 0.85, and the
        # extra candidates are dropped by the signature check in `seen`
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        self.signatures: dict = {}
        # one MinHash's permutations, copied into every new MinHash (made once, not per document)
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, scheme=SCHEME)

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, hashfunc=zlib.crc32,
                          permutations=self._template.permutations, scheme=SCHEME)
        m.update_batch(shingles(text))
        return m

    def seen(self, key, text: str) -> bool:
        m = self.signature(text)
        for other in self.lsh.query(m):
            # the fraction of equal minima estimates the Jaccard similarity
            if np.count_nonzero(m.hashvalues == self.signatures[other]) >= self.threshold * self.num_perm:
                return True
        self.lsh.insert(key, m)
        self.signatures[key] = m.hashvalues  # (num_perm,) uint64: 1 KiB a document
        return False
