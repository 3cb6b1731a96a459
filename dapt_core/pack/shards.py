"""Output: the training stream cut into `seq_len` sequences (a document may span sequences), written as
`train/train-00000.parquet`, ... with `mix.shard_sequences` rows each: `input_ids` list<int32> and `doc_lengths`
list<int32> (the lengths of the document pieces in the sequence, summing to seq_len, so training can restart position
ids per document or build a block-diagonal attention mask). `datasets.load_dataset("parquet", data_files=[...])` reads
them directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dapt_core.pack.documents import Docs, in_key_order
from dapt_core.pack.mix import budget_take
from dapt_core.pack.types import PackError


def write_shards(
    tokens: np.ndarray, off: np.ndarray, take: np.ndarray, seq_len: int, shard_sequences: int, out_dir: Path
) -> list[Path]:
    """Cut the stream (documents `off`/`take` back to back) into seq_len sequences, shard_sequences per Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_lengths", pa.list_(pa.int32()))])
    ends = np.cumsum(take)
    total = int(ends[-1]) if len(ends) else 0
    n_seq = total // seq_len
    assert n_seq * seq_len == total
    starts = ends - take
    shards = []
    per_shard = shard_sequences * seq_len
    if per_shard >= 1 << 31:
        raise PackError(
            f"mix.shard_sequences * mix.seq_len = {per_shard:,} tokens per shard overflows list offsets: "
            "lower mix.shard_sequences"
        )
    for k, a in enumerate(range(0, total, per_shard)):
        b = min(a + per_shard, total)
        i0 = int(np.searchsorted(ends, a, side="right"))
        i1 = int(np.searchsorted(ends, b, side="left"))
        pieces = []
        for i in range(i0, i1 + 1):
            lo, hi = max(a, int(starts[i])), min(b, int(ends[i]))
            if hi > lo:
                s = int(off[i]) + lo - int(starts[i])
                pieces.append(tokens[s : s + hi - lo])
        flat = np.concatenate(pieces).astype(np.int32, copy=False)
        n = (b - a) // seq_len
        cuts = np.union1d(ends[i0 : i1 + 1], np.arange(a + seq_len, b + 1, seq_len))
        cuts = cuts[(cuts > a) & (cuts <= b)]
        piece_lens = np.diff(np.concatenate([[a], cuts])).astype(np.int32)
        seq_of_piece = (cuts - 1 - a) // seq_len
        counts = np.bincount(seq_of_piece, minlength=n)
        table = pa.Table.from_arrays(
            [
                pa.ListArray.from_arrays(
                    pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32)), pa.array(flat)
                ),
                pa.ListArray.from_arrays(
                    pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), pa.array(piece_lens)
                ),
            ],
            schema=schema,
        )
        path = out_dir / f"train-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=min(n, 1024), compression="zstd")
        shards.append(path)
    return shards


def write_general_sample(gen: Docs, budget: int, seq_len: int, tokens: np.ndarray, out_dir: Path) -> Path | None:
    """The first general training documents in key order, cut into at most budget / seq_len sequences: the general
    text EWC estimates its Fisher on (replay is not marked in the mixed shards)."""
    order = in_key_order(gen, gen.train & (gen.tok_off >= 0))
    lens = gen.tok_len.astype(np.int64)
    budget = min(budget, int(lens[order].sum())) // seq_len * seq_len
    if budget == 0:
        return None
    take = budget_take(order, lens, budget)
    keep = take > 0
    (out_dir / "general-sample").mkdir(exist_ok=True)
    [path] = write_shards(
        tokens, gen.tok_off[order[keep]], take[keep], seq_len, budget // seq_len, out_dir / "general-sample"
    )
    return path
