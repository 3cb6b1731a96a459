"""The held-out split, chosen by document before any stage that trains or packs.

A document is held out by a hash of its id and the seed, so the split is the same in the tokenizer
stage (which trains only on training documents and reports on held-out ones) and in packing (which
writes the held-out documents as evaluation sets and never packs them).
"""

from __future__ import annotations

from pathlib import Path

import xxhash

from dapt_core.readers import parquet_rows


def heldout_bucket(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document id and the seed."""
    return xxhash.xxh64_intdigest(f"{seed}:{doc_id}".encode()) / float(1 << 64)


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    return heldout_bucket(doc_id, seed) < fraction


def heldout_fraction(n_docs: int, fraction: float, max_docs: int) -> float:
    """The fraction to hold out so that about min(fraction * n_docs, max_docs) documents are held out."""
    return min(fraction, max_docs / n_docs) if n_docs else fraction


def split_texts(parts: list[Path], fraction: float, max_docs: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of a cleaned corpus (its Parquet parts, in order), by the split packing
    uses."""
    rows = list(parquet_rows(parts, ["doc_id", "text"]))
    threshold = heldout_fraction(len(rows), fraction, max_docs)
    train: list[str] = []
    heldout: list[str] = []
    for doc_id, text in rows:
        (heldout if is_heldout(doc_id, threshold, seed) else train).append(text)
    return train, heldout
