"""Word tokens and vectorised word n-gram hashes, shared by MinHash dedup and decontamination.

Both compare documents as sets of lowercased word n-grams, so punctuation, case and spacing
differences do not hide a duplicate or a leaked benchmark. Hashes are xxhash + fixed numpy
arithmetic (never Python's salted `hash()`), so they are identical in every process.
"""

from __future__ import annotations

import re
from itertools import chain, repeat
from typing import NamedTuple

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
# ASCII fast path: lowercase word bytes, every other byte becomes a space (same tokens as _WORD).
_ASCII_WORDS = bytes(ord(c.lower()) if c.isalnum() or c == "_" else ord(" ") for c in map(chr, range(128))) + bytes(
    range(128, 256)
)
# One odd multiplier per position in the n-gram, so word order matters ("a b" != "b a").
POSITION_MULT = np.random.default_rng(0x6E6772616D).integers(0, 2**64, size=64, dtype=np.uint64) | np.uint64(1)
MAX_NGRAM = len(POSITION_MULT)
# The xxh3 seed of word hashes. MinHash seeds only its permutations, so decontamination can share the
# hashes; 1 is the default MinHash seed, which hashed the words before they were shared, so the
# default signatures (and near-duplicate decisions) did not change.
_WORD_SEED = 1


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


class WordHashes(NamedTuple):
    """The 64-bit hashes of the words of a batch of texts, flattened, and each text's offsets into
    them (len(texts) + 1). Decontamination and MinHash share one per batch."""

    hashes: np.ndarray
    offsets: np.ndarray

    def take(self, docs: np.ndarray | list[int]) -> WordHashes:
        """The word hashes of the texts at the indices `docs`, in that order."""
        counts = np.diff(self.offsets)[docs]
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        index = np.arange(offsets[-1]) + np.repeat(self.offsets[:-1][docs] - offsets[:-1], counts)
        return WordHashes(self.hashes[index], offsets)


def tokenize(texts: list[str]) -> WordHashes:
    """The `words` of each text, hashed."""
    return hash_words([words(t) for t in texts])


def hash_words(docs: list[list[bytes]]) -> WordHashes:
    """Hash the words of each document (xxh3 of each word: cheaper than first finding the distinct ones)."""
    flat = list(chain.from_iterable(docs))
    hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, flat, repeat(_WORD_SEED)), dtype=np.uint64, count=len(flat))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return WordHashes(hashes, offsets)


def ngram_starts(offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each word n-gram that fits inside its document starts (an index into the flat words,
    ascending), and the index of that document."""
    counts = np.diff(offsets)
    doc = np.repeat(np.arange(len(counts)), counts)
    starts = np.flatnonzero(np.arange(len(doc)) + n <= offsets[1:][doc])
    return starts, doc[starts]


def ngram_hashes(words: WordHashes, n: int, short_docs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram within each document (in `ngram_starts` order), and the document
    index of each.

    With `short_docs`, a document with fewer than `n` (but some) words yields one n-gram of all its
    words instead of none.
    """
    if not 1 <= n <= MAX_NGRAM:
        raise ValueError(f"n-gram size must be in 1..{MAX_NGRAM}, got {n}")
    hashes, offsets = words
    counts = np.diff(offsets)
    full, owners = ngram_starts(offsets, n)
    grams = np.zeros(len(full), dtype=np.uint64)
    for j in range(n):
        grams += hashes[full + j] * POSITION_MULT[j]
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
