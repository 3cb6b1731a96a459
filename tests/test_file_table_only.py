"""A batch's per-file records read back whole, or only the files asked for (what a re-run batch looks up)."""

from __future__ import annotations

from dapt_core.ingest_batches import FileResult, read_file_table, write_file_table
from dapt_core.manifest import FileIngest, InputFile, QuarantineRecord


def test_only_the_records_of_the_uris_asked_for_in_table_order(tmp_path):
    inputs = [
        InputFile(uri=str(tmp_path / f"f{i}.txt"), source="notes", kind="domain", fingerprint=f"sha-{i}", bytes=i)
        for i in range(5)
    ]
    bad = QuarantineRecord(file=inputs[3].uri, source="notes", position="file", reason="empty", detail="no text")
    keys = [f"k{i}" for i in range(5)]
    results = [FileResult(int(i != 3), [bad] if i == 3 else [], reused=i == 2) for i in range(5)]
    files = [
        FileIngest(input=inp, docs=r.docs, quarantined=r.quarantined, cache_key=k, read=not r.reused)
        for inp, k, r in zip(inputs, keys, results)
    ]
    path = tmp_path / "files.parquet"
    write_file_table(inputs, keys, results, path)
    assert read_file_table(path) == files
    assert read_file_table(path, only={inputs[3].uri, inputs[1].uri, "/not/in/this/batch.txt"}) == [files[1], files[3]]
    assert read_file_table(path, only=set()) == []
