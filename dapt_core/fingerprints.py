"""Reuse an input file's sha256 when its size, mtime and inode are those it had when it was last hashed.

Discovery fingerprints every input file on every run, so a refresh would read the whole corpus to find the few new
files. Like rsync's quick check and make, this trusts the modification time: a file rewritten with the same size
within one mtime tick, or whose mtime was set back, keeps its old fingerprint (`prepare.rehash_inputs: true` hashes
every file on every run). A file modified less than RACY_NS before it was hashed is never trusted (git's "racily
clean" rule: a later write in the same tick would leave size and mtime as they were).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

RACY_NS = 2_000_000_000  # coarser than any filesystem's mtime resolution (FAT: 2 s)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("fingerprint", pa.string()),
        ("hashed_ns", pa.int64()),
    ]
)


class Stamp(NamedTuple):
    """What a file looked like when it was hashed, and when that was."""

    bytes: int
    mtime_ns: int
    inode: int
    fingerprint: str
    hashed_ns: int


class FingerprintMemo:
    """The fingerprints of the last discovery, kept as the Arrow table it was stored as, and this discovery's: the
    rows it reused plus the files it hashed. A refresh walks every file of the corpus, so a reused file costs one
    dict lookup and no Python object, and the next memo is the reused rows taken from the table plus the new ones."""

    def __init__(self, known: pa.Table | None = None) -> None:
        self._known = known if known is not None else SCHEMA.empty_table()
        columns = self._known.to_pydict()
        self._row = {uri: row for row, uri in enumerate(columns["uri"])}
        self._stamps = list(zip(*(columns[f] for f in Stamp._fields)))
        self._reused: dict[str, int] = {}
        self._hashed: dict[str, Stamp] = {}

    @classmethod
    def from_parquet(cls, data: bytes) -> FingerprintMemo:
        """The memo a previous run stored; an empty one when `data` is not a readable memo (it only saves time)."""
        try:
            return cls(pq.read_table(pa.BufferReader(data), schema=SCHEMA))
        except (pa.ArrowException, OSError, ValueError):
            return cls()

    def to_parquet(self) -> bytes:
        """This discovery's fingerprints, every file it saw (reused or hashed)."""
        reused = self._known.take(pa.array(list(self._reused.values()), pa.int64()))
        hashed = zip(*self._hashed.values()) if self._hashed else ([] for _ in Stamp._fields)
        fresh = pa.table({"uri": list(self._hashed), **dict(zip(Stamp._fields, hashed))}, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        # Every uri and fingerprint is distinct: a dictionary page is built only to be dropped (3x the write time).
        pq.write_table(pa.concat_tables([reused, fresh]), sink, use_dictionary=False, compression="zstd")
        return sink.getvalue().to_pybytes()

    @property
    def hashed(self) -> int:
        """How many files this discovery hashed."""
        return len(self._hashed)

    @property
    def changed(self) -> bool:
        """Whether this discovery hashed a file or missed one the last saw: else the stored memo is still right."""
        return bool(self._hashed) or len(self._reused) != self._known.num_rows

    def stamp(self, uri: str) -> Stamp | None:
        """What this discovery recorded for `uri`."""
        row = self._reused.get(uri)
        return Stamp(*self._stamps[row]) if row is not None else self._hashed.get(uri)

    def fingerprint(self, uri: str, st: os.stat_result, compute: Callable[[], str]) -> str:
        """The recorded fingerprint when size, mtime and inode match and the file was not racily clean when hashed;
        else `compute()`."""
        row = self._row.get(uri)
        if row is not None:
            size, mtime_ns, inode, fingerprint, hashed_ns = self._stamps[row]
            if (
                size == st.st_size
                and mtime_ns == st.st_mtime_ns
                and inode == st.st_ino
                and hashed_ns - mtime_ns >= RACY_NS
            ):
                self._reused[uri] = row
                return fingerprint
        hashed_ns = time.time_ns()  # before reading: a write during the read leaves an mtime after it
        fingerprint = compute()
        self._hashed[uri] = Stamp(st.st_size, st.st_mtime_ns, st.st_ino, fingerprint, hashed_ns)
        return fingerprint
