"""Streaming readers of the Parquet files stages hand to each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq


def parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple]:
    """Rows of a (possibly large) Parquet file, streamed in batches."""
    for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=2048):
        yield from zip(*(batch.column(c).to_pylist() for c in columns))


def parquet_texts(path: Path, column: str = "text") -> Iterator[str]:
    yield from (t for (t,) in parquet_rows(path, [column]) if t)
