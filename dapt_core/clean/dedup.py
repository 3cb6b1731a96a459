"""Exact and MinHash-LSH near-duplicate detection in DuckDB, among the documents that passed the filters.

Reads the table `docs(seq, rank, text_hash, filter_reason, ...)` where `rank` is the priority of a
document (domain before general, then source, file, position in the file): of each group of
duplicates the lowest rank is kept. Creates the table `duplicates(seq, rank, reason, duplicate_of, representative)`,
one row per filter survivor: `reason` is 'exact_duplicate', 'near_duplicate' or NULL (kept);
`duplicate_of` is the seq it was matched to; `representative` is the seq of the kept document its
whole group collapsed onto (itself when nothing collapsed onto it).
"""

from __future__ import annotations

from collections.abc import Iterable

import duckdb
import pyarrow as pa

from dapt_core.clean.minhash import jaccard
from dapt_core.config import DedupConfig

_VERIFY_BATCH_ROWS = 65_536
_ROOTS = pa.schema([("rank", pa.int64()), ("root_rank", pa.int64())])


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


def find_duplicates(con: duckdb.DuckDBPyConnection, cfg: DedupConfig) -> None:
    """Create `duplicates`; the views `signatures` (seq, sig) and `bands` (seq, band, key) hold the
    filter survivors that have words (only read when cfg.near)."""
    first = "first_value(seq) OVER (PARTITION BY text_hash ORDER BY rank)" if cfg.exact else "seq"
    con.execute(f"CREATE TABLE exact AS SELECT seq, rank, {first} AS first_seq FROM docs WHERE filter_reason IS NULL")
    con.execute("CREATE TABLE near (seq BIGINT, root_seq BIGINT)")
    if cfg.near:
        roots = _near_duplicate_roots(con, cfg)
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


def _near_duplicate_roots(con: duckdb.DuckDBPyConnection, cfg: DedupConfig) -> dict[int, int]:
    """rank -> rank of its cluster's root, for exact-unique survivors with a verified near duplicate.

    Candidates come from LSH buckets (same key in some band). Each bucket member is paired with
    the bucket's best-ranked member only, so a bucket of k near-identical documents costs k pairs,
    not k^2; the union of those stars over all bands rebuilds the clusters. A pair counts only if
    its estimated Jaccard similarity reaches the threshold.
    """
    con.execute("""
        CREATE TABLE candidates AS
        WITH banded AS (
            SELECT b.band, b.key, b.seq, e.rank
            FROM bands b JOIN exact e ON e.seq = b.seq
            WHERE e.first_seq = e.seq),
        heads AS (
            SELECT band, key, arg_min(seq, rank) AS head, min(rank) AS head_rank
            FROM banded GROUP BY band, key HAVING count(*) > 1)
        SELECT DISTINCT h.head, h.head_rank, b.seq, b.rank
        FROM heads h JOIN banded b USING (band, key)
        WHERE b.seq <> h.head""")
    reader = con.sql("""
        SELECT c.head_rank, c.rank, hs.sig AS head_sig, ms.sig AS sig
        FROM candidates c
        JOIN signatures hs ON hs.seq = c.head
        JOIN signatures ms ON ms.seq = c.seq""").to_arrow_reader(_VERIFY_BATCH_ROWS)
    clusters = UnionFind()
    for head_rank, rank in _verified_pairs(reader, cfg):
        clusters.union(head_rank, rank)
    return clusters.roots()


def _verified_pairs(batches: Iterable[pa.RecordBatch], cfg: DedupConfig) -> Iterable[tuple[int, int]]:
    for batch in batches:
        head_sig = batch.column("head_sig").flatten().to_numpy().reshape(-1, cfg.num_perm)
        sig = batch.column("sig").flatten().to_numpy().reshape(-1, cfg.num_perm)
        similar = jaccard(head_sig, sig) >= cfg.jaccard_threshold
        heads = batch.column("head_rank").to_numpy()[similar]
        members = batch.column("rank").to_numpy()[similar]
        yield from zip(heads.tolist(), members.tolist())
