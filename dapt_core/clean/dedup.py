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
duplicates meet the per-document table: the driver never reads a signature, and band keys only of a refresh's new
shards (the buckets it reduces, `_earlier_clusters`). Both engines run the same tasks, so they give the same
decisions; so does any P, since a partition always holds whole groups and buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

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
    comes from `cache` when it holds it (`_scatter_key`), and so do the near-duplicate clusters of the last run's
    documents when those come first, unchanged (`_earlier_clusters`)."""
    shuffled = _shuffle(con, shards, cfg, engine, scratch, memory_limit, cache) if cfg.exact or cfg.near else None
    results = shuffled.results if shuffled else []
    exact_files = [r.exact_out for r in results if r.exact_duplicates]
    first = "coalesce(x.first_seq, d.seq)" if exact_files else "d.seq"
    exact_duplicates = f"LEFT JOIN {parquet_source(exact_files)} x USING (seq)" if exact_files else ""
    con.execute(f"""
        CREATE TABLE exact AS
        SELECT d.seq, d.rank, {first} AS first_seq FROM docs d {exact_duplicates} WHERE d.filter_reason IS NULL""")
    con.execute("CREATE TABLE near (seq BIGINT, root_seq BIGINT)")
    roots = _near_duplicate_roots(results, shuffled.earlier if shuffled else {})
    near_roots = pa.table({"rank": list(roots), "root_rank": list(roots.values())}, schema=_ROOTS)
    if shuffled and shuffled.clusters_key and cache:
        pq.write_table(near_roots, scratch / "clusters.parquet")
        cache.keep(shuffled.clusters_key, {"clusters": scratch / "clusters.parquet"})
    if roots:
        con.register("near_roots", near_roots)
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


@dataclass(frozen=True)
class _Shuffled:
    results: list[shuffle.PartitionResult]
    earlier: dict[int, int]
    """rank -> cluster root rank of the earlier documents' near duplicates, when only the buckets holding a new
    document were reduced; else empty."""
    clusters_key: str | None
    """Where this run's clusters are kept for the next refresh (None: a shard's map output is not cached); None too
    when they are kept there already."""


def _shuffle(
    con: duckdb.DuckDBPyConnection,
    shards: list[ShardParts],
    cfg: DedupConfig,
    engine: Engine,
    scratch: Path,
    memory_limit: str,
    cache: PartCache | None,
) -> _Shuffled:
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
    scatters, outputs, keys, reused = [], [], [], []
    for i, shard in enumerate(shards):
        job = shuffle.ScatterJob(
            shard, ranks, partitions, cfg, scratch / f"{i:06d}.exact.parquet", scratch / f"{i:06d}.bands.parquet"
        )
        key = _scatter_key(shard, partitions, offsets, cfg) if cache else None
        found = cache.fetch(key, names) if cache and key else None
        outputs.append(found or job.outputs)
        keys.append(key)
        reused.append(found is not None)
        if found is None:
            scatters.append((job, key))
    engine.map(shuffle.scatter_shard, [job for job, _ in scatters])
    for job, key in scatters:
        if cache and key:
            cache.keep(key, {name: job.outputs[name] for name in names})
    earlier_count = len(list(takewhile(bool, reused)))
    earlier_key = _clusters_key(keys[:earlier_count]) if cache and cfg.near and earlier_count else None
    earlier = _earlier_clusters(cache, earlier_key) if cache and earlier_key else None
    new_bands = [out["bands"] for out in outputs[earlier_count:]]
    touched = _touched_buckets(con, new_bands, scratch) if earlier is not None else None
    reduces = [
        shuffle.ReduceJob(
            p,
            tuple(out["exact"] for out in outputs) if cfg.exact else (),
            tuple(out["bands"] for out in outputs) if cfg.near else (),
            tuple(shards),
            cfg,
            memory_limit,
            scratch / f"exact-duplicates-{p:04d}.parquet",
            touched,
        )
        for p in range(partitions)
    ]
    clusters_key = _clusters_key(keys) if cache and cfg.near and all(keys) else None
    return _Shuffled(
        engine.map(shuffle.reduce_partition, reduces),
        earlier or {},
        None if earlier is not None and clusters_key == earlier_key else clusters_key,
    )


def _clusters_key(scatter_keys: list[str | None]) -> str:
    """The key of the near-duplicate clusters of the shards whose map outputs these are: they fix every band row,
    signature, rank and the dedup settings, so the clusters too."""
    return stable_hash("clusters", scatter_keys)


def _earlier_clusters(cache: PartCache, key: str) -> dict[int, int] | None:
    """rank -> root rank of the clusters a run on exactly the leading shards whose map output was reused kept under
    `key`; None when there are none (the first run, or earlier shards changed or moved).

    A refresh then pairs and verifies only the buckets holding a new document. The earlier documents keep their
    ranks, so the new ones rank after all of them: every bucket without a new document gives the edges it gave last
    time, and a bucket with one keeps its best-ranked (earlier) head and the earlier edges to it. The last run's
    clusters (as a star of each document to its root: the same components as its edges) joined with the new edges
    are the components a full run gives, a new document that bridges two earlier clusters included."""
    found = cache.fetch(key, ("clusters",))
    if found is None:
        return None
    table = pq.read_table(found["clusters"], schema=_ROOTS)
    return dict(zip(table.column("rank").to_pylist(), table.column("root_rank").to_pylist()))


def _touched_buckets(con: duckdb.DuckDBPyConnection, new_bands: list[Path], scratch: Path) -> Path:
    """Parquet of the distinct (band, key) of the new shards' band rows: the buckets a refresh reduces."""
    path = scratch / "touched.parquet"
    rows = parquet_source(new_bands) if new_bands else "(SELECT 0::INTEGER AS band, 0::UBIGINT AS key WHERE false)"
    con.execute(f"COPY (SELECT DISTINCT band, key FROM {rows}) TO {literal(path)} (FORMAT parquet)")
    return path


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


def _near_duplicate_roots(results: list[shuffle.PartitionResult], earlier: dict[int, int]) -> dict[int, int]:
    """rank -> rank of its cluster's root (the cluster's best rank), for every document on a verified edge or in an
    `earlier` cluster.

    The edges of all partitions together are the star pairings of every LSH bucket, so their connected components
    are the near-duplicate clusters, whichever partition found each edge.
    """
    clusters = UnionFind()
    for rank, root_rank in earlier.items():
        clusters.union(root_rank, rank)
    for result in results:
        for head_rank, rank in zip(result.head_ranks.tolist(), result.ranks.tolist()):
            clusters.union(head_rank, rank)
    return clusters.roots()
