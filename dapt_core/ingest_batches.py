"""Ingest in batches: many input files per task and per Parquet shard, with per-file lineage and reuse.

One task and one shard per file costs ~17 ms of orchestration per file, which a corpus of a million small notes
cannot afford. `plan_batches` groups a source's files into batches of about `ingest.batch_bytes`, with boundaries
chosen by each file's own uri and size (content-defined, like chunking in backup tools): adding, removing or changing
one file changes its own batch only, so only that batch's cache key changes. Inside a recomputed batch, a file whose
rows an earlier batch already holds (same uri, content, settings and code: the same per-file cache key) is copied from
that shard instead of being read again (`ingest_batch`), so a new or changed file is the only one parsed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from dapt_core import ingest, leftovers
from dapt_core.config import IngestConfig
from dapt_core.ingest import INGEST_SCHEMA, Document
from dapt_core.input_files import INPUT_FIELDS, InputFiles
from dapt_core.manifest import (
    ArtifactRef,
    FileIngest,
    IngestBatchManifest,
    IngestManifest,
    InputFile,
    QuarantineRecord,
)
from dapt_core.store import ArtifactStore, open_store

_ROW_GROUP_BYTES = 64 << 20
FILES_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("uri", "source", "kind", "text_field", "fingerprint", "cache_key")]
    + [("bytes", pa.int64()), ("docs", pa.int64()), ("read", pa.bool_()), ("quarantined", pa.string())]
)


def plan_batches(
    inputs: InputFiles, target_bytes: int, target_files: int, ends: Collection[str] = ()
) -> list[InputFiles]:
    """Consecutive runs of `inputs` (in order) that share a kind and source, of about `target_bytes` or
    `target_files`, whichever comes first: a batch ends after a file with probability
    max(its bytes / target_bytes, 1 / target_files), decided by a hash of its uri, so each boundary depends on that
    file alone and a new file in the middle of a source changes one batch. 4 x target_files is a hard limit.

    A batch also ends after each uri in `ends`: the last files of the last run's batches. A source's last batch has
    no boundary after it, so files added after it (a new folder, a later date: a nightly drop) would join it, and it
    would be read and cleaned again; so they start a batch of their own."""
    ends = frozenset(ends)
    cuts = [0]  # where each batch starts, and where the last ends
    groups = zip(inputs.kind, inputs.source)
    for i, (uri, size, group) in enumerate(zip(inputs.uri, inputs.bytes, groups)):
        if i > cuts[-1] and group != (inputs.kind[cuts[-1]], inputs.source[cuts[-1]]):
            cuts.append(i)
        draw = xxhash.xxh64_intdigest(uri.encode("utf-8", "surrogatepass")) / 2.0**64
        if draw < max(size / target_bytes, 1 / target_files) or i + 1 - cuts[-1] >= 4 * target_files or uri in ends:
            cuts.append(i + 1)
    if cuts[-1] < len(inputs):
        cuts.append(len(inputs))
    return [inputs[start:end] for start, end in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class BatchJob:
    """One ingest batch as a self-contained piece of work for any worker: it reads its inputs and writes its shard
    and its per-file records to the artifact store at `shard_key` and `files_key`. `earlier`: the batches of the last
    run, whose files it may copy."""

    inputs: list[InputFile]
    keys: list[str]
    cfg: IngestConfig
    store_uri: str
    shard_key: str
    files_key: str
    earlier: list[IngestBatchManifest]


@dataclass(frozen=True)
class BatchOutput:
    """What a batch's manifest needs: its shard (None when no file had a document), its per-file records, and their
    totals (the records themselves stay in the store: a worker sends back no object per file)."""

    shard: ArtifactRef | None
    files: ArtifactRef
    docs: int
    quarantined: list[QuarantineRecord]


def run_batch(job: BatchJob) -> BatchOutput:
    """Ingest a batch and put its shard and per-file records in the store."""
    store = open_store(job.store_uri)
    with leftovers.temp_dir("ingest") as tmp:
        out = Path(tmp) / "docs.parquet"
        earlier = earlier_files(store, job.earlier, {inp.uri for inp in job.inputs})
        found = ingest_batch(job.inputs, job.keys, job.cfg, out, earlier)
        docs = sum(r.docs for r in found)
        shard = store.put_file(out, job.shard_key) if docs else None
        table = Path(tmp) / "files.parquet"
        write_file_table(job.inputs, job.keys, found, table)
        files = store.put_file(table, job.files_key)
    return BatchOutput(shard, files, docs, [q for r in found for q in r.quarantined])


def earlier_files(store: ArtifactStore, earlier: list[IngestBatchManifest], uris: set[str]) -> dict[str, EarlierFile]:
    """The earlier per-file records of `uris` whose shard is still intact, by uri (a file whose shard is gone is read
    again). Only the batches whose uri range holds one of `uris` have their table read, and only those holding one
    have their shard checked: a batch re-run for new files reads a table or two, not one per batch of the corpus."""
    wanted_uris = sorted(uris)
    found: dict[str, EarlierFile] = {}
    for batch in earlier:
        if not _may_hold(batch, wanted_uris) or store.check(batch.files):
            continue
        wanted = [f for f in read_file_table(store.local_path(batch.files), only=uris) if f.cache_key]
        if not wanted or (batch.shard is not None and store.check(batch.shard)):
            continue
        shard = store.local_path(batch.shard) if batch.shard is not None else None
        for f in wanted:
            found[f.input.uri] = EarlierFile(f.cache_key, f.docs, f.quarantined, shard if f.docs else None)
    return found


def _may_hold(batch: IngestBatchManifest, sorted_uris: list[str]) -> bool:
    """Whether one of `sorted_uris` lies in the batch's uri range (always, for a manifest without one)."""
    if batch.first_uri is None or batch.last_uri is None:
        return True
    i = bisect.bisect_left(sorted_uris, batch.first_uri)
    return i < len(sorted_uris) and sorted_uris[i] <= batch.last_uri


def write_file_table(inputs: list[InputFile], keys: list[str], results: list[FileResult], path: Path) -> None:
    """The per-file records of a batch (one per input, with its per-file cache key and what its ingest found) as
    Parquet (FILES_SCHEMA; quarantine records as JSON). Written from columns: a FileIngest per file cost ~2 us."""
    columns = dict(zip(INPUT_FIELDS, InputFiles.of(inputs).columns()))
    columns |= {
        "cache_key": keys,
        "docs": [r.docs for r in results],
        "read": [not r.reused for r in results],
        "quarantined": [_quarantine_json(r.quarantined) for r in results],
    }
    pq.write_table(pa.table(columns, schema=FILES_SCHEMA), path, compression="zstd")


def _quarantine_json(records: list[QuarantineRecord]) -> str:
    return json.dumps([q.model_dump() for q in records]) if records else "[]"


def read_file_table(path: Path, only: set[str] | None = None) -> list[FileIngest]:
    """A batch's per-file records; with `only`, those of these uris, the others never built (a batch re-run for new
    files looks for its files in every earlier batch's table: building all records made that grow with the corpus)."""
    table = pq.read_table(path, schema=FILES_SCHEMA)
    if only is not None:
        table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(sorted(only), pa.string())))
    return [
        FileIngest(
            input=InputFile(**{k: row[k] for k in INPUT_FIELDS}),
            docs=row["docs"],
            quarantined=[QuarantineRecord(**q) for q in json.loads(row["quarantined"])],
            cache_key=row["cache_key"],
            read=row["read"],
        )
        for row in table.to_pylist()
    ]


def read_uris(path: Path) -> set[str]:
    """The uris of a batch's files that its run read (the others were copied from an earlier shard): two columns of
    its per-file records, no record built."""
    table = pq.read_table(path, columns=["uri", "read"], schema=FILES_SCHEMA)
    return set(table.filter(table.column("read")).column("uri").to_pylist())


def file_records(store: ArtifactStore, batches: list[IngestBatchManifest]) -> list[IngestManifest]:
    """The lineage of each file of `batches`, in order, as later stages read it (the files of a batch share its
    shard)."""
    return [
        IngestManifest(
            input=f.input,
            shard=batch.shard if f.docs else None,
            docs=f.docs,
            quarantined=f.quarantined,
            code_version=batch.code_version,
            cache_key=f.cache_key,
        )
        for batch in batches
        for f in read_file_table(store.local_path(batch.files))
    ]


@dataclass(frozen=True)
class EarlierFile:
    """What an earlier batch recorded of one file: its per-file cache key, counts and quarantine records, and the
    shard holding its rows (a local copy; None when it had no documents)."""

    cache_key: str
    docs: int
    quarantined: list[QuarantineRecord]
    shard: Path | None


@dataclass(frozen=True)
class FileResult:
    docs: int
    quarantined: list[QuarantineRecord]
    reused: bool
    """True when the rows were copied from an earlier batch's shard rather than read from the file."""


def ingest_batch(
    inputs: list[InputFile], keys: list[str], cfg: IngestConfig, out_path: Path, earlier: dict[str, EarlierFile]
) -> list[FileResult]:
    """Ingest a batch into one Parquet at `out_path`, one result per file in order. A file whose `earlier[uri]` has
    its per-file cache key (`keys`, one per input) is copied from that record; any other file is read."""
    shards = _EarlierShards()
    results = []
    with ShardWriter(out_path, cfg.shard_docs) as shard:
        for inp, key in zip(inputs, keys):
            before = earlier.get(inp.uri)
            rows = shards.rows(before, inp.uri) if before and before.cache_key == key else None
            if rows is not None and before is not None:
                shard.add_rows(rows)
                results.append(FileResult(before.docs, before.quarantined, reused=True))
            else:
                docs, quarantined = ingest.ingest_file(inp, cfg, shard)
                results.append(FileResult(docs, quarantined, reused=False))
    return results


class _EarlierShards:
    """Earlier shards, each read once, and where each file's (contiguous) rows are in it."""

    def __init__(self) -> None:
        self._tables: dict[Path, tuple[pa.Table, dict[str, tuple[int, int]]] | None] = {}

    def rows(self, earlier: EarlierFile, uri: str) -> pa.Table | None:
        """The file's rows (an empty table for a file without documents), or None when they cannot be had intact."""
        if earlier.docs == 0:
            return INGEST_SCHEMA.empty_table()
        if earlier.shard is None:
            return None
        if earlier.shard not in self._tables:
            self._tables[earlier.shard] = _read_spans(earlier.shard)
        read = self._tables[earlier.shard]
        if read is None or uri not in read[1]:
            return None
        start, length = read[1][uri]
        return read[0].slice(start, length) if length == earlier.docs else None


def _read_spans(path: Path) -> tuple[pa.Table, dict[str, tuple[int, int]]] | None:
    try:
        table = pq.read_table(path, schema=INGEST_SCHEMA)
    except (OSError, pa.ArrowInvalid):
        return None  # a damaged or deleted earlier shard: its files are read again
    spans: dict[str, tuple[int, int]] = {}
    for i, file in enumerate(table.column("file").to_pylist()):
        start, length = spans.get(file, (i, 0))
        spans[file] = (start, length + 1)
    return table, spans


class ShardWriter:
    """One Parquet of documents (INGEST_SCHEMA) for any number of input files: rows are buffered across files and
    written in row groups of at most `row_group_docs` documents and ~64 MiB, so a batch of many small files makes a
    few large row groups (cheap to read), and a file of large documents still streams."""

    def __init__(self, path: Path, row_group_docs: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, INGEST_SCHEMA, compression="zstd")
        self._row_group_docs = row_group_docs
        self._docs: list[tuple[Document, InputFile, str]] = []  # newest rows, not yet a table
        self._tables: list[pa.Table] = []  # older rows, in order
        self._rows = self._bytes = 0

    def add(self, doc: Document, inp: InputFile, fmt: str) -> None:
        self._docs.append((doc, inp, fmt))
        self._grew(1, len(doc.text))

    def add_rows(self, table: pa.Table) -> None:
        """Rows another shard already holds (INGEST_SCHEMA), e.g. a file reused from an earlier batch."""
        self._seal_docs()
        self._tables.append(table)
        self._grew(table.num_rows, table.column("text").nbytes)

    def _grew(self, rows: int, nbytes: int) -> None:
        self._rows += rows
        self._bytes += nbytes
        if self._rows >= self._row_group_docs or self._bytes >= _ROW_GROUP_BYTES:
            self.flush()

    def _seal_docs(self) -> None:
        if self._docs:
            self._tables.append(_table(self._docs))
            self._docs = []

    def flush(self) -> None:
        self._seal_docs()
        if self._rows:
            self._writer.write_table(pa.concat_tables(self._tables), row_group_size=self._row_group_docs)
        self._tables, self._rows, self._bytes = [], 0, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self._writer.close()


def ingest_files(
    inputs: list[InputFile], cfg: IngestConfig, out_path: Path
) -> list[tuple[int, list[QuarantineRecord]]]:
    """Read input files into one Parquet at `out_path` (written, with the schema, even with no documents):
    (documents written, quarantine records) per file, in order."""
    with ShardWriter(out_path, cfg.shard_docs) as shard:
        return [ingest.ingest_file(inp, cfg, shard) for inp in inputs]


def _doc_id(text: str) -> str:
    """Stable content hash of a document's text: the same text gets the same id in every run and on every machine."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _table(rows: list[tuple[Document, InputFile, str]]) -> pa.Table:
    """One row group of documents with their lineage."""
    columns = {
        "doc_id": [_doc_id(d.text) for d, _, _ in rows],
        "text": [d.text for d, _, _ in rows],
        "source": [inp.source for _, inp, _ in rows],
        "kind": [inp.kind for _, inp, _ in rows],
        "file": [inp.uri for _, inp, _ in rows],
        "position": [d.position for d, _, _ in rows],
        "format": [fmt for _, _, fmt in rows],
    }
    return pa.table(columns, schema=INGEST_SCHEMA)
