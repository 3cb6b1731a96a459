"""The clean stage: normalise, filter, decontaminate and deduplicate ingested documents.

One module per job: `normalize`, `quality`, `decontam`, `minhash` (with `ngrams`), `dedup`,
`stats`; `pipeline.clean_corpus` runs them in order with full per-document accounting.
"""

from dapt_core.clean.pipeline import CleanOutput, clean_corpus

__all__ = ["CleanOutput", "clean_corpus"]
