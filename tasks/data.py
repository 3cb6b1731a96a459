"""Prefect tasks of the data stages: discover → ingest (one task per batch of files) → clean/dedup/stats."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import dapt_core.clean as clean
import dapt_core.discovery as discovery
import dapt_core.ingest_batches as ingest_batches
from dapt.tasks.caching import check_result_record, refresh_requested
from dapt.tasks.retries import retry_if_worthwhile
from dapt_core import layout, leftovers
from dapt_core.clean.decontam import require_complete_eval_sets
from dapt_core.clean.parts import StorePartCache
from dapt_core.config import CleanConfig, DataConfig, IngestConfig, PrepareConfig
from dapt_core.engine import open_engine
from dapt_core.fingerprints import FingerprintMemo
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import (
    ArtifactRef,
    CleanManifest,
    IngestBatchManifest,
    InputFile,
    KeptCorpus,
    QuarantineRecord,
)
from dapt_core.store import open_store

# The task module itself is part of each code version: a custom cache key replaces Prefect's task-source hash.
INGEST_CODE = code_version(ingest_batches.run_batch, task_module=sys.modules[__name__])
CLEAN_CODE = code_version(clean.clean_corpus, task_module=sys.modules[__name__])


def ingest_keys(batch: list[InputFile], cfg: IngestConfig) -> list[str]:
    """Each file's cache key: a later batch holding the file with this key reuses its rows. The settings that shape a
    file's rows, hashed once; each file's fields as a JSON row (a model dump per file cost ~10 us, for every file a
    batch reads)."""
    settings = stable_hash(cfg.model_dump(exclude={"batch_bytes", "batch_files"}), INGEST_CODE)
    rows = (json.dumps(ingest_batches.input_row(inp)) for inp in batch)
    return ["ingest-" + hashlib.sha256(f"{settings}\n{row}".encode()).hexdigest() for row in rows]


def ingest_batch_key(batch: list[InputFile], cfg: IngestConfig) -> str:
    """A batch's cache key: every field of its files, as JSON rows (a model dump per file cost ~3 ms a batch, paid
    for every batch of every run: a refresh looks up each batch's key), hashed before it joins the settings (inside
    stable_hash's JSON the rows would be escaped once more: 0.5 us a file, and the key is made three times a run)."""
    files = json.dumps([ingest_batches.input_row(inp) for inp in batch])
    return "ingest-batch-" + stable_hash(hashlib.sha256(files.encode()).hexdigest(), cfg, INGEST_CODE)


def clean_key(
    shards: list[ArtifactRef], eval_shards: list[ArtifactRef], quarantined: list[QuarantineRecord], cfg: CleanConfig
) -> str:
    """The clean stage's inputs are the shards' content (in order: it is the kept corpus's order) and every quarantined
    unit; a shard holds its files' uris and rows, so the per-file records add nothing to the key."""
    output_settings = cfg.model_dump(exclude={"duckdb_memory_limit"})  # memory limits change speed, not results
    return "clean-" + stable_hash(
        [s.sha256 for s in shards],
        [s.sha256 for s in eval_shards],
        sorted(quarantined, key=lambda q: (q.kind, q.source, q.file, q.position, q.reason)),
        output_settings,
        CLEAN_CODE,
    )


@task(name="discover-inputs", cache_policy=NO_CACHE)
def discover_task(
    data: DataConfig, store_uri: str | None = None, memo_key: str | None = None
) -> tuple[list[InputFile], list[InputFile], list[QuarantineRecord]]:
    """List and fingerprint every input file. Never cached: it is how new or changed files are seen. With a store
    and `memo_key`, a local file unchanged since its last hashing (size, mtime, inode) is not read again."""
    store = memo = None
    if store_uri and memo_key:
        store = open_store(store_uri)
        memo = FingerprintMemo.from_parquet(store.read_key(memo_key)) if store.exists(memo_key) else FingerprintMemo()
    found: dict[str, list[InputFile]] = {"domain": [], "general": [], "eval": []}
    refused: list[QuarantineRecord] = []
    for kind, sources in (("domain", data.domain), ("general", data.general), ("eval", data.eval)):
        for source in sources:
            files, bad = discovery.discover_inputs(source, kind, memo)
            found[kind] += files
            refused += bad
    if store and memo and memo.changed:
        store.put_bytes(memo.to_parquet(), memo_key)
    require_complete_eval_sets(refused)
    inputs, evals = found["domain"] + found["general"], found["eval"]
    return inputs, evals, refused


@task(
    name="ingest-batch",
    task_run_name="ingest {batch[0].source}: batch from {batch[0].uri}",
    cache_key_fn=lambda ctx, p: ingest_batch_key(p["batch"], p["cfg"]),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_worthwhile,
)
def ingest_batch_task(
    batch: list[InputFile],
    cfg: IngestConfig,
    store_uri: str,
    earlier: list[IngestBatchManifest],
    engine: PrepareConfig,
) -> IngestBatchManifest:
    """Read a batch of files into one Parquet shard (on `engine`); cached on the files' content hashes, so only
    batches with a new or changed file run, and in those only that file is read (`earlier`: the batches of the last
    run, whose unchanged files are copied; neither it nor the engine is part of the cache key)."""
    key = ingest_batch_key(batch, cfg)
    check_result_record(store_uri, key)
    job = ingest_batches.BatchJob(
        inputs=batch,
        keys=ingest_keys(batch, cfg),
        cfg=cfg,
        store_uri=store_uri,
        shard_key=layout.ingest_shard_key(batch[0].kind, batch[0].source, key),
        files_key=layout.ingest_files_key(batch[0].kind, batch[0].source, key),
        earlier=[] if refresh_requested() else earlier,  # --refresh reads every file
    )
    [out] = open_engine(engine).map(ingest_batches.run_batch, [job])
    return IngestBatchManifest(
        shard=out.shard,
        files=out.files,
        file_count=len(batch),
        first_uri=min(inp.uri for inp in batch),
        last_uri=max(inp.uri for inp in batch),
        docs=out.docs,
        quarantined=out.quarantined,
        code_version=INGEST_CODE,
    )


@task(
    name="clean-dedup-stats",
    cache_key_fn=lambda ctx, p: clean_key(p["shards"], p["eval_shards"], p["quarantined"], p["cfg"]),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_condition_fn=retry_if_worthwhile,
)
def clean_task(
    shards: list[ArtifactRef],
    eval_shards: list[ArtifactRef],
    quarantined: list[QuarantineRecord],
    cfg: CleanConfig,
    store_uri: str,
    engine: PrepareConfig,
) -> CleanManifest:
    """Normalise, filter, decontaminate and deduplicate the whole corpus in DuckDB.

    Write kept docs, decisions and stats. `shards`: the ingest shards, each once; `quarantined`: every input unit
    ingest could not read (files refused at discovery and units inside files). Shards, not per-file records, are the
    parameters: Prefect walks every parameter, which costs seconds for 10,000 files.
    """
    key = clean_key(shards, eval_shards, quarantined, cfg)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    paths = [store.local_path(ref) for ref in shards]
    eval_paths = [store.local_path(ref) for ref in eval_shards]
    # Each shard's per-document pass is kept in the store: a refresh runs it for new shards only.
    parts = StorePartCache(store, {path: ref.sha256 for path, ref in zip(paths, shards)}, CLEAN_CODE)
    with leftovers.temp_dir("clean") as tmp:
        # On Ray the per-shard parts go to this folder: on a multi-node cluster, TMPDIR must be shared storage.
        out = clean.clean_corpus(paths, eval_paths, quarantined, cfg, Path(tmp), open_engine(engine), parts)
        prefix = layout.clean_prefix(key)
        put = lambda p, name: store.put_file(p, f"{prefix}/{name}")  # noqa: E731
        stats_json = Path(tmp) / "stats.json"
        stats_json.write_text(json.dumps(out.stats, indent=2, sort_keys=True, default=str))
        stats_md = Path(tmp) / "stats.md"
        stats_md.write_text(out.stats_markdown)
        return CleanManifest(
            domain=KeptCorpus(parts=out.domain_parts) if out.domain_parts else None,
            general=KeptCorpus(parts=out.general_parts) if out.general_parts else None,
            decisions=put(out.decisions_path, "decisions.parquet"),
            stats_json=put(stats_json, "stats.json"),
            stats_md=put(stats_md, "stats.md"),
            input_docs=out.input_docs,
            kept_docs=out.kept_docs,
            dropped=out.dropped,
            sources=out.sources,
            quarantined=out.quarantined,
            code_version=CLEAN_CODE,
        )


def publish_data_report(cm: CleanManifest, store_uri: str) -> None:
    """Show the data funnel and per-source stats in the Prefect UI (every run, cached or not)."""
    create_table_artifact(
        key="dapt-data-funnel",
        table=[
            {
                "source": s.source,
                "kind": s.kind,
                "input": s.input_docs,
                "kept": s.kept_docs,
                "est_tokens": s.kept_est_tokens,
                **s.dropped,
            }
            for s in cm.sources
        ],
        description=f"Kept / dropped documents per source ({cm.input_docs} in, {cm.kept_docs} kept).",
    )
    create_markdown_artifact(key="dapt-data-stats", markdown=open_store(store_uri).read_text(cm.stats_md))
