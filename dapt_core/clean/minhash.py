"""Batched, vectorised MinHash signatures over word shingles, and LSH band keys.

A per-document MinHash loop (datasketch) spends its time in per-shingle Python hashing and in
per-document numpy calls. Here a whole batch is one pipeline: words are hashed once (xxh3, in
`ngrams.tokenize`, shared with decontamination), shingles are combined from word hashes in numpy,
and all permutations are applied to all shingles of a chunk at once, reduced per document with
`np.minimum.reduceat`.

Permutation i is multiply-add-shift, h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 on 32-bit shingle
keys x, which is a strongly universal family (Dietzfelbinger 1996); signature values are uint32.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dapt_core.clean.ngrams import WordHashes, mix64, ngram_hashes

EMPTY = np.uint32(0xFFFFFFFF)
"""Every value of the signature of a document without words."""

_CHUNK_CELLS = 1 << 21  # shingles x permutations evaluated at once: 16 MiB of uint64, cache friendly


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(words: WordHashes, shingle_size: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (uint32, shape (number of texts, num_perm)) of the word-shingle sets of
    the texts whose words are `words` (from `tokenize`).

    Shingles are `shingle_size` consecutive lowercased words; a shorter document is one shingle of
    all its words; a document without words gets all values EMPTY. Only the permutations depend on
    `seed` (the word hashes are shared with decontamination). The same inputs give the same
    signatures in any process.
    """
    shingles, owners = ngram_hashes(words, shingle_size, short_docs=True)
    keys = shingles >> np.uint64(32)
    a, b = _permutations(num_perm, seed % 2**64)
    signatures = np.full((len(words.offsets) - 1, num_perm), EMPTY, dtype=np.uint32)
    step = max(1, _CHUNK_CELLS // num_perm)
    for lo in range(0, len(keys), step):
        owner = owners[lo : lo + step]
        # (num_perm, shingles) layout: reduceat along contiguous rows is several times faster.
        values = np.multiply.outer(a, keys[lo : lo + step])
        values += b[:, None]
        # A chunk may start or end inside a document, so fold its minima into what earlier chunks found.
        segments = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
        docs = owner[segments]
        minima = np.minimum.reduceat(values, segments, axis=1).T >> np.uint64(32)  # shift after min: monotone
        signatures[docs] = np.minimum(signatures[docs], minima)
    return signatures


def signature_column(signatures: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Signatures as stored in a signatures part: one fixed-size binary value a document, its uint32s little-endian.
    A refresh reads the signatures of every candidate pair's documents; Parquet decodes this 3x as fast as a list of
    uint32 (which it stores with a repetition level per value) and stores it in two thirds of the bytes."""
    values = np.ascontiguousarray(signatures, dtype="<u4")
    value_type = pa.binary(values.shape[1] * 4)
    return pa.FixedSizeBinaryArray.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])


def signature_matrix(column: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    """The (documents, num_perm) uint32 matrix of a `signature_column`, as read back."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = num_perm * 4
    if values.type != pa.binary(width) or values.null_count:
        raise ValueError(f"signatures must be {width}-byte values ({num_perm} uint32s), no nulls; not {values.type}")
    if not len(values):
        return np.zeros((0, num_perm), np.uint32)
    data = values.buffers()[1]
    matrix = np.frombuffer(data, "<u4", count=len(values) * num_perm, offset=values.offset * width)
    return matrix.reshape(-1, num_perm).astype(np.uint32, copy=False)


def has_shingles(signatures: np.ndarray) -> np.ndarray:
    """Which signatures come from a document with at least one word (all-EMPTY ones do not)."""
    return ~(signatures == EMPTY).all(axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signatures: the fraction of equal values (row-wise for 2-D)."""
    return (a == b).mean(axis=-1)


def lsh_band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 key per band (shape (n, bands)): two docs share a band key iff, barring a 2^-64
    collision, their signatures agree on all `rows` values of that band."""
    n, num_perm = signatures.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands * rows ({bands}*{rows}) must be <= num_perm ({num_perm})")
    values = signatures[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    keys = np.zeros((n, bands), dtype=np.uint64)
    for r in range(rows):
        keys = mix64(keys ^ values[:, :, r])
    return keys
