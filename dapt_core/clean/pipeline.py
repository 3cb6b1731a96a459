"""The clean stage: normalise -> quality filter -> decontaminate -> exact dedup -> near dedup.

Two phases keep memory flat however large the corpus is. The per-document Python work (normalise,
quality signals, eval n-gram probes, MinHash) streams over record batches and writes narrow
Parquet intermediates, one task per shard; the set work runs as a shuffle of those intermediates
(duplicate groups, LSH buckets and their verification: one task per partition, `dedup`) and in
DuckDB on the driver (decisions, stats), which spills to disk past its memory limit. Every input
document, quarantined units included, ends with exactly one decision, so input_docs == kept_docs +
sum(dropped) per source and overall.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from dapt_core.clean.decontam import EvalNgrams
from dapt_core.clean.dedup import find_duplicates
from dapt_core.clean.duck import connect, literal
from dapt_core.clean.identity import document_uid
from dapt_core.clean.minhash import has_shingles, lsh_band_keys, minhash_signatures, signature_column
from dapt_core.clean.ngrams import tokenize
from dapt_core.clean.normalize import normalize_text
from dapt_core.clean.parts import PART_NAMES, PartCache, ShardParts
from dapt_core.clean.quality import quality_reasons
from dapt_core.clean.stats import corpus_stats, source_stats, stats_markdown
from dapt_core.config import CleanConfig
from dapt_core.engine import Engine, LocalEngine
from dapt_core.hashing import sha256_file, stable_hash
from dapt_core.manifest import ArtifactRef, QuarantineRecord, SourceStats

_BATCH_DOCS = 512
_INPUT_COLUMNS = ["doc_id", "text", "source", "kind", "file", "position"]
_TRAINING_KINDS = ("domain", "general")
_DOCS = pa.schema(
    [("seq", pa.int64()), ("doc_uid", pa.string())]
    + [(c, pa.string()) for c in _INPUT_COLUMNS]
    + [("words", pa.int64()), ("bytes", pa.int64()), ("text_hash", pa.binary(16)), ("filter_reason", pa.string())]
)
_BANDS = pa.schema([("seq", pa.int64()), ("band", pa.int32()), ("key", pa.uint64())])
_QUARANTINE = pa.schema(
    [(c, pa.string()) for c in ("doc_uid", "source", "kind", "file", "position", "reason", "detail")]
)
_ROW_GROUP_BYTES = 4 << 20  # output row groups of ~4 MiB of text bound the writer's buffers (and a reader's)
# zstd at level 1 (pyarrow's default; DuckDB's is 3): the kept corpus and the decisions are the stage's largest writes,
# level 1 wrote them 1.6x as fast for 12% more bytes, and reading is as fast at any level.
_ZSTD = "COMPRESSION zstd, COMPRESSION_LEVEL 1"


@dataclass
class CleanOutput:
    domain_parts: list[ArtifactRef]
    """Kept domain documents (Parquet: doc_id, text (normalised), source, kind, file, position), one part per shard
    that kept any, in input order; empty if none. In the store when the stage has a part cache (a part reused from it
    is not read by this stage), else local files."""
    general_parts: list[ArtifactRef]
    """Kept general documents, the same way."""
    decisions_path: Path
    """One row per input document: doc_uid (unique: `identity.document_uid`), doc_id (content hash; null when
    quarantined), source, kind, file, position, status ('kept'|'dropped'), reason (null when kept), duplicate_of (the
    doc_uid of the document kept in its place, or null), cluster_id (int or null), detail (what was wrong with a
    quarantined input, e.g. a symlink's target or the JSON error; null otherwise)."""
    stats: dict
    stats_markdown: str
    input_docs: int
    kept_docs: int
    dropped: dict[str, int]
    sources: list[SourceStats]
    quarantined: list[QuarantineRecord]
    """The quarantined training inputs (domain, general), with their details."""


def clean_corpus(
    shards: list[Path],
    eval_shards: list[Path],
    quarantined: list[QuarantineRecord],
    cfg: CleanConfig,
    workdir: Path,
    engine: Engine | None = None,
    cache: PartCache | None = None,
) -> CleanOutput:
    """Clean the ingested `shards` into kept domain/general Parquet files in `workdir`.

    `eval_shards` (Parquet with a `text` column) are only decontaminated against; they are not
    training documents. Each of `quarantined` counts as a dropped input document (eval ones aside).
    Of duplicates the first by priority is kept: domain before general, then source, file, and
    position in the file (read order). The per-document pass runs one task per shard on `engine`
    (default: this process; on Ray, `workdir` must be on storage every node reaches), skipping the
    shards whose parts `cache` holds; the dedup shuffle's map and reduce tasks run there too.
    """
    workdir = Path(workdir)
    scratch = workdir / "clean-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    engine = engine or LocalEngine()
    parts = _per_document_pass(shards, eval_shards, cfg, scratch, engine, cache)

    con = connect(scratch, cfg.duckdb_memory_limit)
    try:
        _load_parts(con, parts)
        find_duplicates(con, parts, cfg.dedup, engine, scratch / "shuffle", cfg.duckdb_memory_limit, cache)
        training_quarantined = [q for q in quarantined if q.kind in _TRAINING_KINDS]
        _decide(con, training_quarantined)
        decisions = workdir / "decisions.parquet"
        con.execute(f"""
            COPY (SELECT doc_uid, doc_id, source, kind, file, position, status, reason, duplicate_of, cluster_id, detail
                  FROM decided ORDER BY kind = 'general', source, file, seq NULLS LAST, position)
            TO {literal(decisions)} (FORMAT parquet, {_ZSTD})""")
        kept = {kind: _write_kept(con, kind, parts, workdir, cache) for kind in _TRAINING_KINDS}
        stats = corpus_stats(con)
    finally:
        con.close()
    shutil.rmtree(scratch)

    total = stats["total"]
    return CleanOutput(
        domain_parts=kept["domain"],
        general_parts=kept["general"],
        decisions_path=decisions,
        stats=stats,
        stats_markdown=stats_markdown(stats),
        input_docs=total["input_docs"],
        kept_docs=total["kept_docs"],
        dropped=total["dropped"],
        sources=source_stats(stats),
        quarantined=training_quarantined,
    )


def _per_document_pass(
    shards: list[Path],
    eval_shards: list[Path],
    cfg: CleanConfig,
    scratch: Path,
    engine: Engine,
    cache: PartCache | None,
) -> list[ShardParts]:
    """The parts of every shard, in order: reused from `cache` when it has them, else computed on `engine`."""
    eval_hashes = EvalNgrams.from_parquet(eval_shards, cfg.decontamination.ngram, cfg.normalize).hashes
    evals = scratch / "eval_ngrams.npy"
    np.save(evals, eval_hashes)
    recipe = stable_hash(
        cfg.model_dump(exclude={"duckdb_memory_limit"}), hashlib.sha256(eval_hashes.tobytes()).hexdigest()
    )
    jobs = [ShardJob(Path(s), cfg, evals, scratch / f"{i:06d}") for i, s in enumerate(shards)] or [
        ShardJob(None, cfg, evals, scratch / "000000")  # no training shard: one empty part keeps the SQL the same
    ]
    keys = [cache.key(job.shard, recipe) if cache and job.shard else None for job in jobs]
    stored = {i: files for i, key in enumerate(keys) if cache and key and (files := cache.stored(key, PART_NAMES))}
    # A refresh reuses nearly every shard's parts, and hashing them all is most of its I/O: it runs on another core
    # (file reads and hashlib release the GIL) while this one computes the new shards' parts, which are kept before
    # a verification error can end the stage. An error on either side cancels the verifications not started.
    with ThreadPoolExecutor(1, thread_name_prefix="verify-parts") as verifier:
        checks = {i: verifier.submit(cache.verified, files) for i, files in stored.items()}
        try:
            found = _computed([i for i in range(len(jobs)) if i not in stored], jobs, keys, engine, cache)
            found |= {i: check.result() for i, check in checks.items()}
        except BaseException:
            verifier.shutdown(wait=False, cancel_futures=True)
            raise
    # Parts damaged in place (their size unchanged) are computed again, as missing ones are.
    found |= _computed([i for i, files in found.items() if files is None], jobs, keys, engine, cache)
    parts, first_seq = [], 0
    for i, key in enumerate(keys):
        files = found[i]
        documents = pq.ParquetFile(files["docs"]).metadata.num_rows
        parts.append(ShardParts(files["docs"], files["signatures"], files["bands"], first_seq, documents, key))
        first_seq += documents
    return parts


def _computed(
    todo: list[int], jobs: list[ShardJob], keys: list[str | None], engine: Engine, cache: PartCache | None
) -> dict[int, dict[str, Path]]:
    """The per-document pass of the jobs `todo` (indices), run on `engine`; their parts, kept in `cache` as soon as
    they are all computed."""
    engine.map(prepare_shard, [jobs[i] for i in todo])
    computed = {i: {name: jobs[i].output(name) for name in PART_NAMES} for i in todo}
    for i, files in computed.items():
        if cache and keys[i]:
            cache.keep(keys[i], files)
    return computed


def _load_parts(con: duckdb.DuckDBPyConnection, parts: list[ShardParts]) -> None:
    """Table `docs`: each document's verdict, numbered across the corpus (`seq`; `shard_seq`: the first seq of its
    shard), and its `rank` (priority order)."""
    parts_in = pa.table({"docs": [str(p.docs) for p in parts], "first_seq": [p.first_seq for p in parts]})
    con.register("parts_in", parts_in)
    con.execute("CREATE TABLE parts AS SELECT * FROM parts_in")
    con.unregister("parts_in")
    con.execute(f"""
        CREATE TABLE docs AS
        SELECT d.* EXCLUDE (text, filename, seq), d.seq + p.first_seq AS seq, p.first_seq AS shard_seq,
            row_number() OVER (ORDER BY d.kind = 'general', d.source, d.file, d.seq + p.first_seq) AS rank
        FROM read_parquet([{", ".join(literal(str(p.docs)) for p in parts)}], filename = true) d
        JOIN parts p ON p.docs = d.filename""")


@dataclass(frozen=True)
class ShardJob:
    """The per-document pass over one ingested shard: its documents are numbered from 0 in shard order, and its
    three Parquet parts (PART_NAMES) are written beside `out`."""

    shard: Path | None  # None: no documents (empty parts)
    cfg: CleanConfig
    eval_ngrams: Path  # .npy of the eval n-gram hashes
    out: Path

    def output(self, name: str) -> Path:
        return self.out.with_name(f"{self.out.name}.{name}.parquet")


def _input_batches(shard: Path | None) -> Iterator[pa.RecordBatch]:
    if shard is None:
        return
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=_BATCH_DOCS, columns=_INPUT_COLUMNS):
        kinds = set(batch.column("kind").to_pylist())
        if not kinds <= set(_TRAINING_KINDS):
            raise ValueError(f"{shard}: training shards hold domain/general documents, found kinds {sorted(kinds)}")
        yield batch


def prepare_shard(job: ShardJob) -> None:
    """The per-document pass of one shard: each document's filter verdict to the docs part, with its normalised
    text only if it passed the filters (only those can be written out); MinHash signatures and LSH band keys of
    the filter survivors to the signatures and bands parts. It depends on the job alone, so any worker can run
    it, or run it again after a crash, with the same result."""
    cfg, dedup = job.cfg, job.cfg.dedup
    evals = EvalNgrams(np.load(job.eval_ngrams), cfg.decontamination.ngram)
    sig_schema = pa.schema([("seq", pa.int64()), ("sig", pa.binary(4 * dedup.num_perm))])
    with (
        pq.ParquetWriter(job.output("docs"), _DOCS) as docs_out,
        pq.ParquetWriter(job.output("signatures"), sig_schema) as sigs_out,
        pq.ParquetWriter(job.output("bands"), _BANDS) as bands_out,
    ):
        seq = 0
        for batch in _input_batches(job.shard):
            texts = [normalize_text(t, cfg.normalize) for t in batch.column("text").to_pylist()]
            reasons = quality_reasons(texts, cfg.quality)
            passed = [i for i, r in enumerate(reasons) if r is None]
            # Decontamination and MinHash compare the same tokens: tokenise and hash them once (if either runs).
            tokens = tokenize([texts[i] for i in passed] if len(evals) or dedup.near else [])
            for i, hit in zip(passed, evals.contaminated(tokens)):
                if hit:
                    reasons[i] = "decontaminated"
            seqs = np.arange(seq, seq + len(texts))
            seq += len(texts)
            encoded = [t.encode() for t in texts]
            columns = {c: batch.column(c) for c in _INPUT_COLUMNS}
            lineage = (batch.column(c).to_pylist() for c in ("kind", "source", "file", "position"))
            columns |= {
                "seq": seqs,
                "doc_uid": [document_uid(*where) for where in zip(*lineage)],
                "text": [t if r is None else None for t, r in zip(texts, reasons)],
                # Stats report the lengths of kept documents only, and only filter survivors can be kept.
                "words": [len(t.split()) if r is None else None for t, r in zip(texts, reasons)],
                "bytes": [len(b) for b in encoded],
                "text_hash": [xxhash.xxh3_128_digest(b) for b in encoded],
                "filter_reason": reasons,
            }
            docs_out.write_table(pa.table(columns, schema=_DOCS))

            survivors = [k for k, i in enumerate(passed) if reasons[i] is None]  # indices into passed
            if not dedup.near or not survivors:
                continue
            sig = minhash_signatures(tokens.take(survivors), dedup.shingle_size, dedup.num_perm, dedup.seed)
            with_words = has_shingles(sig)  # a doc without words has nothing to be similar by
            sig, sig_seqs = sig[with_words], seqs[passed][survivors][with_words]
            sigs_out.write_table(pa.table({"seq": sig_seqs, "sig": signature_column(sig)}, schema=sig_schema))
            keys = lsh_band_keys(sig, dedup.bands, dedup.rows)
            bands_out.write_table(
                pa.table(
                    {
                        "seq": np.repeat(sig_seqs, dedup.bands),
                        "band": np.tile(np.arange(dedup.bands, dtype=np.int32), len(sig_seqs)),
                        "key": keys.ravel(),
                    },
                    schema=_BANDS,
                )
            )


def _decide(con: duckdb.DuckDBPyConnection, quarantined: list[QuarantineRecord]) -> None:
    """Table `decided`: one row per input document with its status, reason, duplicate and cluster."""
    con.register(
        "quarantine_in",
        pa.table(
            {
                "doc_uid": [document_uid(q.kind, q.source, q.file, q.position) for q in quarantined],
                **{c: [getattr(q, c) for q in quarantined] for c in _QUARANTINE.names[1:]},
            },
            schema=_QUARANTINE,
        ),
    )
    con.execute("""
        CREATE TABLE decided AS
        WITH clusters AS (
            SELECT representative, row_number() OVER (ORDER BY min(rank)) - 1 AS cluster_id
            FROM duplicates GROUP BY representative HAVING count(*) > 1)
        SELECT d.seq, d.doc_uid, d.doc_id, d.source, d.kind, d.file, d.position, d.words, d.bytes,
            CASE WHEN coalesce(d.filter_reason, x.reason) IS NULL THEN 'kept' ELSE 'dropped' END AS status,
            coalesce(d.filter_reason, x.reason) AS reason,
            original.doc_uid AS duplicate_of,
            c.cluster_id,
            NULL::VARCHAR AS detail
        FROM docs d
        LEFT JOIN duplicates x USING (seq)
        LEFT JOIN docs original ON original.seq = x.duplicate_of
        LEFT JOIN clusters c ON c.representative = x.representative
        UNION ALL BY NAME
        SELECT doc_uid, source, kind, file, position, 'dropped' AS status, 'quarantine:' || reason AS reason, detail
        FROM quarantine_in""")
    con.unregister("quarantine_in")


def _write_kept(
    con: duckdb.DuckDBPyConnection, kind: str, parts: list[ShardParts], workdir: Path, cache: PartCache | None
) -> list[ArtifactRef]:
    """Write the kept documents of `kind` as one Parquet part per shard that kept any; read in order, the parts are the
    kept corpus in input order.

    A shard's part depends only on the shard's parts and on which of its documents were kept, and `cache` keeps it
    under exactly that. A refresh therefore writes the parts of its new shards, and of the earlier shards whose kept
    set changed (a new document can outrank an earlier duplicate), and reuses the rest without reading them: the stages
    that read the corpus verify every part they read.
    """
    query = "SELECT seq, bytes FROM decided WHERE status = 'kept' AND kind = ? ORDER BY seq"
    kept = con.execute(query, [kind]).fetchnumpy()  # global seqs and text sizes of the kind's kept documents
    bounds = np.searchsorted(kept["seq"], [p.first_seq for p in parts] + [parts[-1].end_seq])
    written = []
    for i, part in enumerate(parts):
        rows = np.asarray(kept["seq"][bounds[i] : bounds[i + 1]], np.int64) - part.first_seq  # seq within the shard
        if not len(rows):
            continue
        key = stable_hash(part.key, kind, hashlib.sha256(rows.tobytes()).hexdigest()) if cache and part.key else None
        if key and (stored := cache.stored(key, ("kept",))):
            written.append(stored["kept"])
            continue
        path = workdir / f"{kind}-{i:06d}.parquet"
        _write_kept_part(con, part, rows, float(np.mean(kept["bytes"][bounds[i] : bounds[i + 1]])), path)
        written.append(cache.keep(key, {"kept": path})["kept"] if key else _local_ref(path))
    return written


def _local_ref(path: Path) -> ArtifactRef:
    """A kept part of a run without a part cache: the local file written."""
    return ArtifactRef(uri=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)


def _write_kept_part(
    con: duckdb.DuckDBPyConnection, part: ShardParts, rows: np.ndarray, mean_bytes: float, path: Path
) -> None:
    """Write the documents `rows` (seq within the shard, ascending) of a shard's docs part, normalised text included.

    A POSITIONAL JOIN against keep flags (in docs row order) streams the text once without sorting or hashing it. Row
    groups hold ~_ROW_GROUP_BYTES of text, by `mean_bytes`, the mean size of these documents alone, so a part's bytes
    depend only on what its cache key names."""
    flags = np.zeros(part.documents, bool)
    flags[rows] = True
    row_group = int(min(122_880, max(64, _ROW_GROUP_BYTES // max(mean_bytes, 1))))
    con.register("keep_flags", pa.table({"keep": flags}))
    try:
        con.execute(f"""
            COPY (SELECT d.doc_id, d.text, d.source, d.kind, d.file, d.position
                  FROM read_parquet({literal(part.docs)}) d POSITIONAL JOIN keep_flags f WHERE f.keep)
            TO {literal(path)} (FORMAT parquet, {_ZSTD}, ROW_GROUP_SIZE {row_group})""")
    finally:
        con.unregister("keep_flags")
