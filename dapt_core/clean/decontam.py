"""Benchmark decontamination: find training documents that share a word n-gram with an eval text.

Training on an eval text (or a long piece of it) inflates the scores it is later measured with.
The eval n-grams are small next to the corpus, so they are held as one sorted array of hashes and
every training batch is probed against it with a vectorised binary search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dapt_core.clean.ngrams import ngram_hashes, word_hashes, words
from dapt_core.clean.normalize import normalize_text
from dapt_core.config import NormalizeConfig

_BATCH_DOCS = 1024


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
                parts.append(cls._ngrams([normalize_text(t, normalize) for t in batch.column(0).to_pylist()], n)[0])
        return cls(np.concatenate(parts), n)

    @staticmethod
    def _ngrams(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        hashes, offsets = word_hashes([words(t) for t in texts])
        return ngram_hashes(hashes, offsets, n, short_docs=False)

    def __len__(self) -> int:
        return len(self.hashes)

    def contaminated(self, texts: list[str]) -> np.ndarray:
        """A bool per text: does it contain any eval n-gram?"""
        hit = np.zeros(len(texts), dtype=bool)
        if len(self.hashes) == 0 or not texts:
            return hit
        grams, owners = self._ngrams(texts, self.n)
        at = np.minimum(np.searchsorted(self.hashes, grams), len(self.hashes) - 1)
        hit[owners[self.hashes[at] == grams]] = True
        return hit
