"""The DuckDB connection every set operation of the clean stage runs on."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb


def connect(scratch: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """An in-memory database with one thread per core that spills to `scratch`/duckdb_tmp past `memory_limit`: its
    tables as well as its operators (DuckDB's buffer manager evicts in-memory table blocks to the temp directory), so
    memory stays bounded whatever the corpus. No database file: a file-backed one wrote every scratch table to disk
    (0.4 s of a 100,000-document refresh) only to delete it."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(str(scratch / 'duckdb_tmp'))}")
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    return con


def literal(value: str | Path) -> str:
    """A SQL string literal, for the paths and settings that cannot be bound as parameters."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_source(paths: list[Path]) -> str:
    """A DuckDB table function reading Parquet files as one table, rows in list order."""
    return "read_parquet([" + ", ".join(literal(p) for p in paths) + "])"
