"""The DuckDB connection every set operation of the clean stage runs on."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb


def connect(database: Path, memory_limit: str, in_memory: bool = False) -> duckdb.DuckDBPyConnection:
    """A file-backed database (so tables, like intermediate results, spill to disk past the memory
    limit) with its temp directory beside it and one thread per core. It is scratch: closing it writes no checkpoint
    (a quarter of a second of a refresh spent saving tables that are deleted next). `in_memory`: the same without
    the database file (cheaper to open, for short jobs; past the limit it still spills beside it)."""
    con = duckdb.connect(":memory:" if in_memory else str(database))
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(str(database.parent / 'duckdb_tmp'))}")
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    return con


def literal(value: str | Path) -> str:
    """A SQL string literal, for the paths and settings that cannot be bound as parameters."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_source(paths: list[Path]) -> str:
    """A DuckDB table function reading Parquet files as one table, rows in list order."""
    return "read_parquet([" + ", ".join(literal(p) for p in paths) + "])"
