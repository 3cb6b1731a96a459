"""Exact and near dedup as a partitioned shuffle on the engine: any number of partitions gives the decisions one
partition gives, the map and reduce tasks run through `Engine.map`, and the scattered files are indexed by partition."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from dapt_core.clean import clean_corpus, shuffle
from dapt_core.clean.identity import document_uid
from dapt_core.config import CleanConfig, DedupConfig
from dapt_core.engine import LocalEngine
from tests.corpus import assert_same_clean_outputs, near_copy, prose, write_shard


class RecordingEngine(LocalEngine):
    """The local engine, counting the items each function was mapped over."""

    def __init__(self) -> None:
        self.items: Counter[str] = Counter()

    def map(self, fn, items):
        self.items[fn.__name__] += len(items)
        return super().map(fn, items)


def _corpus(tmp_path) -> list:
    """Six shards; exact and near copies of documents of other shards (also general copies of domain text, and a
    chain of near copies), so groups and buckets span shards and partitions."""
    texts = {s: [prose(10 * s + i) for i in range(4)] for s in range(6)}
    texts[2][0] = texts[0][1]  # exact copy, later shard
    texts[3][1] = near_copy(texts[1][2], 1)  # near copy of another shard's document
    texts[4][2] = near_copy(texts[3][1], 2)  # a near copy of that near copy
    texts[5][0] = texts[4][3]  # exact copy in a general shard: the domain original is kept
    texts[5][1] = near_copy(texts[0][3], 3)
    kinds = ["domain"] * 5 + ["general"]
    return [write_shard(tmp_path / f"shard{s}.parquet", texts[s], kinds[s], kinds[s]) for s in range(6)]


def _run(tmp_path, monkeypatch, shards, cfg: CleanConfig, partitions: int):
    monkeypatch.setattr(shuffle, "partition_count", lambda n, slots: partitions)
    engine = RecordingEngine()
    out = clean_corpus(shards, [], [], cfg, tmp_path / f"p{partitions}", engine)
    return out, engine.items


@pytest.mark.parametrize(
    "dedup",
    [DedupConfig(), DedupConfig(exact=False), DedupConfig(near=False)],
    ids=["exact+near", "near only", "exact only"],
)
def test_any_partition_count_gives_the_decisions_of_one_partition(tmp_path, monkeypatch, dedup):
    shards = _corpus(tmp_path)
    cfg = CleanConfig(dedup=dedup)
    one, one_tasks = _run(tmp_path, monkeypatch, shards, cfg, partitions=1)
    many, many_tasks = _run(tmp_path, monkeypatch, shards, cfg, partitions=5)
    assert_same_clean_outputs(one, many)
    assert one_tasks == {"prepare_shard": 6, "scatter_shard": 6, "reduce_partition": 1}
    assert many_tasks == {"prepare_shard": 6, "scatter_shard": 6, "reduce_partition": 5}

    rows = {(r["file"], r["position"]): r for r in pq.read_table(many.decisions_path).to_pylist()}
    uid = lambda s, kind, i: document_uid(kind, kind, f"shard{s}.txt", f"line {i + 1}")  # noqa: E731
    found = {k: (r["reason"], r["duplicate_of"]) for k, r in rows.items() if r["status"] == "dropped"}
    expected = {}
    if dedup.exact:
        expected |= {
            ("shard2.txt", "line 1"): ("exact_duplicate", uid(0, "domain", 1)),
            ("shard5.txt", "line 1"): ("exact_duplicate", uid(4, "domain", 3)),
        }
    elif dedup.near:  # without exact dedup an exact copy is a near duplicate (Jaccard 1) of its original
        expected |= {
            ("shard2.txt", "line 1"): ("near_duplicate", uid(0, "domain", 1)),
            ("shard5.txt", "line 1"): ("near_duplicate", uid(4, "domain", 3)),
        }
    if dedup.near:  # a chain collapses onto its best-ranked document
        expected |= {
            ("shard3.txt", "line 2"): ("near_duplicate", uid(1, "domain", 2)),
            ("shard4.txt", "line 3"): ("near_duplicate", uid(1, "domain", 2)),
            ("shard5.txt", "line 2"): ("near_duplicate", uid(0, "domain", 3)),
        }
    assert found == expected


def test_scattered_files_hold_one_row_group_per_partition(tmp_path, monkeypatch):
    """A reduce task reads its partition by row-group statistics: every row group holds exactly one partition."""
    shard = write_shard(tmp_path / "a.parquet", [prose(i) for i in range(30)], "domain")
    monkeypatch.setattr(shuffle, "partition_count", lambda n, slots: 4)
    layouts = {}
    scatter = shuffle.scatter_shard

    def scatter_and_look(job):
        scatter(job)
        for path in (job.exact_out, job.bands_out):
            meta = pq.ParquetFile(path).metadata
            stats = [meta.row_group(g).column(0).statistics for g in range(meta.num_row_groups)]
            layouts[path.name] = (meta.num_rows, [(s.min, s.max) for s in stats])

    monkeypatch.setattr(shuffle, "scatter_shard", scatter_and_look)
    clean_corpus([shard], [], [], CleanConfig(), tmp_path / "work")
    rows, groups = layouts["000000.exact.parquet"]
    assert rows == 30 and groups == [(p, p) for p in range(4)]
    rows, groups = layouts["000000.bands.parquet"]
    assert rows == 30 * DedupConfig().bands and groups == [(p, p) for p in range(4)]


def test_the_local_engine_runs_at_most_one_item_per_core_across_threads(monkeypatch):
    """Prefect runs each task in its own thread; CPU-bound items beyond the cores only slow each other down."""
    import threading
    import time

    import dapt_core.engine as engine

    monkeypatch.setattr(engine, "_CORES", threading.BoundedSemaphore(2))
    running, most = [0], [0]
    lock = threading.Lock()

    def item(_: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    threads = [threading.Thread(target=LocalEngine().map, args=(item, range(3))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2
