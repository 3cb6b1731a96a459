"""Benchmark decontamination: find training documents that share a word n-gram with an eval text.

Training on an eval text (or a long piece of it) inflates the scores it is later measured with.
The eval n-grams are small next to the corpus, so they are held as one sorted array of hashes and
every training batch is probed against it with a vectorised binary search.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dapt_core.clean.ngrams import WordHashes, hash_words, ngram_hashes, ngram_starts, words
from dapt_core.clean.normalize import normalize_text
from dapt_core.config import NormalizeConfig
from dapt_core.manifest import IngestManifest, QuarantineRecord

_BATCH_DOCS = 1024
_LETTER = re.compile(r"[^\W\d_]")  # a letter: a word character other than a digit or underscore


class EvalNgrams:
    """The set of word n-grams (lowercased, normalised words) of the eval texts."""

    def __init__(self, hashes: np.ndarray, n: int):
        self.hashes = np.unique(hashes)
        self.n = n

    @classmethod
    def from_parquet(cls, paths: list[Path], n: int, normalize: NormalizeConfig) -> EvalNgrams:
        """Read the `text` column of eval shards, normalised like the training text."""
        parts = [np.zeros(0, dtype=np.uint64)]
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_DOCS, columns=["text"]):
                parts.append(cls._ngrams([normalize_text(t, normalize) for t in batch.column(0).to_pylist()], n))
        return cls(np.concatenate(parts), n)

    @staticmethod
    def _ngrams(texts: list[str], n: int) -> np.ndarray:
        """The n-grams of `texts` that have a word with a letter. One of only numbers (table rows,
        dates, scores) is no evidence of a leak and is common in unrelated documents."""
        tokens = [words(t) for t in texts]
        flat = list(chain.from_iterable(tokens))
        letters = np.fromiter((_LETTER.search(w.decode()) is not None for w in flat), dtype=np.int64, count=len(flat))
        letters_before = np.concatenate([[0], np.cumsum(letters)])
        hashed = hash_words(tokens)
        grams, _ = ngram_hashes(hashed, n, short_docs=False)
        starts, _ = ngram_starts(hashed.offsets, n)  # the same n-grams, in the same order
        return grams[letters_before[starts + n] > letters_before[starts]]

    def __len__(self) -> int:
        return len(self.hashes)

    def contaminated(self, words: WordHashes) -> np.ndarray:
        """A bool per text (`words` from `tokenize`): does it contain any eval n-gram?"""
        hit = np.zeros(len(words.offsets) - 1, dtype=bool)
        if len(self.hashes) == 0 or len(hit) == 0:
            return hit
        grams, owners = ngram_hashes(words, self.n, short_docs=False)
        # Binary searches for sorted n-grams stay in cache (several times faster than in text order);
        # the few n-grams found are then looked up in text order.
        probe = np.sort(grams)
        at = np.minimum(np.searchsorted(self.hashes, probe), len(self.hashes) - 1)
        hit[owners[np.isin(grams, probe[self.hashes[at] == probe])]] = True
        return hit


def require_complete_eval_sets(refused: Sequence[QuarantineRecord], ingested: Sequence[IngestManifest] = ()) -> None:
    """Every evaluation file must read completely: decontamination only removes what it can read, so an eval file
    refused at discovery, or one that yielded no document (the usual cause: a wrong text_field) or quarantined some,
    would silently weaken it. One ValueError names every such file."""
    problems = [f"{q.file}: {q.reason} {q.detail}" for q in refused if q.kind == "eval"]
    problems += [
        f"{m.input.uri}: {m.docs} documents read, {len(m.quarantined)} quarantined"
        + (f" (first: {m.quarantined[0].reason} at {m.quarantined[0].position})" if m.quarantined else "")
        for m in ingested
        if m.docs == 0 or m.quarantined
    ]
    if problems:
        raise ValueError(
            "data.eval: evaluation files could not be read completely; check each source's text_field, or fix or "
            "remove the file: " + "; ".join(problems)
        )
