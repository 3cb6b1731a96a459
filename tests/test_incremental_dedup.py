"""A refresh runs the per-document pass (signatures included) on new shards only, dedups the new documents against
the stored signatures of the earlier ones and each other, and ends exactly where a full run on the union ends."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dapt_core.clean import clean_corpus, pipeline, shuffle
from dapt_core.clean.identity import document_uid
from dapt_core.clean.parts import StorePartCache
from dapt_core.clean.stats import new_documents
from dapt_core.config import CleanConfig
from dapt_core.hashing import sha256_file
from dapt_core.store import open_store
from tests.corpus import assert_same_clean_outputs, near_copy, prose, write_shard


def test_refresh_computes_new_shards_only_and_equals_a_full_run(tmp_path, signed_docs, monkeypatch):
    old_texts = [prose(100 * s + i, "domain") for s in range(3) for i in range(4)]
    old = [write_shard(tmp_path / f"old{s}.parquet", old_texts[4 * s : 4 * s + 4]) for s in range(3)]
    new_texts = [
        near_copy(old_texts[1], 1),
        near_copy(old_texts[6], 2),
        old_texts[9],
        prose(9001, "domain"),
        prose(9002, "domain"),
    ]
    new_texts.append(near_copy(new_texts[3], 3))  # a near duplicate of another new document
    new = [write_shard(tmp_path / "refresh0.parquet", new_texts)]  # sorts after old*: the old documents keep priority

    store = open_store(str(tmp_path / "store"))
    cache = lambda shards: StorePartCache(store, {s: sha256_file(s) for s in shards}, "code-v1")  # noqa: E731

    scattered: list[int] = []
    real_scatter = shuffle.scatter_shard
    monkeypatch.setattr(
        shuffle, "scatter_shard", lambda job: scattered.append(job.shard.first_seq) or real_scatter(job)
    )

    clean_corpus(old, [], [], CleanConfig(), tmp_path / "first", cache=cache(old))
    assert sum(signed_docs) == 12 and len(scattered) == 3
    signed_docs.clear()
    scattered.clear()
    refresh = clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "refresh", cache=cache(old + new))
    assert sum(signed_docs) == len(new_texts)  # signatures of the new documents only
    assert scattered == [12]  # the old shards' map output of the dedup shuffle is reused too
    report = new_documents(refresh.decisions_path, {"refresh0.txt"})
    assert (report.files, report.docs, report.near_duplicates_of_earlier, report.exact_duplicates_of_earlier) == (
        1,
        6,
        2,
        1,
    )

    rows = {(r["file"], r["position"]): r for r in pq.read_table(refresh.decisions_path).to_pylist()}
    old_uid = lambda s, i: document_uid("domain", "notes", f"old{s}.txt", f"line {i + 1}")  # noqa: E731
    assert rows["refresh0.txt", "line 1"]["reason"] == "near_duplicate" and rows["refresh0.txt", "line 1"][
        "duplicate_of"
    ] == old_uid(0, 1)
    assert rows["refresh0.txt", "line 2"]["duplicate_of"] == old_uid(1, 2)
    assert (rows["refresh0.txt", "line 3"]["reason"], rows["refresh0.txt", "line 3"]["duplicate_of"]) == (
        "exact_duplicate",
        old_uid(2, 1),
    )
    assert rows["refresh0.txt", "line 6"]["duplicate_of"] == document_uid("domain", "notes", "refresh0.txt", "line 4")

    signed_docs.clear()
    full = clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "full")  # no cache: everything from scratch
    assert sum(signed_docs) == 12 + len(new_texts)
    assert_same_clean_outputs(refresh, full)
    scattered.clear()
    ahead = clean_corpus(new + old, [], [], CleanConfig(), tmp_path / "ahead", cache=cache(old + new))
    assert sorted(scattered) == [0, 6, 10, 14]  # new documents ahead of the old: every old shard's rows moved
    assert ahead.kept_docs == full.kept_docs


def test_refresh_writes_the_kept_parts_of_new_shards_and_of_shards_whose_kept_documents_changed(tmp_path, monkeypatch):
    """The kept corpus is one part per shard, kept in the store: a refresh does not rewrite the earlier corpus. A new
    shard whose file sorts first outranks its copy of an earlier document, so that earlier shard's part is written
    again without it; the other earlier parts are reused, and the result is still the full run's."""
    old_texts = [prose(200 * s + i, "domain") for s in range(3) for i in range(3)]
    old = [write_shard(tmp_path / f"old{s}.parquet", old_texts[3 * s : 3 * s + 3]) for s in range(3)]
    new = [write_shard(tmp_path / "aaa.parquet", [old_texts[4], prose(9100, "domain")])]  # aaa.txt sorts before old1
    store = open_store(str(tmp_path / "store"))
    cache = lambda shards: StorePartCache(store, {s: sha256_file(s) for s in shards}, "code-v1")  # noqa: E731
    written: list[int] = []  # first seq of each shard whose kept part was written
    real_write = pipeline._write_kept_part
    monkeypatch.setattr(
        pipeline, "_write_kept_part", lambda con, part, *a: written.append(part.first_seq) or real_write(con, part, *a)
    )

    first = clean_corpus(old, [], [], CleanConfig(), tmp_path / "first", cache=cache(old))
    assert written == [0, 3, 6] and [pq.read_metadata(p.uri).num_rows for p in first.domain_parts] == [3, 3, 3]
    written.clear()
    read: list[str] = []  # stored files the clean stage fetched (downloaded, on S3) and hashed
    real_read = type(store).local_path
    monkeypatch.setattr(type(store), "local_path", lambda self, ref: read.append(ref.uri) or real_read(self, ref))
    refresh = clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "refresh", cache=cache(old + new))
    assert written == [3, 9]  # old1 lost its copy of aaa.txt's document; old0 and old2 are reused
    assert [pq.read_metadata(p.uri).num_rows for p in refresh.domain_parts] == [3, 2, 3, 2]
    reused = [first.domain_parts[0].uri, first.domain_parts[2].uri]
    assert [p.uri for p in refresh.domain_parts[::2]] == reused and not set(reused) & set(read)  # reused unread
    assert_same_clean_outputs(refresh, clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "full"))


def test_a_damaged_stored_part_is_computed_again(tmp_path, signed_docs):
    shard = write_shard(tmp_path / "a.parquet", [prose(i, "domain") for i in range(3)])
    store = open_store(str(tmp_path / "store"))
    cache = StorePartCache(store, {shard: sha256_file(shard)}, "code-v1")
    clean_corpus([shard], [], [], CleanConfig(), tmp_path / "one", cache=cache)
    [sigs] = (tmp_path / "store").rglob("signatures.parquet")
    sigs.write_bytes(b"damaged")
    signed_docs.clear()  # the first run's
    again = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "two", cache=cache)
    assert sum(signed_docs) == 3 and again.kept_docs == 3
    intact = sigs.read_bytes()
    sigs.write_bytes(intact[:100] + bytes([intact[100] ^ 1]) + intact[101:])  # the same size: only its sha256 tells
    signed_docs.clear()
    third = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "three", cache=cache)
    assert sum(signed_docs) == 3 and third.kept_docs == 3 and sigs.read_bytes() == intact  # stored anew


def test_a_stored_record_naming_objects_outside_its_own_place_is_not_followed(tmp_path, signed_docs):
    """A part record is data in a shared store: one that names other objects (here byte-identical copies outside the
    store) is ignored, and the parts are computed and stored again in their own place."""
    shard = write_shard(tmp_path / "a.parquet", [prose(i, "domain") for i in range(3)])
    store = open_store(str(tmp_path / "store"))
    cache = StorePartCache(store, {shard: sha256_file(shard)}, "code-v1")
    first = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "one", cache=cache)
    records = list((tmp_path / "store").rglob("parts.json"))
    for record in records:  # the per-document parts' record and the kept part's
        for name, ref in json.loads(record.read_text())["files"].items():
            copy = tmp_path / f"outside-{name}.parquet"
            copy.write_bytes(Path(ref["uri"]).read_bytes())
            record.write_text(record.read_text().replace(json.dumps(ref["uri"]), json.dumps(str(copy))))
    signed_docs.clear()
    again = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "two", cache=cache)
    assert sum(signed_docs) == 3  # the per-document pass ran again instead of reading the copies
    assert again.domain_parts == first.domain_parts  # the kept part is named in its own place
    assert not any("outside-" in record.read_text() for record in records)


def test_new_parts_are_kept_when_verifying_the_reused_ones_fails(tmp_path, signed_docs, monkeypatch):
    """The reused parts are verified while the new shards are computed; a store error there ends the stage, but the
    new shards' parts are stored first, so the retry computes nothing again."""
    old = write_shard(tmp_path / "old.parquet", [prose(i, "domain") for i in range(3)])
    new = write_shard(tmp_path / "new.parquet", [prose(50 + i, "domain") for i in range(2)])
    store = open_store(str(tmp_path / "store"))
    cache = lambda shards: StorePartCache(store, {s: sha256_file(s) for s in shards}, "code-v1")  # noqa: E731
    clean_corpus([old], [], [], CleanConfig(), tmp_path / "one", cache=cache([old]))

    def unreachable(self, files):
        raise OSError("the store went away")

    verified = StorePartCache.verified
    monkeypatch.setattr(StorePartCache, "verified", unreachable)
    signed_docs.clear()
    with pytest.raises(OSError, match="went away"):
        clean_corpus([old, new], [], [], CleanConfig(), tmp_path / "two", cache=cache([old, new]))
    assert sum(signed_docs) == 2  # the new shard was computed
    monkeypatch.setattr(StorePartCache, "verified", verified)
    signed_docs.clear()
    retry = clean_corpus([old, new], [], [], CleanConfig(), tmp_path / "three", cache=cache([old, new]))
    assert sum(signed_docs) == 0 and retry.kept_docs == 5


def test_a_new_document_bridging_two_earlier_clusters_merges_them_as_a_full_run_does(tmp_path, monkeypatch):
    """A refresh pairs and verifies only the LSH buckets of the new documents and takes the earlier clusters from the
    last run. A new text close to both A (cluster 0) and B (cluster 1), which are not close to each other, joins the
    two clusters in a full run: B, kept before, becomes a near duplicate of A. A cluster no new document comes near
    (C and its copy) is only in the last run's clusters. The refresh must end as the full run does."""
    text = (prose(1, "domain") + " " + prose(2, "general")).split()
    cut = len(text) // 11  # Jaccard of 5-word shingles: text~A 0.84, text~B 0.87, A~B 0.72 (threshold 0.8)
    a = " ".join(text[:-cut] + prose(801, "general").split()[:cut])
    b = " ".join(prose(802, "general").split()[:cut] + text[cut:])
    c = prose(3)
    old = [write_shard(tmp_path / "old0.parquet", [a, near_copy(a, 1), b, near_copy(b, 2), c, near_copy(c, 3)])]
    new = [write_shard(tmp_path / "refresh0.parquet", [" ".join(text)])]
    store = open_store(str(tmp_path / "store"))
    cache = lambda shards: StorePartCache(store, {s: sha256_file(s) for s in shards}, "code-v1")  # noqa: E731
    first = clean_corpus(old, [], [], CleanConfig(), tmp_path / "first", cache=cache(old))

    touched: list[int | None] = []  # buckets each reduce task paired: None for all of them
    real_reduce = shuffle.reduce_partition
    monkeypatch.setattr(
        shuffle,
        "reduce_partition",
        lambda job: touched.append(job.touched and pq.read_metadata(job.touched).num_rows) or real_reduce(job),
    )
    refresh = clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "refresh", cache=cache(old + new))
    assert touched == [CleanConfig().dedup.bands]  # the new document's buckets, one a band
    full = clean_corpus(old + new, [], [], CleanConfig(), tmp_path / "full")
    assert_same_clean_outputs(refresh, full)

    def old_rows(out):
        rows = pq.read_table(out.decisions_path).to_pylist()
        return {r["position"]: (r["status"], r["cluster_id"]) for r in rows if r["file"] == "old0.txt"}

    assert old_rows(first)["line 3"] == ("kept", 1)
    assert old_rows(refresh)["line 3"] == ("dropped", 0)
    assert old_rows(refresh)["line 6"] == ("dropped", 1)
