"""Mixed-corpus packing: held-out eval splits, tokenisation, a token-exact domain/general mix, fixed-length sequences.

`pack_corpus` turns the cleaned domain and general corpora (Parquet: doc_id, text, source, kind, file, position) into
training shards and evaluation files, in steps that each live in their own module:

1. `documents`: held-out split by document, before anything is packed (the tokenizer stage's rule, so neither trains
   on evaluation documents); held-out text goes to `eval/domain.jsonl` and `eval/general.jsonl`. For lm-eval, a
   `data_files` string makes these the `train` split of the local dataset: use `test_split: train`. General held-out
   text is written even when `general_fraction` is 0 (forgetting is still measured on it).
2. `tokenise`: every document is `[BOS] ids EOS`, encoded in-process or on spawned workers, streamed to a flat int32
   token file read back through a memmap (memory is O(documents) plus a batch: measured peak RSS 494 MB for 2.5M
   tokens, 553 MB for 9.0M, mostly transformers and mapped pages of the token file). Throughput per design, measured:
   bench/README.md ("pack.py"). If the worker pool cannot start or breaks, packing tokenises in-process instead and
   says so in `report["warnings"]`.
3. `mix`: token-exact domain/general budget, general documents subset or repeated by seeded order, both kinds
   interleaved so that any window of training sees about the target share of general tokens. f > 0 without general
   text or replay texts is an error.
4. `shards`: the stream cut into `seq_len` sequences with per-sequence `doc_lengths`, written as Parquet shards.

`corpus.pack_corpus` runs these steps in order.
"""

from dapt_core.pack.corpus import pack_corpus
from dapt_core.pack.types import KINDS, REPLAY_SOURCE, SELF_REPLAY_EVAL_WARNING, PackError, PackResult, RefreshSpec

__all__ = [
    "KINDS",
    "REPLAY_SOURCE",
    "SELF_REPLAY_EVAL_WARNING",
    "PackError",
    "PackResult",
    "RefreshSpec",
    "pack_corpus",
]
