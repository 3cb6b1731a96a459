"""Word tokens and vectorised word n-gram hashes, shared by MinHash dedup and decontamination.

Both compare documents as sets of lowercased word n-grams, so punctuation, case and spacing
differences do not hide a duplicate or a leaked benchmark. Hashes are xxhash + fixed numpy
arithmetic (never Python's salted `hash()`), so they are identical in every process.
"""

from __future__ import annotations

import re
from itertools import chain, repeat

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
# One odd multiplier per position in the n-gram, so word order matters ("a b" != "b a").
_POSITION_MULT = np.random.default_rng(0x6E6772616D).integers(0, 2**64, size=64, dtype=np.uint64) | np.uint64(1)
MAX_NGRAM = len(_POSITION_MULT)


def words(text: str) -> list[str]:
    """Lowercased word tokens (runs of letters/digits/underscore); punctuation is dropped."""
    return _WORD.findall(text.lower())


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: spreads the entropy of a uint64 array over all its bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(docs: list[list[str]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of all words of a batch, flattened, and the doc offsets into them (len(docs)+1).

    Each distinct word of the batch is hashed once; most words repeat many times in a batch.
    """
    flat = list(chain.from_iterable(docs))
    vocab = dict.fromkeys(flat)
    hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, vocab, repeat(seed)), dtype=np.uint64, count=len(vocab))
    for i, w in enumerate(vocab):
        vocab[w] = i
    ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return hashes[ids], offsets


def ngram_hashes(hashes: np.ndarray, offsets: np.ndarray, n: int, short_docs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram within each document, and the document index of each.

    `hashes`/`offsets` come from `word_hashes`. With `short_docs`, a document with fewer than `n`
    (but some) words yields one n-gram of all its words instead of none.
    """
    if not 1 <= n <= MAX_NGRAM:
        raise ValueError(f"n-gram size must be in 1..{MAX_NGRAM}, got {n}")
    total = len(hashes)
    counts = np.diff(offsets)
    doc = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(total)
    end = offsets[1:][doc]
    padded = np.concatenate([hashes, np.zeros(n - 1, dtype=np.uint64)])
    acc = np.zeros(total, dtype=np.uint64)
    for j in range(n):  # words past the doc's end add nothing, so short docs get a partial n-gram
        acc += np.where(pos + j < end, padded[j : j + total] * _POSITION_MULT[j], np.uint64(0))
    keep = pos + n <= end
    if short_docs:
        keep |= (pos == offsets[:-1][doc]) & (counts[doc] < n)
    return mix64(acc[keep]), doc[keep]
