"""Streaming readers of the Parquet files stages hand to each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq


def parquet_rows(paths: list[Path], columns: list[str]) -> Iterator[tuple]:
    """Rows of (possibly large) Parquet files, one after another (the parts of a kept corpus), streamed in batches."""
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=2048):
            yield from zip(*(batch.column(c).to_pylist() for c in columns))


def parquet_texts(paths: list[Path], column: str = "text") -> Iterator[str]:
    yield from (t for (t,) in parquet_rows(paths, [column]) if t)
