"""Exact-duplicate groups and LSH buckets as a map-side partitioned shuffle through files, run on an `Engine`.

Map (`scatter_shard`, one task per shard): the shard's filter survivors, as (text_hash, seq, rank) rows, go to
partition hash(text_hash) mod P, and its LSH band rows, as (band, key, seq, rank, text_hash), to partition
hash(band, key) mod P. Each output file is sorted by partition with one row group per partition, so a reader of one
partition skips the others' row groups by their statistics (a shuffle file and its index in one Parquet file).

Reduce (`reduce_partition`, one task per partition) reads its row groups from every shard's files, so it sees whole
exact groups and whole LSH buckets:
* exact: each group's best-ranked row is kept; the others are written as (seq, first_seq) to a small file;
* near: each bucket member is paired with the bucket's best-ranked member only (a star: a bucket of k near-identical
  documents costs k pairs, not k^2; the union of the stars over all bands rebuilds the clusters), the pairs' MinHash
  signatures are read from the shards' signature parts (only the row groups holding them), and only the pairs whose
  estimated Jaccard similarity reaches the threshold come back: (head_rank, rank), the edges of the clusters.
Exact copies share every band key, so a bucket holds all copies of a text or none: keeping each bucket's best-ranked
row per text_hash removes exactly the exact duplicates, without waiting for the exact reduce.

Everything a task reads or writes is a file (scratch on storage every node reaches); what returns to the driver is
the edges, never documents or signatures.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dapt_core.clean.duck import connect, literal
from dapt_core.clean.minhash import jaccard, signature_matrix
from dapt_core.clean.ngrams import mix64
from dapt_core.clean.parts import ShardParts
from dapt_core.config import DedupConfig

_MAX_PARTITIONS = 128
_VERIFY_PAIRS = 65_536  # candidate pairs compared at once: bounds the two gathered signature matrices
_EXACT_ROWS = pa.schema([("part", pa.int32()), ("text_hash", pa.binary(16)), ("seq", pa.int64()), ("rank", pa.int64())])
_BAND_ROWS = pa.schema(
    [
        ("part", pa.int32()),
        ("band", pa.int32()),
        ("key", pa.uint64()),
        ("seq", pa.int64()),
        ("rank", pa.int64()),
        ("text_hash", pa.binary(16)),
    ]
)


def partition_count(shards: int, slots: int) -> int:
    """Reduce partitions for a corpus of `shards` shards on an engine running `slots` tasks at once. One slot (the
    local engine): one partition, so every shard file is read once. Else about the square root of the shards: every
    reduce task reads a row group of every shard's files, so the reads grow as shards x partitions; the square root
    lets the reduce side grow with the corpus (more tasks, each with more data) while that fixed cost grows as
    shards^1.5, not shards^2. The decisions are the same for any count (tests/test_dedup_shuffle.py)."""
    if slots <= 1:
        return 1
    return max(1, min(math.isqrt(max(shards - 1, 0)) + 1, _MAX_PARTITIONS))


@dataclass(frozen=True)
class ScatterJob:
    """The map side for one shard: its rows, split into `partitions` by hash, to `exact_out` and `bands_out`."""

    shard: ShardParts
    ranks: Path  # (seq, rank, text_hash) of every filter survivor of the corpus, sorted by seq
    partitions: int
    cfg: DedupConfig
    exact_out: Path
    bands_out: Path

    @property
    def outputs(self) -> dict[str, Path]:
        """Its files by name ('exact', 'bands'; each written only when its dedup kind is on)."""
        return {"exact": self.exact_out, "bands": self.bands_out}


@dataclass(frozen=True)
class ReduceJob:
    """The reduce side for one partition: its row groups of every shard's scattered files."""

    partition: int
    exact_in: tuple[Path, ...]
    bands_in: tuple[Path, ...]
    shards: tuple[ShardParts, ...]  # where the signatures of the candidates are
    cfg: DedupConfig
    memory_limit: str  # DuckDB's, in this task
    exact_out: Path
    touched: Path | None = None
    """Parquet of the (band, key) buckets that hold a new document: only those are paired and verified (the clusters
    of the others are known from the last run, `dedup.find_duplicates`); None: every bucket."""


@dataclass(frozen=True)
class PartitionResult:
    """What one reduce task returns: the verified near-duplicate edges (a pair of ranks per edge) and the file of its
    exact duplicates (seq, first_seq), with their count."""

    head_ranks: np.ndarray
    ranks: np.ndarray
    exact_duplicates: int
    exact_out: Path


def scatter_shard(job: ScatterJob) -> None:
    """Write the shard's exact rows (if cfg.exact) and band rows (if cfg.near), each sorted by partition."""
    shard = job.shard
    ranks = pq.read_table(job.ranks, filters=[("seq", ">=", shard.first_seq), ("seq", "<", shard.end_seq)])
    ranks = ranks.sort_by("seq")  # a filtered read need not keep row order; the lookups below need it sorted
    # DuckDB writes the 16-byte hashes as variable-length binary.
    seqs, hashes = ranks.column("seq").to_numpy(), ranks.column("text_hash").cast(pa.binary(16)).combine_chunks()
    if job.cfg.exact:
        rows = {"text_hash": hashes, "seq": seqs, "rank": ranks.column("rank")}
        _write_partitioned(job.exact_out, rows, _leading_u64(hashes), job.partitions, _EXACT_ROWS)
    if job.cfg.near:
        bands = pq.read_table(shard.bands)
        band_seqs = bands.column("seq").to_numpy() + shard.first_seq
        at = np.searchsorted(seqs, band_seqs)  # every banded document is a filter survivor, so it is in `ranks`
        band, key = bands.column("band").to_numpy(), bands.column("key").to_numpy()
        rows = {
            "band": band,
            "key": key,
            "seq": band_seqs,
            "rank": ranks.column("rank").to_numpy()[at],
            "text_hash": hashes.take(at),
        }
        _write_partitioned(job.bands_out, rows, mix64(key ^ band.astype(np.uint64)), job.partitions, _BAND_ROWS)


def _leading_u64(hashes: pa.FixedSizeBinaryArray) -> np.ndarray:
    """The first 8 bytes of each 16-byte hash as a uint64 (the hashes are uniform, so this is too)."""
    if len(hashes) == 0:
        return np.zeros(0, np.uint64)
    words = np.frombuffer(hashes.buffers()[1], dtype=np.uint64)
    return words[2 * hashes.offset : 2 * (hashes.offset + len(hashes)) : 2]


def _write_partitioned(path: Path, columns: dict, hashes: np.ndarray, partitions: int, schema: pa.Schema) -> None:
    """One Parquet file of the rows sorted by partition (hash mod partitions), one row group per partition."""
    part = (hashes % np.uint64(partitions)).astype(np.int32)
    order = np.argsort(part, kind="stable")
    table = pa.table({"part": part, **columns}, schema=schema).take(order)
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    with pq.ParquetWriter(path, schema) as out:
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            if hi > lo:
                out.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)


def reduce_partition(job: ReduceJob) -> PartitionResult:
    """Exact duplicates and verified near-duplicate edges among the rows of one partition (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="dapt-reduce-") as tmp:
        con = connect(Path(tmp), job.memory_limit)
        try:
            exact = _exact_duplicates(con, job) if job.cfg.exact else 0
            if not job.cfg.near:
                return PartitionResult(np.zeros(0, np.int64), np.zeros(0, np.int64), exact, job.exact_out)
            _candidates(con, job)
            heads, members = _verified(con, job)
        finally:
            con.close()
    return PartitionResult(heads, members, exact, job.exact_out)


def _rows_of(files: tuple[Path, ...], partition: int) -> str:
    """The rows of `partition` in the scattered `files` (a filter DuckDB checks against each row group's min/max)."""
    return f"(SELECT * FROM read_parquet([{', '.join(literal(f) for f in files)}]) WHERE part = {int(partition)})"


def _exact_duplicates(con: duckdb.DuckDBPyConnection, job: ReduceJob) -> int:
    """Write (seq, first_seq) of every row that is not the best-ranked of its text_hash group; return their count."""
    con.execute(f"""
        COPY (SELECT seq, first_seq FROM (
                SELECT seq, first_value(seq) OVER (PARTITION BY text_hash ORDER BY rank) AS first_seq
                FROM {_rows_of(job.exact_in, job.partition)})
              WHERE first_seq <> seq)
        TO {literal(job.exact_out)} (FORMAT parquet)""")
    return pq.ParquetFile(job.exact_out).metadata.num_rows


def _candidates(con: duckdb.DuckDBPyConnection, job: ReduceJob) -> None:
    """Table `candidates(head, head_rank, seq, rank)`: each bucket member paired with the bucket's best-ranked one,
    exact duplicates left out (only the best-ranked row of each text_hash in a bucket stays, when cfg.exact)."""
    rows = _rows_of(job.bands_in, job.partition)
    if job.touched is not None:  # whole buckets, old members and new
        rows = f"(SELECT * FROM {rows} SEMI JOIN read_parquet({literal(job.touched)}) USING (band, key))"
    banded = (
        f"SELECT band, key, arg_min(seq, rank) AS seq, min(rank) AS rank FROM {rows} GROUP BY band, key, text_hash"
        if job.cfg.exact
        else f"SELECT band, key, seq, rank FROM {rows}"
    )
    con.execute(f"""
        CREATE TABLE candidates AS
        WITH banded AS ({banded}),
        heads AS (
            SELECT band, key, arg_min(seq, rank) AS head, min(rank) AS head_rank
            FROM banded GROUP BY band, key HAVING count(*) > 1)
        SELECT DISTINCT h.head, h.head_rank, b.seq, b.rank
        FROM heads h JOIN banded b USING (band, key)
        WHERE b.seq <> h.head""")


def _verified(con: duckdb.DuckDBPyConnection, job: ReduceJob) -> tuple[np.ndarray, np.ndarray]:
    """(head_rank, rank) of the candidate pairs whose estimated Jaccard similarity reaches the threshold. The
    signatures of the partition's candidate documents are read once and held (about 1/P of all candidates')."""
    needed = con.sql("SELECT head AS seq FROM candidates UNION SELECT seq FROM candidates ORDER BY seq")
    sig_seqs, sigs = _signatures_of(needed.fetchnumpy()["seq"].astype(np.int64), job.shards, job.cfg.num_perm)
    heads, members = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in con.sql("SELECT head, head_rank, seq, rank FROM candidates").to_arrow_reader(_VERIFY_PAIRS):
        head_sig = sigs[np.searchsorted(sig_seqs, batch.column("head").to_numpy())]
        member_sig = sigs[np.searchsorted(sig_seqs, batch.column("seq").to_numpy())]
        similar = jaccard(head_sig, member_sig) >= job.cfg.jaccard_threshold
        heads.append(batch.column("head_rank").to_numpy()[similar])
        members.append(batch.column("rank").to_numpy()[similar])
    return np.concatenate(heads), np.concatenate(members)


def _signatures_of(seqs: np.ndarray, shards: tuple[ShardParts, ...], num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """The signatures of the documents `seqs` (sorted global seqs), as (seqs, uint32 matrix) in seq order, reading
    of each shard's signatures part only the row groups whose seq range holds one of them."""
    found_seqs, found_sigs = [np.zeros(0, np.int64)], [np.zeros((0, num_perm), np.uint32)]
    for shard in shards:
        lo, hi = np.searchsorted(seqs, [shard.first_seq, shard.end_seq])
        if lo == hi:
            continue
        local = seqs[lo:hi] - shard.first_seq
        with pq.ParquetFile(shard.signatures) as file:
            groups = [g for g in range(file.num_row_groups) if _may_hold(file.metadata.row_group(g), local)]
            table = file.read_row_groups(groups, columns=["seq", "sig"])
        table = table.filter(np.isin(table.column("seq").to_numpy(), local))
        found_seqs.append(table.column("seq").to_numpy() + shard.first_seq)
        found_sigs.append(signature_matrix(table.column("sig"), num_perm))
    return np.concatenate(found_seqs), np.concatenate(found_sigs)


def _may_hold(row_group: pq.RowGroupMetaData, seqs: np.ndarray) -> bool:
    """Whether the row group's `seq` range (column 0, from its statistics) holds one of the sorted `seqs`."""
    stats = row_group.column(0).statistics
    if stats is None or not stats.has_min_max:
        return True
    return bool(np.searchsorted(seqs, stats.min) < np.searchsorted(seqs, stats.max, side="right"))
