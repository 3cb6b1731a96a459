"""Discovery reuses a file's sha256 while its size, mtime and inode are unchanged (dapt_core/fingerprints.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dapt.flows.prepare import prepare_flow
from dapt_core import discovery
from dapt_core.config import SourceConfig, load_config
from dapt_core.fingerprints import RACY_NS, FingerprintMemo
from dapt_core.hashing import sha256_file
from dapt_core.store import open_store
from tests.corpus import prose, write_config, write_corpus


def _age(path: Path, seconds: float = 60) -> None:
    """Set the file's mtime in the past, as a file written before the last run would have."""
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


def _discover(root: Path, memo: FingerprintMemo | None) -> dict[str, str]:
    inputs, _ = discovery.discover_inputs(SourceConfig(name="s", paths=[str(root)]), "domain", memo)
    return {Path(i.uri).name: i.fingerprint for i in inputs}


def _stored(memo: FingerprintMemo) -> FingerprintMemo:
    """The memo as the next run reads it back from the store."""
    return FingerprintMemo.from_parquet(memo.to_parquet())


def test_unchanged_files_are_not_rehashed_and_changed_ones_are(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_text(f"text of {name}")
        _age(root / name)
    first = FingerprintMemo()
    assert _discover(root, first) == {p.name: sha256_file(p) for p in root.iterdir()}
    assert first.hashed == 3

    (root / "b.txt").write_text("b was rewritten")  # new size and mtime
    (root / "d.txt").write_text("a new file")
    second = _stored(first)
    found = _discover(root, second)
    assert second.hashed == 2  # b and d; a and c kept their recorded fingerprints
    assert found == {p.name: sha256_file(p) for p in root.iterdir()}

    # Same size, mtime moved: hashed again, so a same-length edit is seen.
    (root / "c.txt").write_text("text of C.txt")
    _age(root / "c.txt", seconds=30)
    third = _stored(second)
    assert _discover(root, third)["c.txt"] == sha256_file(root / "c.txt")
    assert third.hashed == 3  # c, and b and d: written less than RACY_NS before they were hashed


def test_a_file_hashed_right_after_it_was_written_is_hashed_again(tmp_path):
    """Racily clean: another write within the same mtime tick would leave size and mtime unchanged."""
    root = tmp_path / "corpus"
    root.mkdir()
    note = root / "note.txt"
    note.write_text("first")
    first = FingerprintMemo()
    _discover(root, first)
    stamp = first.stamp(str(note))
    assert stamp.hashed_ns - stamp.mtime_ns < RACY_NS
    note.write_text("again")  # same size; on a coarse-mtime filesystem, possibly the same mtime
    os.utime(note, ns=(stamp.mtime_ns, stamp.mtime_ns))
    second = _stored(first)
    assert _discover(root, second)["note.txt"] == sha256_file(note)
    assert second.hashed == 1


def test_an_unreadable_memo_is_an_empty_one(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("text")
    memo = FingerprintMemo.from_parquet(b"not parquet")
    assert _discover(root, memo) == {"a.txt": sha256_file(root / "a.txt")}
    assert memo.hashed == 1


def test_prepare_hashes_only_new_files_unless_told_to_rehash(prefect_harness, tmp_path, monkeypatch):
    dirs = write_corpus(tmp_path)
    inputs = [p for d in dirs.values() for p in d.rglob("*") if p.is_file()]
    for path in inputs:
        _age(path)  # written before the last run, not racily clean
    hashed: list[str] = []
    real_sha256 = discovery.sha256_file
    monkeypatch.setattr(discovery, "sha256_file", lambda path: hashed.append(str(path)) or real_sha256(path))
    cfg = load_config(write_config(tmp_path, dirs))
    first = prepare_flow(cfg)
    assert {str(p) for p in inputs} <= set(hashed)

    hashed.clear()
    new_file = dirs["domain"] / "new.txt"
    new_file.write_text(prose(31337, "domain"))
    second = prepare_flow(cfg)
    assert hashed == [str(new_file)]
    assert second.clean.input_docs == first.clean.input_docs + 1

    hashed.clear()
    always = load_config(write_config(tmp_path, dirs, extra="prepare: {rehash_inputs: true}\n"))
    third = prepare_flow(always)
    assert set(hashed) == {str(p) for p in [*inputs, new_file]}
    assert third.clean == second.clean


def test_the_memo_is_stored_on_another_thread_and_a_failure_is_only_a_warning(tmp_path, caplog):
    from dapt.tasks.ingest import _store_in_background

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("alpha")
    memo = FingerprintMemo()
    _discover(root, memo)
    store = open_store(str(tmp_path / "store"))
    _store_in_background(store, memo, "memo.parquet").join()
    stored = pq.read_table(pa.BufferReader(store.read_key("memo.parquet"))).to_pylist()
    assert [(r["uri"], r["fingerprint"]) for r in stored] == [(str(root / "a.txt"), sha256_file(root / "a.txt"))]

    class Unwritable:
        def put_bytes(self, data: bytes, key: str) -> None:
            raise OSError("read-only file system")

    _store_in_background(Unwritable(), memo, "memo.parquet").join()
    assert "read-only file system" in caplog.text and "the next run hashes every input" in caplog.text


def test_a_discovery_waits_for_the_memo_the_one_before_is_still_storing(tmp_path, monkeypatch):
    """nightly-refresh discovers, then its prepare discovers again at once: the second reads the first one's memo
    (it waits for the write) instead of hashing every file the first just hashed."""
    from dapt.tasks.ingest import discover_task
    from dapt_core.config import DataConfig

    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.txt", "b.txt"):
        (root / name).write_text(prose(len(name) + ord(name[0])))
        _age(root / name)
    data = DataConfig(domain=[SourceConfig(name="s", paths=[str(root)])])
    real_to_parquet = FingerprintMemo.to_parquet
    monkeypatch.setattr(FingerprintMemo, "to_parquet", lambda self: time.sleep(0.5) or real_to_parquet(self))
    hashed: list[str] = []
    real_sha256 = discovery.sha256_file
    monkeypatch.setattr(discovery, "sha256_file", lambda path: hashed.append(str(path)) or real_sha256(path))
    store = str(tmp_path / "store")
    discover_task.fn(data, store, "memo.parquet")
    assert len(hashed) == 2
    hashed.clear()
    inputs, _, _ = discover_task.fn(data, store, "memo.parquet")  # starts while the first memo is being stored
    assert hashed == [] and len(inputs) == 2
