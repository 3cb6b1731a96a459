"""Ingest: raw input files (local or S3) -> one Parquet of documents per file, plus a quarantine of what could not be
read.

Datatrove style: `discovery.discover_inputs` expands a source's paths into fingerprinted input files, one small reader
per format turns a file into `Document`s, and `ingest_file` writes them. Every input unit (a file, a JSON line, an array
item, a Parquet row) ends up either as a document or as a `QuarantineRecord` saying where and why: bad input is
accounted for, never silently dropped and never an exception that stops the run.

Positions follow the convention of the tool one would use to look the unit up: lines and pages count from 1 (editors,
`sed -n 12p`, PDF viewers), Parquet rows and JSON array items from 0 (pyarrow, `jq '.[7]'`), bytes are offsets from 0.

Memory does not grow with file size: JSONL is read in binary chunks and a line over `max_doc_bytes` is skipped without
being held, Parquet is read in batches. Whole-file documents (text, html, pdf) are bounded by `max_doc_bytes`; a .json
array is the one exception and is loaded whole.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from dapt_core import ingest_s3, leftovers
from dapt_core.config import IngestConfig
from dapt_core.faults import StoreError
from dapt_core.hashing import sha256_file
from dapt_core.manifest import InputFile, Kind, QuarantineRecord

if TYPE_CHECKING:
    from dapt_core.ingest_batches import ShardWriter

_CHUNK = 1 << 20
_SNIFF_BYTES = 8192
_READ_ON = 1 << 16

_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
_TEXTUAL = {"text", "jsonl", "json", "html"}  # formats where NUL bytes mean the file is not what its name says

INGEST_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("doc_id", "text", "source", "kind", "file", "position", "format")]
)


@dataclass(frozen=True)
class Document:
    """One document read from an input file; the file's own lineage (uri, source, kind) is added by the writer."""

    text: str
    position: str  # lineage inside the file: "file", "line 12", "row 7", "byte 4096", "page 1-3"


def file_format(name: str) -> str | None:
    """The format of a file by its suffix (`.gz` ones by their last two): one dict lookup, as discovery asks it of
    every file."""
    name = name.lower()
    dot = name.rfind(".")
    if name.endswith(".gz"):
        dot = name.rfind(".", 0, dot)
    return _FORMATS.get(name[dot:]) if dot >= 0 else None


def unsupported_detail(name: str) -> str:
    return (
        f"{name}: unsupported file type; supported suffixes are {', '.join(_FORMATS)}. Convert it or remove it from "
        "the source paths."
    )


# --------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class _Ctx:
    """What every reader needs: the file, its size and first bytes, and how to build documents and quarantine
    records."""

    path: Path
    size: int
    head: bytes
    text_field: str
    max_doc_bytes: int
    quarantine: Callable[..., QuarantineRecord]
    content: bytes | None = None  # the whole file, when the caller already read it

    def too_large(self, position: str, what: str) -> QuarantineRecord:
        return self.quarantine(
            position=position,
            reason="doc_too_large",
            detail=f"{what} is over ingest.max_doc_bytes={self.max_doc_bytes}; skipped without loading. Raise "
            "the limit to keep it.",
        )

    def document(self, text: str, position: str) -> Document | QuarantineRecord:
        if not text.strip():
            return self.quarantine(
                position=position, reason="empty_text", detail="the text is empty or only whitespace"
            )
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates, e.g. a JSON "\ud800" escape
            return self.quarantine(
                position=position, reason="invalid_utf8", detail=f"not encodable as UTF-8: {e.reason} at char {e.start}"
            )
        if size > self.max_doc_bytes:
            return self.too_large(position, f"the text ({size} bytes)")
        return Document(text, position)

    def record(self, obj: Any, position: str) -> Document | QuarantineRecord:
        """The document in one JSON value: an object whose `text_field` is a string."""
        if isinstance(obj, dict) and isinstance(obj.get(self.text_field), str):
            return self.document(obj[self.text_field], position)
        got = f"an object with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        return self.quarantine(
            position=position,
            reason="missing_text_field",
            detail=f"expected an object with a string {self.text_field!r} field, got {got}; set text_field in "
            "the source config",
        )


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _head(path: Path) -> bytes:
    """The first bytes of the (decompressed) content, to sniff binary data and JSON layout."""
    try:
        with _open(path) as f:
            return f.read(_SNIFF_BYTES)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        return b""  # a damaged gzip: the reader reports it with its position


def _decode_whole(ctx: _Ctx) -> str | QuarantineRecord:
    """The whole file as text (a UTF-8 BOM dropped), or why it is not UTF-8."""
    data = ctx.content
    if data is None:
        with _open(ctx.path) as f:
            data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return ctx.quarantine(
            position=f"byte {e.start}", reason="invalid_utf8", detail=f"{e.reason}; re-encode the file as UTF-8"
        )


def _read_text(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    if ctx.size > ctx.max_doc_bytes:
        yield ctx.too_large("file", f"the file ({ctx.size} bytes)")
        return
    text = _decode_whole(ctx)
    yield text if isinstance(text, QuarantineRecord) else ctx.document(text, "file")


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) per line; None for a line over `limit` bytes, which is never held
    whole."""
    parts: list[bytes] = []
    held, too_long, lineno = 0, False, 1
    # read1, not read: on a truncated gzip, read() would discard the data it decompressed before hitting the end.
    while chunk := stream.read1(_CHUNK):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if not too_long:
                piece = chunk[start:] if end == -1 else chunk[start:end]
                held += len(piece)
                if held > limit:
                    parts, too_long = [], True
                else:
                    parts.append(piece)
            if end == -1:
                break
            yield lineno, None if too_long else b"".join(parts)
            parts, held, too_long, lineno = [], 0, False, lineno + 1
            start = end + 1
    if held or too_long:  # a last line without a final newline
        yield lineno, None if too_long else b"".join(parts)


def _read_jsonl(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    lineno = 0
    try:
        with _open(ctx.path) as f:
            for lineno, line in _lines(f, ctx.max_doc_bytes):
                position = f"line {lineno}"
                if line is None:
                    yield ctx.too_large(position, "the line")
                    continue
                if lineno == 1:
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    continue  # blank lines separate nothing and hold no document
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield ctx.quarantine(
                        position=position, reason="invalid_utf8", detail=f"{e.reason} at byte {e.start} of the line"
                    )
                    continue
                try:
                    obj = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as e:
                    yield ctx.quarantine(position=position, reason="malformed_json", detail=str(e)[:200])
                    continue
                yield ctx.record(obj, position)
    except EOFError:
        yield ctx.quarantine(
            position=f"line {lineno + 1}",
            reason="truncated_gzip",
            detail=f"the compressed stream ends early; the {lineno} lines before it were kept. Re-create or "
            "re-download the file.",
        )
    except (gzip.BadGzipFile, zlib.error) as e:
        yield ctx.quarantine(
            position=f"line {lineno + 1}", reason="corrupt_gzip", detail=f"{e}; the {lineno} lines before it were kept"
        )
    except OSError as e:
        yield ctx.quarantine(
            position=f"line {lineno + 1}", reason="unreadable", detail=f"{e}; the {lineno} lines before it were kept"
        )


def _read_json(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    """A JSON array of objects, a single object, or JSON Lines saved as .json (told apart by the first bytes)."""
    first = ctx.head.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
    if first != b"[" and ctx.size > ctx.max_doc_bytes:
        yield from _read_jsonl(ctx)  # too big for one document: it can only be JSON Lines
        return
    text = _decode_whole(ctx)
    if isinstance(text, QuarantineRecord):
        yield text
        return
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        if first == b"[":
            position = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "file"
            yield ctx.quarantine(position=position, reason="malformed_json", detail=str(e)[:200])
        else:
            yield from _read_jsonl(ctx)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield ctx.record(item, f"item {i}")
    else:
        yield ctx.record(value, "file")


def _read_parquet(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    row = 0
    try:
        with _open(ctx.path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            index = schema.get_field_index(ctx.text_field)
            column_type = schema.field(index).type if index >= 0 else None
            if column_type is None or not (
                pa.types.is_string(column_type)
                or pa.types.is_large_string(column_type)
                or pa.types.is_string_view(column_type)
            ):
                got = f"it is {column_type}" if column_type is not None else f"columns are {schema.names[:12]}"
                yield ctx.quarantine(
                    position="file",
                    reason="missing_text_field",
                    detail=f"no string column {ctx.text_field!r} ({got}) in {pf.metadata.num_rows} rows; "
                    "set text_field in the source config",
                )
                return
            for batch in pf.iter_batches(batch_size=1024, columns=[ctx.text_field]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        yield ctx.quarantine(
                            position=f"row {row}", reason="missing_text_field", detail=f"{ctx.text_field!r} is null"
                        )
                    else:
                        yield ctx.document(text, f"row {row}")
                    row += 1
    except pa.ArrowException as e:
        yield ctx.quarantine(
            position=f"row {row}" if row else "file",
            reason="unreadable_parquet",
            detail=f"{str(e)[:200]}; the {row} rows before it were kept",
        )


def _read_html(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    import trafilatura

    if ctx.size > ctx.max_doc_bytes:
        yield ctx.too_large("file", f"the file ({ctx.size} bytes)")
        return
    with _open(ctx.path) as f:
        html = f.read()  # bytes: trafilatura detects the page's own charset
    text = trafilatura.extract(html, include_comments=False, include_tables=True)
    if text:
        yield ctx.document(text, "file")
    else:
        detail = "no main text found in the page (empty, script-only or boilerplate)"
        yield ctx.quarantine(position="file", reason="no_text_extracted", detail=detail)


def _read_pdf(ctx: _Ctx) -> Iterator[Document | QuarantineRecord]:
    from pypdf import PdfReader

    pages: list[str] = []
    size = 0
    with _open(ctx.path) as f:
        try:
            reader = PdfReader(f)
            if reader.is_encrypted and not reader.decrypt(""):
                problem = "encrypted with a password; decrypt it (e.g. qpdf --decrypt) and re-run"
            else:
                problem = ""
                for page in reader.pages:
                    pages.append(page.extract_text() or "")
                    size += len(pages[-1])
                    if size > ctx.max_doc_bytes:
                        break
        except Exception as e:  # pypdf raises many exception types on damaged files; all mean the same here
            problem = f"{type(e).__name__}: {str(e)[:200]}"
    if problem:
        yield ctx.quarantine(position="file", reason="unreadable_pdf", detail=problem)
        return
    position = "file" if not pages else "page 1" if len(pages) == 1 else f"page 1-{len(pages)}"
    if size > ctx.max_doc_bytes:
        yield ctx.too_large(position, f"the text of pages 1-{len(pages)}")
    elif not "".join(pages).strip():
        yield ctx.quarantine(
            position=position, reason="no_text_extracted", detail="no text layer (a scanned PDF needs OCR first)"
        )
    else:
        yield ctx.document("\n\n".join(pages), position)


_READERS: dict[str, Callable[[_Ctx], Iterator[Document | QuarantineRecord]]] = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "html": _read_html,
    "pdf": _read_pdf,
}


def read_documents(
    path: Path, *, uri: str, source: str, kind: Kind, text_field: str, max_doc_bytes: int, content: bytes | None = None
) -> Iterator[Document | QuarantineRecord]:
    """The documents in one local file (format by suffix), with a quarantine record for every unit that is not one.

    `uri` is the file's lineage (it may differ from `path` for a downloaded S3 object); `content`: the file's bytes
    when the caller already read them (not compressed). Never raises on bad input.
    """
    quarantine = partial(QuarantineRecord, file=uri, source=source, kind=kind)
    fmt = file_format(path.name)
    if fmt is None:
        yield quarantine(position="file", reason="unsupported_format", detail=unsupported_detail(path.name))
        return
    units = 0
    try:
        size = path.stat().st_size if content is None else len(content)
        if size == 0:
            yield quarantine(position="file", reason="empty_file", detail="the file is empty")
            return
        head = b"" if fmt not in _TEXTUAL else _head(path) if content is None else content[:_SNIFF_BYTES]
        if b"\0" in head:
            detail = (
                f"NUL bytes in the first {_SNIFF_BYTES} bytes: binary data or UTF-16, not a {fmt} file; "
                "convert it to UTF-8 text"
            )
            yield quarantine(position="file", reason="binary_file", detail=detail)
            return
        ctx = _Ctx(path, size, head, text_field, max_doc_bytes, quarantine, content)
        for item in _READERS[fmt](ctx):
            units += 1
            yield item
    except OSError as e:
        yield quarantine(position="file", reason="unreadable", detail=f"{e}; check the file's permissions")
        return
    if units == 0:
        yield quarantine(position="file", reason="empty_file", detail=f"the file holds no {fmt} records")


# --------------------------------------------------------------------------- writer


def _check_unchanged(inp: InputFile, content: bytes | None = None) -> None:
    """A local input read after discovery must still be the file that was fingerprinted: otherwise the shard would
    be cached under the old content's key (a deleted file would be cached as 'unreadable'). `content`: the bytes
    parsed, when the file was read whole (they are what is hashed then)."""
    try:
        same = (sha256_file(inp.uri) if content is None else hashlib.sha256(content).hexdigest()) == inp.fingerprint
    except FileNotFoundError:
        raise StoreError(
            f"{inp.uri}: deleted after it was discovered; re-run to discover the current inputs.", "vanished"
        ) from None
    if not same:
        raise StoreError(
            f"{inp.uri}: changed since it was discovered; re-run so the new version is fingerprinted.", "changed"
        )


def ingest_file(inp: InputFile, cfg: IngestConfig, shard: ShardWriter) -> tuple[int, list[QuarantineRecord]]:
    """Read one input file into `shard`. Returns (documents written, quarantine records)."""
    if inp.uri.startswith("s3://"):
        with leftovers.temp_dir("ingest") as tmp:  # only a download needs one: making it costs ~20 ms a file
            return _read_into(shard, ingest_s3.download(inp, Path(tmp)), inp, cfg)
    # A whole-file document is read once, and the bytes hashed are the bytes parsed: sniffing, parsing and hashing a
    # small note in three opens costs more than the rest of its ingest.
    fmt = file_format(os.path.basename(inp.uri))
    content = _read_whole(inp.uri, inp.bytes) if fmt == "text" and inp.bytes <= cfg.max_doc_bytes else None
    plain = _plain_text(content, cfg.max_doc_bytes) if content is not None else None
    if plain is not None:
        shard.add(plain, inp, fmt)
        found: tuple[int, list[QuarantineRecord]] = (1, [])
    else:
        found = _read_into(shard, Path(inp.uri), inp, cfg, content)
    _check_unchanged(inp, content)
    return found


def _read_whole(path: str, size: int) -> bytes | None:
    """The file's bytes (`size`: what discovery saw). os.open and os.read, not open() (no buffered file object), and
    no second read to see the end when the first got the `size` bytes of size + 1 asked for: 2.5-3 us a small file
    against 6 with open().read()."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # reported as deleted by _check_unchanged
    try:
        parts = [os.read(fd, size + 1)]
        if len(parts[0]) == size:
            return parts[0]
        while part := os.read(fd, _READ_ON):  # a short read, or the file grew
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _plain_text(content: bytes, max_doc_bytes: int) -> Document | None:
    """The document of a whole-file text that needs no quarantine record (most small notes), without building a
    reader: ~15 us a file less, for corpora of 10,000s of notes. None: `read_documents` says what is wrong with it."""
    if len(content) > max_doc_bytes or b"\0" in content[:_SNIFF_BYTES]:
        return None
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return Document(text, "file") if text.strip() else None


def _read_into(
    shard: ShardWriter, path: Path, inp: InputFile, cfg: IngestConfig, content: bytes | None = None
) -> tuple[int, list[QuarantineRecord]]:
    quarantined: list[QuarantineRecord] = []
    written = 0
    items = read_documents(
        path,
        uri=inp.uri,
        source=inp.source,
        kind=inp.kind,
        text_field=inp.text_field,
        max_doc_bytes=cfg.max_doc_bytes,
        content=content,
    )
    fmt = file_format(path.name) or ""
    for item in items:
        if isinstance(item, QuarantineRecord):
            quarantined.append(item)
        else:
            shard.add(item, inp, fmt)
            written += 1
    return written, quarantined
