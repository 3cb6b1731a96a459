"""Exact and MinHash-LSH near-duplicate detection among the documents that passed the filters.

Reads the table `docs(seq, rank, text_hash, filter_reason, ...)` where `rank` is the priority of a
document (domain before general, then source, file, position in the file): of each group of
duplicates the lowest rank is kept. Creates the table `duplicates(seq, rank, reason, duplicate_of, representative)`,
one row per filter survivor: `reason` is 'exact_duplicate', 'near_duplicate' or NULL (kept);
`duplicate_of` is the seq it was matched to; `representative` is the seq of the kept document its
whole group collapsed onto (itself when nothing collapsed onto it).

The grouping runs as a shuffle on the engine (`shuffle`): one map task per shard splits its survivors by text hash
and its LSH band rows by (band, key) into P partitions; one reduce task per partition finds its exact groups and LSH
buckets, verifies the candidate pairs against the MinHash signatures and returns the verified edges. Here, on the
driver, only those edges (a union-find over them gives the near-duplicate clusters) and the small files of exact
duplicates meet the per-document table: the driver never reads a signature or a band key. Both engines run the same
tasks, so they give the same decisions; so does any P, since a partition always holds whole groups and buckets.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from dapt_core.clean import shuffle
from dapt_core.clean.duck import literal, parquet_source
from dapt_core.clean.parts import PartCache, ShardParts
from dapt_core.config import DedupConfig
from dapt_core.engine import Engine
from dapt_core.hashing import stable_hash

_ROOTS = pa.schema([("rank", pa.int64()), ("root_rank", pa.int64())])
_RANKS_ROW_GROUP = 65_536  # a map task reads its shard's slice of the ranks file by row-group statistics


class UnionFind:
    """Disjoint sets of ints whose root is always the smallest member (the highest priority)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = self.parent.setdefault(x, x)
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> dict[int, int]:
        return {x: self.find(x) for x in self.parent}


def find_duplicates(
    con: duckdb.DuckDBPyConnection,
    shards: list[ShardParts],
    cfg: DedupConfig,
    engine: Engine,
    scratch: Path,
    memory_limit: str,
    cache: PartCache | None = None,
) -> None:
    """Create `duplicates` from the shards' signatures and bands parts (read only when cfg.near), shuffling them
    through files in `scratch` (on Ray: a folder every node reaches) with tasks on `engine`; a shard's map output
    comes from `cache` when it holds it (`_scatter_key`)."""
    results = _shuffle(con, shards, cfg, engine, scratch, memory_limit, cache) if cfg.exact or cfg.near else []
    exact_files = [r.exact_out for r in results if r.exact_duplicates]
    first = "coalesce(x.first_seq, d.seq)" if exact_files else "d.seq"
    exact_duplicates = f"LEFT JOIN {parquet_source(exact_files)} x USING (seq)" if exact_files else ""
    con.execute(f"""
        CREATE TABLE exact AS
        SELECT d.seq, d.rank, {first} AS first_seq FROM docs d {exact_duplicates} WHERE d.filter_reason IS NULL""")
    con.execute("CREATE TABLE near (seq BIGINT, root_seq BIGINT)")
    roots = _near_duplicate_roots(results)
    if roots:
        con.register("near_roots", pa.table({"rank": list(roots), "root_rank": list(roots.values())}, schema=_ROOTS))
        con.execute("""
            INSERT INTO near
            SELECT m.seq, r.seq FROM near_roots n
            JOIN exact m ON m.rank = n.rank JOIN exact r ON r.rank = n.root_rank""")
        con.unregister("near_roots")
    con.execute("""
        CREATE TABLE duplicates AS
        SELECT e.seq, e.rank,
            CASE WHEN e.first_seq <> e.seq THEN 'exact_duplicate'
                 WHEN n.root_seq <> e.seq THEN 'near_duplicate' END AS reason,
            CASE WHEN e.first_seq <> e.seq THEN e.first_seq
                 WHEN n.root_seq <> e.seq THEN n.root_seq END AS duplicate_of,
            coalesce(first_near.root_seq, e.first_seq) AS representative
        FROM exact e
        LEFT JOIN near n ON n.seq = e.seq
        LEFT JOIN near first_near ON first_near.seq = e.first_seq""")


def _shuffle(
    con: duckdb.DuckDBPyConnection,
    shards: list[ShardParts],
    cfg: DedupConfig,
    engine: Engine,
    scratch: Path,
    memory_limit: str,
    cache: PartCache | None,
) -> list[shuffle.PartitionResult]:
    """Scatter every shard (or take its stored scatter), then reduce every partition, both on `engine` (module
    docstring)."""
    scratch.mkdir(parents=True, exist_ok=True)
    ranks = scratch / "ranks.parquet"  # the only per-document file the driver writes: 3 columns of the survivors
    con.execute(f"""
        COPY (SELECT seq, rank, text_hash FROM docs WHERE filter_reason IS NULL ORDER BY seq)
        TO {literal(ranks)} (FORMAT parquet, ROW_GROUP_SIZE {_RANKS_ROW_GROUP})""")
    partitions = shuffle.partition_count(len(shards), engine.slots)
    names = tuple(name for name, on in (("exact", cfg.exact), ("bands", cfg.near)) if on)
    offsets = _rank_offsets(con) if cache else {}
    scatters, outputs, keys = [], [], []
    for i, shard in enumerate(shards):
        job = shuffle.ScatterJob(
            shard, ranks, partitions, cfg, scratch / f"{i:06d}.exact.parquet", scratch / f"{i:06d}.bands.parquet"
        )
        key = _scatter_key(shard, partitions, offsets, cfg) if cache else None
        found = cache.fetch(key, names) if cache and key else None
        outputs.append(found or job.outputs)
        if found is None:
            scatters.append(job)
            keys.append(key)
    engine.map(shuffle.scatter_shard, scatters)
    for job, key in zip(scatters, keys):
        if cache and key:
            cache.keep(key, {name: job.outputs[name] for name in names})
    reduces = [
        shuffle.ReduceJob(
            p,
            tuple(out["exact"] for out in outputs) if cfg.exact else (),
            tuple(out["bands"] for out in outputs) if cfg.near else (),
            tuple(shards),
            cfg,
            memory_limit,
            scratch / f"exact-duplicates-{p:04d}.parquet",
        )
        for p in range(partitions)
    ]
    return engine.map(shuffle.reduce_partition, reduces)


def _rank_offsets(con: duckdb.DuckDBPyConnection) -> dict[int, int | None]:
    """first seq of a shard with filter survivors -> rank - seq of those, when that is one number (else None): the
    shard's scatter rows are then fixed by its parts and that pair (`_scatter_key`). A shard of the flow always has
    one: its files are one source's, in uri order, so its documents are consecutive in priority order."""
    rows = con.execute("""
        SELECT shard_seq, min(rank - seq), max(rank - seq) FROM docs WHERE filter_reason IS NULL
        GROUP BY shard_seq""").fetchall()
    return {first_seq: low if low == high else None for first_seq, low, high in rows}


def _scatter_key(shard: ShardParts, partitions: int, offsets: dict[int, int | None], cfg: DedupConfig) -> str | None:
    """The key of a shard's scatter output: its parts, the partition count and where its survivors sit in the corpus
    (seq and rank); None when its parts are not cached or its ranks are not one offset from its seqs. A refresh whose
    new files come after the old ones in priority order (a new folder, a later date) scatters the new shards only."""
    offset = offsets.get(shard.first_seq, 0)  # no survivor: its scatter is empty wherever it sits
    if shard.key is None or offset is None:
        return None
    return stable_hash(shard.key, "scatter", partitions, shard.first_seq, offset, cfg.exact, cfg.near)


def _near_duplicate_roots(results: list[shuffle.PartitionResult]) -> dict[int, int]:
    """rank -> rank of its cluster's root (the cluster's best rank), for every document on a verified edge.

    The edges of all partitions together are the star pairings of every LSH bucket, so their connected components
    are the near-duplicate clusters, whichever partition found each edge.
    """
    clusters = UnionFind()
    for result in results:
        for head_rank, rank in zip(result.head_ranks.tolist(), result.ranks.tolist()):
            clusters.union(head_rank, rank)
    return clusters.roots()
