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
# ASCII fast path: lowercase word bytes, every other byte becomes a space (same tokens as _WORD).
_ASCII_WORDS = bytes(ord(c.lower()) if c.isalnum() or c == "_" else ord(" ") for c in map(chr, range(128))) + bytes(range(128, 256))
# One odd multiplier per position in the n-gram, so word order matters ("a b" != "b a").
POSITION_MULT = np.random.default_rng(0x6E6772616D).integers(0, 2**64, size=64, dtype=np.uint64) | np.uint64(1)
MAX_NGRAM = len(POSITION_MULT)


def words(text: str) -> list[bytes]:
    """Lowercased word tokens (runs of letters/digits/underscore) as UTF-8; punctuation is dropped.

    Bytes, because that is what gets hashed; ASCII text skips the (3x slower) regex.
    """
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).split()
    return [w.encode() for w in _WORD.findall(text.lower())]


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: spreads the entropy of a uint64 array over all its bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(docs: list[list[bytes]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    counts = np.diff(offsets)
    doc = np.repeat(np.arange(len(counts)), counts)
    full = np.flatnonzero(np.arange(len(hashes)) + n <= offsets[1:][doc])  # n-grams that stay inside their doc
    acc = np.zeros(len(full), dtype=np.uint64)
    for j in range(n):
        acc += hashes[full + j] * POSITION_MULT[j]
    grams, owners = acc, doc[full]
    if short_docs:
        short = np.flatnonzero((counts > 0) & (counts < n))
        if len(short):
            # Sum only the words each short doc has; insert in doc order so each doc's n-grams stay contiguous.
            short_acc = np.zeros(len(short), dtype=np.uint64)
            for j in range(counts[short].max()):
                has = j < counts[short]
                short_acc[has] += hashes[offsets[short[has]] + j] * POSITION_MULT[j]
            at = np.searchsorted(owners, short)
            grams, owners = np.insert(grams, at, short_acc), np.insert(owners, at, short)
    return mix64(grams), owners
