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
    """The fingerprints of the last discovery (`known`) and of this one (`seen`, what to store for the next)."""

    def __init__(self, known: dict[str, Stamp] | None = None) -> None:
        self.known = known or {}
        self.seen: dict[str, Stamp] = {}
        self.hashed = 0

    @classmethod
    def from_parquet(cls, data: bytes) -> FingerprintMemo:
        """The memo a previous run stored; an empty one when `data` is not a readable memo (it only saves time)."""
        try:
            columns = pq.read_table(pa.BufferReader(data), schema=SCHEMA).to_pydict()
        except (pa.ArrowException, OSError, ValueError):
            return cls()
        return cls(dict(zip(columns["uri"], map(Stamp._make, zip(*(columns[f] for f in Stamp._fields))))))

    def to_parquet(self) -> bytes:
        """This discovery's fingerprints, every file it saw (reused or hashed)."""
        stamps = zip(*self.seen.values()) if self.seen else ([] for _ in Stamp._fields)
        columns = {"uri": list(self.seen), **dict(zip(Stamp._fields, stamps))}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns, schema=SCHEMA), sink)
        return sink.getvalue().to_pybytes()

    @property
    def changed(self) -> bool:
        """Whether this discovery hashed a file or missed one the last saw: else the stored memo is still right."""
        return self.hashed > 0 or self.seen.keys() != self.known.keys()

    def fingerprint(self, uri: str, st: os.stat_result, compute: Callable[[], str]) -> str:
        """The recorded fingerprint when size, mtime and inode match and the file was not racily clean when hashed;
        else `compute()`."""
        known = self.known.get(uri)
        if (
            known is not None
            and (known.bytes, known.mtime_ns, known.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
            and known.hashed_ns - known.mtime_ns >= RACY_NS
        ):
            self.seen[uri] = known
            return known.fingerprint
        hashed_ns = time.time_ns()  # before reading: a write during the read leaves an mtime after it
        fingerprint = compute()
        self.hashed += 1
        self.seen[uri] = Stamp(st.st_size, st.st_mtime_ns, st.st_ino, fingerprint, hashed_ns)
        return fingerprint
