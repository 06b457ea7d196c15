"""Duplicates: exact (a hash of the text with whitespace collapsed) and near (MinHash + LSH).

Near duplicates, as datatrove and text-dedup define them: the Jaccard similarity of two documents'
sets of word 5-grams ("shingles"). Chinese has no spaces, so a CJK character is a word of its own
(the same rule for both languages: English words, Chinese characters).

- `signature(text)`: datasketch's MinHash (scheme "affine32", 128 permutations) of the shingles'
  32-bit hashes (xxh3 of each word, combined per 5-gram with numpy).
- `NearDuplicates`: datasketch's MinHashLSH (bands and rows chosen by datasketch for the threshold)
  finds candidates; a candidate counts only when the estimated Jaccard of the two signatures reaches
  the threshold too (LSH alone merges some pairs below it). The first document seen is kept.
"""

from __future__ import annotations

import re

import numpy as np

NUM_PERM = 128
SHINGLE = 5
SEED = 1
THRESHOLD = 0.8
WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_PERMS: dict = {}
_WORD_HASH: dict[str, int] = {}


def exact_key(text: str) -> bytes:
    import xxhash

    return xxhash.xxh3_128_digest(" ".join(text.split()).encode("utf-8"))


def shingles(text: str, n: int = SHINGLE) -> np.ndarray:
    """32-bit hashes (uint32) of the document's distinct word n-grams (fewer words than n: one shingle)."""
    import xxhash

    words = WORDS.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint32)
    if len(_WORD_HASH) > 2_000_000:  # a per-process cache of word hashes, bounded
        _WORD_HASH.clear()
    get = _WORD_HASH.get
    h = np.fromiter((get(w) or _WORD_HASH.setdefault(w, xxhash.xxh3_64_intdigest(w.encode("utf-8")) | 1)
                     for w in words), dtype=np.uint64, count=len(words))
    if len(h) >= n:  # an n-gram's hash: its words' hashes, each rotated by its place, xor-ed
        grams = h[: len(h) - n + 1].copy()
        for k in range(1, n):
            part = h[k : len(h) - n + 1 + k]
            grams ^= (part << np.uint64(7 * k)) | (part >> np.uint64(64 - 7 * k))
    else:
        grams = np.bitwise_xor.reduce(h, keepdims=True)
    return np.unique((grams ^ (grams >> np.uint64(32))).astype(np.uint32))


def _identity(x):
    return x


def minhash(hv: np.ndarray, num_perm: int = NUM_PERM, seed: int = SEED):
    """datasketch.MinHash (its default "affine32" scheme) of the 32-bit shingle hashes."""
    from datasketch import MinHash

    key = (num_perm, seed)
    if key not in _PERMS:
        _PERMS[key] = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, permutations=_PERMS[key], scheme="affine32")
    if len(hv):
        m.update_batch(hv)
    return m


def signature(text: str, num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """The MinHash values (uint32) of the text's shingles."""
    return minhash(shingles(text), num_perm, seed).hashvalues


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity two signatures estimate."""
    return float(np.count_nonzero(a == b)) / len(a)


class NearDuplicates:
    """Streaming near-duplicate filter: add(key, signature) -> the kept key it duplicates, or None (then
    it is kept and indexed). Memory: the LSH bands plus one uint32 signature per kept document."""

    def __init__(self, threshold: float = THRESHOLD, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept: dict = {}

    def add(self, key, sig: np.ndarray):
        from datasketch import LeanMinHash

        m = LeanMinHash(seed=SEED, hashvalues=sig, scheme="affine32")
        best, best_j = None, 0.0
        for other in self.lsh.query(m):
            j = jaccard(sig, self.kept[other])
            if j >= self.threshold and (j > best_j or (j == best_j and other < best)):
                best, best_j = other, j
        if best is not None:
            return best
        self.lsh.insert(key, m, check_duplication=False)
        self.kept[key] = sig
        return None
