"""Ingest: every format, every kind of bad input (quarantined with its position, neighbours kept), lineage, stable ids,
S3 prefixes as input, and reading that does not grow with file size."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tracemalloc
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from dapt_core import discovery, ingest
from dapt_core.config import IngestConfig, SourceConfig
from dapt_core.discovery import discover_inputs
from dapt_core.faults import StoreError
from dapt_core.hashing import sha256_file
from dapt_core.ingest import INGEST_SCHEMA, Document, read_documents
from dapt_core.ingest_batches import (
    EarlierFile,
    ingest_batch,
    ingest_files,
    plan_batches,
)
from dapt_core.input_files import InputFiles
from dapt_core.manifest import InputFile, QuarantineRecord

MB = 1 << 20


def read(path: Path, *, text_field: str = "text", max_doc_bytes: int = 8_000_000) -> list[Document | QuarantineRecord]:
    return list(
        read_documents(
            path, uri=str(path), source="src", kind="domain", text_field=text_field, max_doc_bytes=max_doc_bytes
        )
    )


def docs_of(items) -> list[Document]:
    return [i for i in items if isinstance(i, Document)]


def reasons(items) -> list[tuple[str, str]]:
    return [(q.position, q.reason) for q in items if isinstance(q, QuarantineRecord)]


def jsonl(*objs) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def make_pdf(pages: list[str], password: str | None = None) -> bytes:
    """A small PDF with one Helvetica text line per page (pypdf writes it; no fonts or tools needed)."""

    def name(n: str) -> NameObject:
        return NameObject("/" + n)

    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {name("Type"): name("Font"), name("Subtype"): name("Type1"), name("BaseFont"): name("Helvetica")}
        )
    )
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[name("Resources")] = DictionaryObject({name("Font"): DictionaryObject({name("F1"): font})})
        content = DecodedStreamObject()
        content.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
        page[name("Contents")] = writer._add_object(content)
    if password:
        writer.encrypt(user_password=password, algorithm="AES-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


ARTICLE = b"""<html><head><title>Cardiology notes</title><script>var x = 1;</script></head><body>
<nav><a href="/">Home</a></nav><article><h1>Heart failure</h1>
<p>Beta blockers reduce mortality in chronic heart failure with reduced ejection fraction.</p>\
</article></body></html>"""


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["a.txt", "a.md", "a.markdown", "a.text", "A.TXT"])
def test_text_files_are_one_document(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbfFirst line.\n\nSecond paragraph, caf\xc3\xa9.\n")
    assert read(p) == [Document("First line.\n\nSecond paragraph, café.\n", "file")]  # BOM dropped


@pytest.mark.parametrize("name", ["a.jsonl", "a.ndjson", "a.jsonl.gz", "a.json.gz", "a.ndjson.gz"])
def test_json_lines_give_one_document_per_line(tmp_path, name):
    data = (
        jsonl({"body": "one"}, {"body": "two", "id": 7}) + b"\n  \n" + b'{"body": "three"}'
    )  # blank lines, no final newline
    p = tmp_path / name
    p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert read(p, text_field="body") == [
        Document("one", "line 1"),
        Document("two", "line 2"),
        Document("three", "line 5"),
    ]


def test_json_file_array_object_or_lines(tmp_path):
    array, single, lines = tmp_path / "array.json", tmp_path / "single.json", tmp_path / "lines.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"other": "c"}], indent=2))
    single.write_text(json.dumps({"text": "only one", "meta": {"x": 1}}, indent=2))
    lines.write_bytes(jsonl({"text": "l1"}, {"text": "l2"}))
    assert read(array)[:2] == [Document("a", "item 0"), Document("b", "item 1")]
    assert reasons(read(array)) == [("item 2", "missing_text_field")]
    assert read(single) == [Document("only one", "file")]
    assert read(lines) == [Document("l1", "line 1"), Document("l2", "line 2")]
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": ')
    assert reasons(read(tmp_path / "bad.json")) == [("line 2", "malformed_json")]


def test_parquet_rows_are_streamed_in_batches(tmp_path):
    texts = [f"row text {i}" for i in range(2500)]
    texts[1800] = None
    pq.write_table(pa.table({"content": texts, "n": list(range(2500))}), tmp_path / "a.parquet", row_group_size=1000)
    items = read(tmp_path / "a.parquet", text_field="content")
    assert len(items) == 2500
    assert items[0] == Document("row text 0", "row 0") and items[2499] == Document("row text 2499", "row 2499")
    assert reasons(items) == [("row 1800", "missing_text_field")]
    missing = read(tmp_path / "a.parquet", text_field="text")
    assert reasons(missing) == [("file", "missing_text_field")] and "2500 rows" in missing[0].detail
    assert reasons(read(tmp_path / "a.parquet", text_field="n")) == [
        ("file", "missing_text_field")
    ]  # not a string column
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    assert reasons(read(tmp_path / "broken.parquet")) == [("file", "unreadable_parquet")]


@pytest.mark.parametrize("name", ["page.html", "page.htm"])
def test_html_main_text_is_extracted(tmp_path, name):
    (tmp_path / name).write_bytes(ARTICLE)
    [doc] = read(tmp_path / name)
    assert "Beta blockers reduce mortality" in doc.text and "var x" not in doc.text and doc.position == "file"


def test_html_without_text_is_quarantined(tmp_path):
    (tmp_path / "empty.html").write_bytes(b"<html><head><script>var x = 1;</script></head><body></body></html>")
    assert reasons(read(tmp_path / "empty.html")) == [("file", "no_text_extracted")]


def test_pdf_text_of_all_pages(tmp_path):
    (tmp_path / "a.pdf").write_bytes(make_pdf(["Hello page one", "Second page text", "Third"]))
    [doc] = read(tmp_path / "a.pdf")
    assert doc == Document("Hello page one\n\nSecond page text\n\nThird", "page 1-3")


def test_broken_and_encrypted_pdfs_are_quarantined(tmp_path):
    (tmp_path / "locked.pdf").write_bytes(make_pdf(["secret text"], password="pw"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage")
    (tmp_path / "blank.pdf").write_bytes(make_pdf([" "]))
    assert reasons(read(tmp_path / "locked.pdf")) == [("file", "unreadable_pdf")]
    assert "encrypted" in read(tmp_path / "locked.pdf")[0].detail
    assert reasons(read(tmp_path / "broken.pdf")) == [("file", "unreadable_pdf")]
    assert reasons(read(tmp_path / "blank.pdf")) == [("page 1", "no_text_extracted")]


# --------------------------------------------------------------------------- bad input


def test_bad_json_lines_are_quarantined_and_neighbours_kept(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(
        jsonl(
            {"text": "good one"},
            b'{"text": "unterminated',
            {"title": "no text field"},
            {"text": 42},
            b'{"text": "caf\xe9 latin-1"}',
            {"text": ""},
            b'{"text": "lone \\ud800 surrogate"}',
            b"[1, 2, 3]",
            b"[" * 100_000,
            {"text": "good two"},
        )
    )
    items = read(p)
    assert docs_of(items) == [Document("good one", "line 1"), Document("good two", "line 10")]
    assert reasons(items) == [
        ("line 2", "malformed_json"),
        ("line 3", "missing_text_field"),
        ("line 4", "missing_text_field"),
        ("line 5", "invalid_utf8"),
        ("line 6", "empty_text"),
        ("line 7", "invalid_utf8"),
        ("line 8", "missing_text_field"),
        ("line 9", "malformed_json"),
    ]
    assert all(
        q.file == str(p) and q.source == "src" and q.kind == "domain" and q.detail
        for q in items
        if isinstance(q, QuarantineRecord)
    )


def test_invalid_utf8_text_file_names_the_byte(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("naïve café".encode("latin-1"))
    [q] = read(tmp_path / "latin1.txt")
    assert (q.position, q.reason) == ("byte 2", "invalid_utf8")


def test_truncated_gzip_keeps_the_lines_before(tmp_path):
    data = gzip.compress(jsonl(*({"text": f"line {i} " + "x" * 200} for i in range(2000))))
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    items = read(p)
    [q] = [i for i in items if isinstance(i, QuarantineRecord)]
    kept = docs_of(items)
    assert 0 < len(kept) < 2000 and q.reason == "truncated_gzip" and q.position == f"line {len(kept) + 1}"
    assert kept[-1] == Document(f"line {len(kept) - 1} " + "x" * 200, f"line {len(kept)}")
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "not compressed"}\n')
    assert reasons(read(tmp_path / "fake.jsonl.gz")) == [("line 1", "corrupt_gzip")]


@pytest.mark.parametrize(
    "name, content",
    [("e.txt", b""), ("e.jsonl", b""), ("e.jsonl.gz", gzip.compress(b"\n\n")), ("e.json", b"[]"), ("e.pdf", b"")],
)
def test_empty_files_are_quarantined(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    assert reasons(read(tmp_path / name)) == [("file", "empty_file")]


@pytest.mark.parametrize("name", ["bin.txt", "bin.jsonl", "bin.json", "bin.html"])
def test_binary_content_with_text_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + os.urandom(1000))
    assert reasons(read(tmp_path / name)) == [("file", "binary_file")]


def test_whitespace_text_file_is_empty_text(tmp_path):
    (tmp_path / "blank.md").write_text("  \n\n\t")
    assert reasons(read(tmp_path / "blank.md")) == [("file", "empty_text")]


def test_oversized_documents_are_skipped_not_loaded(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 2000)
    pq.write_table(pa.table({"text": ["small", "y" * 2000]}), tmp_path / "big.parquet")
    assert reasons(read(tmp_path / "big.txt", max_doc_bytes=1000)) == [("file", "doc_too_large")]
    assert reasons(read(tmp_path / "big.parquet", max_doc_bytes=1000)) == [("row 1", "doc_too_large")]


def test_a_50mb_line_is_skipped_without_holding_it(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(jsonl({"text": "before"}))
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"z" * MB)
        f.write(b'"}\n')
        f.write(jsonl({"text": "after"}))
    tracemalloc.start()
    try:
        items = read(p, max_doc_bytes=MB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs_of(items) == [Document("before", "line 1"), Document("after", "line 3")]
    assert reasons(items) == [("line 2", "doc_too_large")]
    # A line is held only until it passes max_doc_bytes, so the peak is bounded by the limit, not the 50 MB line.
    assert peak < 5 * MB, f"peak {peak / MB:.1f} MiB: the long line was held in memory"
    assert reasons(read(p)) == [("line 2", "doc_too_large")]  # the default limit (8 MB)


def test_memory_does_not_grow_with_jsonl_size(tmp_path):
    p = tmp_path / "large.jsonl"
    line = jsonl({"text": "word " * 200})
    with open(p, "wb") as f:
        f.write(line * (30 * MB // len(line)))
    n = 0
    tracemalloc.start()
    try:
        for item in read_documents(
            p, uri=str(p), source="s", kind="domain", text_field="text", max_doc_bytes=8_000_000
        ):
            n += isinstance(item, Document)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 30 * MB // len(line)
    assert peak < 6 * MB, f"peak {peak / MB:.1f} MiB while reading a 30 MiB file"


def test_unreadable_file_is_quarantined(tmp_path, monkeypatch):
    p = tmp_path / "locked.txt"
    p.write_text("secret")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_open", denied)  # tests run as root, where chmod 000 does not stop reads
    assert reasons(read(p)) == [("file", "unreadable")]
    monkeypatch.setattr(discovery, "sha256_file", denied)
    inputs, refused = discover_inputs(SourceConfig(name="s", paths=[str(tmp_path)]), "domain")
    assert not inputs and [(q.file, q.reason) for q in refused] == [(str(p), "unreadable")]


def test_unsupported_format_is_quarantined(tmp_path):
    (tmp_path / "a.docx").write_bytes(b"PK\x03\x04")
    assert reasons(read(tmp_path / "a.docx")) == [("file", "unsupported_format")]


# --------------------------------------------------------------------------- discovery


def test_discover_directories_globs_and_refusals(tmp_path):
    root, outside = tmp_path / "corpus", tmp_path / "elsewhere"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    outside.mkdir()
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.jsonl").write_bytes(jsonl({"text": "b"}))
    (root / "sub" / "deeper" / "c.md").write_text("c")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config.txt").write_text("hidden folder")
    (root / "notes.docx").write_bytes(b"PK")
    (outside / "secret.txt").write_text("outside")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escape_dir").symlink_to(outside)
    (root / "alias.txt").symlink_to(root / "a.txt")

    inputs, refused = discover_inputs(SourceConfig(name="med", paths=[str(root)], text_field="body"), "general")
    assert [i.uri for i in inputs] == [str(root / p) for p in ("a.txt", "alias.txt", "sub/b.jsonl", "sub/deeper/c.md")]
    a = inputs[0]
    assert (a.source, a.kind, a.text_field, a.bytes, a.fingerprint) == (
        "med",
        "general",
        "body",
        1,
        sha256_file(root / "a.txt"),
    )
    assert [(q.file, q.reason) for q in refused] == [
        (str(root / "escape.txt"), "symlink_outside_root"),
        (str(root / "escape_dir"), "symlink_outside_root"),
        (str(root / "notes.docx"), "unsupported_format"),
    ]
    assert all(q.source == "med" and q.kind == "general" and q.position == "file" for q in refused)

    globbed, refused = discover_inputs(SourceConfig(name="g", paths=[f"{root}/**/*.md", f"{root}/*.txt"]), "domain")
    assert [i.uri for i in globbed] == [str(root / "a.txt"), str(root / "alias.txt"), str(root / "sub/deeper/c.md")]
    assert [(q.file, q.reason) for q in refused] == [(str(root / "escape.txt"), "symlink_outside_root")]

    explicit, refused = discover_inputs(SourceConfig(name="e", paths=[str(root / "escape.txt")]), "domain")
    assert [i.uri for i in explicit] == [str(root / "escape.txt")] and refused == []  # named on purpose: taken as named


@pytest.mark.parametrize("pattern", ["missing.txt", "missing_dir", "*.nothing", "empty"])
def test_a_path_matching_nothing_is_a_config_error(tmp_path, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("a")
    spec = str(tmp_path / pattern)
    with pytest.raises(FileNotFoundError) as e:
        discover_inputs(SourceConfig(name="pubmed", paths=[str(tmp_path / "a.txt"), spec]), "domain")
    assert spec in str(e.value) and "pubmed" in str(e.value)


# --------------------------------------------------------------------------- writer


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_ingest_file_writes_lineage_and_stable_ids(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(
        jsonl({"text": "alpha"}, {"text": "beta"}, b"not json", {"text": "gamma"}, {"text": "delta"}, {"text": "alpha"})
    )
    inp = InputFile(uri=str(p), source="med", kind="domain", fingerprint=sha256_file(p), bytes=p.stat().st_size)
    out = tmp_path / "out" / "a.parquet"
    [(n, quarantined)] = ingest_files([inp], IngestConfig(shard_docs=2), out)
    assert n == 5 and [(q.position, q.reason) for q in quarantined] == [("line 3", "malformed_json")]
    f = pq.ParquetFile(out)
    assert f.schema_arrow == INGEST_SCHEMA and [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [
        2,
        2,
        1,
    ]
    rows = read_parquet(out)
    assert rows[0] == {
        "doc_id": hashlib.blake2b(b"alpha", digest_size=16).hexdigest(),
        "text": "alpha",
        "source": "med",
        "kind": "domain",
        "file": str(p),
        "position": "line 1",
        "format": "jsonl",
    }
    assert [r["position"] for r in rows] == ["line 1", "line 2", "line 4", "line 5", "line 6"]
    assert rows[0]["doc_id"] == rows[4]["doc_id"] != rows[1]["doc_id"]  # a content hash: same text, same id
    ingest_files([inp], IngestConfig(shard_docs=2), tmp_path / "again.parquet")
    assert read_parquet(tmp_path / "again.parquet") == rows


@pytest.mark.parametrize(
    "content",
    [
        b"A plain note.\n",
        b"\xef\xbb\xbfWith a BOM, caf\xc3\xa9.\n",
        b"",
        b"  \n\t",
        b"\xef\xbb\xbf",
        b"bad \xff byte",
        b"text\0with a NUL",
        b"x" * 2000,
    ],
    ids=["plain", "bom", "empty", "blank", "only-bom", "invalid-utf8", "nul", "too-large"],
)
def test_ingest_file_reads_whole_text_files_as_read_documents_does(tmp_path, content):
    """Small text files skip the reader machinery when nothing is wrong with them; what they write, or why they are
    quarantined, must be what read_documents says."""
    p = tmp_path / "note.txt"
    p.write_bytes(content)
    inp = InputFile(uri=str(p), source="src", kind="domain", fingerprint=sha256_file(p), bytes=len(content))
    [(n, quarantined)] = ingest_files([inp], IngestConfig(max_doc_bytes=1000), tmp_path / "out.parquet")
    expected = read(p, max_doc_bytes=1000)
    assert quarantined == [q for q in expected if isinstance(q, QuarantineRecord)]
    rows = read_parquet(tmp_path / "out.parquet")
    assert n == len(rows) and [(r["text"], r["position"], r["format"]) for r in rows] == [
        (d.text, d.position, "text") for d in docs_of(expected)
    ]


@pytest.mark.parametrize("now", [b"grew " * 30_000, b"shrank"], ids=["grew-past-a-read", "shrank"])
def test_a_local_text_file_changed_after_discovery_is_refused_not_cut(tmp_path, now):
    p = tmp_path / "note.txt"
    p.write_bytes(b"the note as discovered")
    inp = InputFile(uri=str(p), source="s", kind="domain", fingerprint=sha256_file(p), bytes=p.stat().st_size)
    p.write_bytes(now)
    with pytest.raises(StoreError, match="changed since it was discovered") as e:
        ingest_files([inp], IngestConfig(), tmp_path / "out.parquet")
    assert e.value.kind == "changed"
    assert ingest._read_whole(str(p), inp.bytes) == now  # read to its end, not to the size discovery saw


def test_ingest_file_with_no_documents_writes_an_empty_parquet(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    inp = InputFile(uri=str(p), source="s", kind="eval", fingerprint=sha256_file(p), bytes=0)
    [(n, quarantined)] = ingest_files([inp], IngestConfig(), tmp_path / "empty.parquet")
    assert n == 0 and [q.reason for q in quarantined] == ["empty_file"]
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.schema == INGEST_SCHEMA


def test_every_input_unit_is_accounted_for(tmp_path):
    """A corpus with known units (files, lines, items, rows): documents + quarantine records == units."""
    root = tmp_path / "corpus"
    root.mkdir()
    units = 0

    def put(name: str, data: bytes, n: int) -> None:
        nonlocal units
        (root / name).write_bytes(data)
        units += n

    put("a.txt", b"a text file", 1)
    put("b.jsonl", jsonl({"text": "x"}, b"{bad", {"text": ""}, {"no": 1}, {"text": "y"}), 5)
    put("c.json", json.dumps([{"text": "i"}, {"text": 1}]).encode(), 2)
    put("d.html", ARTICLE, 1)
    put("e.pdf", make_pdf(["pdf text"]), 1)
    put("f.txt", b"", 1)
    put("g.txt", b"\x00\x01binary", 1)
    put("h.xlsx", b"PK", 1)
    put("i.pdf", b"not a pdf", 1)
    pq.write_table(pa.table({"text": ["r0", None, "r2"]}), root / "j.parquet")
    units += 3
    cut = gzip.compress(jsonl(*({"text": f"doc {i} " + "z" * 300} for i in range(500))))
    put("k.jsonl.gz", cut[: len(cut) // 2], 0)  # its kept lines + 1 truncation record, counted below

    inputs, refused = discover_inputs(SourceConfig(name="s", paths=[str(root)]), "domain")
    docs, quarantined = 0, list(refused)
    for inp in inputs:
        [(n, q)] = ingest_files([inp], IngestConfig(), tmp_path / "out" / (Path(inp.uri).name + ".parquet"))
        docs += n
        quarantined += q
    gz_kept = pq.read_table(tmp_path / "out" / "k.jsonl.gz.parquet").num_rows
    assert 0 < gz_kept < 500
    assert docs + len(quarantined) == units + gz_kept + 1
    assert docs == 1 + 2 + 1 + 1 + 1 + 2 + gz_kept


# --------------------------------------------------------------------------- S3


def test_s3_prefix_is_discovered_and_ingested(s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="corpus/a.txt", Body=b"first document")
    s3.put_object(
        Bucket=s3_bucket,
        Key="corpus/sub/b.jsonl.gz",
        Body=gzip.compress(jsonl({"text": "b1"}, b"oops", {"text": "b2"})),
    )
    s3.put_object(Bucket=s3_bucket, Key="corpus/.hidden.txt", Body=b"skipped")
    s3.put_object(Bucket=s3_bucket, Key="corpus/table.csv", Body=b"a,b")
    s3.put_object(Bucket=s3_bucket, Key="corpus-other/c.txt", Body=b"not under the corpus/ folder")

    inputs, refused = discover_inputs(SourceConfig(name="web", paths=[f"s3://{s3_bucket}/corpus"]), "general")
    assert [i.uri for i in inputs] == [f"s3://{s3_bucket}/corpus/a.txt", f"s3://{s3_bucket}/corpus/sub/b.jsonl.gz"]
    head = s3.head_object(Bucket=s3_bucket, Key="corpus/a.txt")
    assert inputs[0].fingerprint == f"etag:{head['ETag'].strip(chr(34))}:14" and inputs[0].bytes == 14
    assert [(q.file, q.reason) for q in refused] == [(f"s3://{s3_bucket}/corpus/table.csv", "unsupported_format")]

    [(n, q)] = ingest_files([inputs[1]], IngestConfig(), tmp_path / "b.parquet")
    assert n == 2 and [(r.position, r.reason) for r in q] == [("line 2", "malformed_json")]
    rows = read_parquet(tmp_path / "b.parquet")
    assert [(r["text"], r["file"], r["position"], r["kind"]) for r in rows] == [
        ("b1", inputs[1].uri, "line 1", "general"),
        ("b2", inputs[1].uri, "line 3", "general"),
    ]

    s3.put_object(Bucket=s3_bucket, Key="corpus/a.txt", Body=b"changed after discovery")
    with pytest.raises(RuntimeError, match="changed since it was discovered"):
        ingest_files([inputs[0]], IngestConfig(), tmp_path / "a.parquet")

    single, _ = discover_inputs(SourceConfig(name="one", paths=[f"s3://{s3_bucket}/corpus/a.txt"]), "domain")
    assert [i.uri for i in single] == [f"s3://{s3_bucket}/corpus/a.txt"]
    with pytest.raises(FileNotFoundError, match="matches no input files"):
        discover_inputs(SourceConfig(name="web", paths=[f"s3://{s3_bucket}/nothing/"]), "general")
    with pytest.raises(StoreError, match=f"bucket '{s3_bucket}-absent' does not exist") as missing_bucket:
        discover_inputs(SourceConfig(name="web", paths=[f"s3://{s3_bucket}-absent/x"]), "general")
    assert missing_bucket.value.kind == "no_bucket"


# --------------------------------------------------------------------------- batches


def _inputs(tmp_path: Path, sizes: list[int], source: str = "s") -> list[InputFile]:
    made = []
    for i, size in enumerate(sizes):
        p = tmp_path / source / f"f{i:05d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"document {i} " + "w" * size)
        made.append(
            InputFile(uri=str(p), source=source, kind="domain", fingerprint=sha256_file(p), bytes=p.stat().st_size)
        )
    return made


def test_batches_hold_about_the_target_and_one_new_file_changes_one_batch(tmp_path):
    files = [
        InputFile(uri=f"/in/s/{i:05d}.txt", source="s", kind="domain", fingerprint=str(i), bytes=1000)
        for i in range(3000)
    ]
    others = [
        InputFile(uri=f"/in/t/{i}.txt", source="t", kind="domain", fingerprint=str(i), bytes=1000) for i in range(5)
    ]
    batches = plan_batches(InputFiles.of(files + others), target_bytes=50_000, target_files=200)
    assert [f for b in batches for f in b] == files + others  # every file once, in order
    assert all(len({(f.kind, f.source) for f in b}) == 1 for b in batches)  # a batch never mixes sources
    sizes = [len(b) for b in batches if b[0].source == "s"]
    assert max(sizes) <= 800 and 30 <= sum(sizes) / len(sizes) <= 70  # ~50 files of 1000 bytes

    added = InputFile(uri="/in/s/01234x.txt", source="s", kind="domain", fingerprint="new", bytes=1000)
    after = plan_batches(
        InputFiles.of(sorted(files + [added], key=lambda f: f.uri) + others), target_bytes=50_000, target_files=200
    )
    tiny = plan_batches(InputFiles.of(files), target_bytes=10**12, target_files=100)  # small files: cut by count
    assert 50 <= sum(map(len, tiny)) / len(tiny) <= 150
    changed = [b for b in after if b not in batches]
    assert added in changed[0] and len(changed) <= 2  # its batch (split in two if the new file ends a batch)
    assert len(after) - len(changed) >= len(batches) - 1


def test_files_added_after_the_last_batch_start_a_batch_of_their_own():
    """A nightly drop sorts after everything seen before: with the last run's batch ends, no earlier batch changes."""
    made = lambda uri: InputFile(uri=uri, source="s", kind="domain", fingerprint=uri, bytes=1000)  # noqa: E731
    files = InputFiles.of(made(f"/in/s/{i:05d}.txt") for i in range(300))
    added = InputFiles.of(made(f"/in/s/zz-drop/{i:03d}.txt") for i in range(40))
    before = plan_batches(files, target_bytes=50_000, target_files=200)
    joined = plan_batches(files + added, target_bytes=50_000, target_files=200)
    assert before[-1] not in joined  # no boundary after the last old file: the new files join its batch
    after = plan_batches(files + added, target_bytes=50_000, target_files=200, ends={b[-1].uri for b in before})
    assert after[: len(before)] == before
    assert [f for b in after[len(before) :] for f in b] == list(added)


def test_a_batch_reads_only_files_without_earlier_rows(tmp_path, monkeypatch):
    import dapt_core.ingest as ingest

    inputs = _inputs(tmp_path, [10, 20, 30])
    keys = [f"key-{i}" for i in range(3)]
    cfg = IngestConfig(shard_docs=2)
    first = ingest_batch(inputs, keys, cfg, tmp_path / "first.parquet", {})
    assert [(r.docs, r.reused) for r in first] == [(1, False)] * 3

    read = []
    real = ingest.ingest_file
    monkeypatch.setattr(ingest, "ingest_file", lambda inp, *a: read.append(inp.uri) or real(inp, *a))
    earlier = {inp.uri: EarlierFile(k, 1, [], tmp_path / "first.parquet") for inp, k in zip(inputs, keys)}
    earlier[inputs[1].uri] = EarlierFile("key-of-older-content", 1, [], tmp_path / "first.parquet")
    second = ingest_batch(inputs, keys, cfg, tmp_path / "second.parquet", earlier)
    assert read == [inputs[1].uri] and [r.reused for r in second] == [True, False, True]
    assert read_parquet(tmp_path / "second.parquet") == read_parquet(tmp_path / "first.parquet")
    f = pq.ParquetFile(tmp_path / "second.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [2, 1]  # small files share row groups

    (tmp_path / "first.parquet").unlink()  # an earlier shard gone: its files are read again
    read.clear()
    ingest_batch(inputs, keys, cfg, tmp_path / "third.parquet", earlier)
    assert read == [inp.uri for inp in inputs]


def test_per_file_records_round_trip_and_earlier_files_are_those_asked_with_an_intact_shard(tmp_path):
    from dapt_core.ingest_batches import FileResult, earlier_files, file_records, write_file_table
    from dapt_core.manifest import FileIngest, IngestBatchManifest
    from dapt_core.store import open_store

    store = open_store(str(tmp_path / "store"))
    inputs = _inputs(tmp_path, [10, 20, 30])
    bad = QuarantineRecord(file=inputs[2].uri, source="notes", position="line 3", reason="malformed_json", detail="x")
    keys = [f"key-{i}" for i in range(3)]
    results = [FileResult(1, [], reused=False), FileResult(1, [], reused=True), FileResult(0, [bad], reused=False)]
    files = [
        FileIngest(input=inp, docs=r.docs, quarantined=r.quarantined, cache_key=k, read=not r.reused)
        for inp, k, r in zip(inputs, keys, results)
    ]
    write_file_table(inputs, keys, results, tmp_path / "files.parquet")
    ingest_batch(inputs[:2], ["key-0", "key-1"], IngestConfig(), tmp_path / "docs.parquet", {})
    batch = IngestBatchManifest(
        shard=store.put_file(tmp_path / "docs.parquet", "ingest/docs.parquet"),
        files=store.put_file(tmp_path / "files.parquet", "ingest/files.parquet"),
        file_count=3,
        docs=2,
        quarantined=[bad],
        code_version="v1",
    )
    records = file_records(store, [batch])
    assert [(m.input, m.docs, m.quarantined, m.cache_key) for m in records] == [
        (f.input, f.docs, f.quarantined, f.cache_key) for f in files
    ]
    assert [m.shard for m in records] == [batch.shard, batch.shard, None]  # a file without documents has no shard

    found = earlier_files(store, [batch], {inputs[0].uri, inputs[2].uri})
    assert found.keys() == {inputs[0].uri, inputs[2].uri}
    assert found[inputs[2].uri].quarantined == [bad] and found[inputs[2].uri].shard is None
    Path(batch.shard.uri).unlink()  # the shard gone: none of its files can be copied
    assert earlier_files(store, [batch], {inputs[0].uri}) == {}


def test_earlier_files_reads_only_the_tables_of_batches_whose_uri_range_holds_a_wanted_file(tmp_path, monkeypatch):
    """A batch re-run for new files must not read every earlier batch's table (one per batch of the corpus)."""
    import dapt_core.ingest_batches as ingest_batches
    from dapt_core.manifest import IngestBatchManifest
    from dapt_core.store import open_store

    store = open_store(str(tmp_path / "store"))
    inputs = _inputs(tmp_path, [10, 20, 30, 40])
    batches = []
    for i, pair in enumerate((inputs[:2], inputs[2:])):
        keys = [f"key-{inp.uri}" for inp in pair]
        results = [ingest_batches.FileResult(0, [], reused=False) for _ in pair]
        ingest_batches.write_file_table(pair, keys, results, tmp_path / f"files{i}.parquet")
        ref = store.put_file(tmp_path / f"files{i}.parquet", f"ingest/files{i}.parquet")
        uris = [inp.uri for inp in pair]
        batches.append(
            IngestBatchManifest(
                files=ref, file_count=2, docs=0, code_version="v1", first_uri=min(uris), last_uri=max(uris)
            )
        )
    read = []
    real = ingest_batches.read_file_table
    monkeypatch.setattr(
        ingest_batches, "read_file_table", lambda path, only=None: read.append(path) or real(path, only)
    )

    assert ingest_batches.earlier_files(store, batches, {inputs[3].uri}).keys() == {inputs[3].uri}
    assert read == [store.local_path(batches[1].files)]  # the first batch's range cannot hold it: not read
    read.clear()
    assert ingest_batches.earlier_files(store, batches, {inputs[0].uri + "-new"}) == {}
    assert read == [store.local_path(batches[0].files)]  # inside the first range: looked for, not found
    read.clear()
    unranged = [b.model_copy(update={"first_uri": None, "last_uri": None}) for b in batches]  # an older manifest
    assert ingest_batches.earlier_files(store, unranged, {inputs[0].uri}).keys() == {inputs[0].uri}
    assert len(read) == 2


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("notes.TXT", "text"),
        ("a.b.jsonl.gz", "jsonl"),
        ("dump.JSON.GZ", "jsonl"),
        ("x.json", "json"),
        ("archive.tar.gz", None),
        ("data.gz", None),
        ("README", None),
        ("page.htm", "html"),
        ("table.parquet", "parquet"),
    ],
)
def test_a_files_format_is_its_suffix_and_gz_files_are_known_by_their_last_two(name, fmt):
    assert ingest.file_format(name) == fmt
