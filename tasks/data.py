"""Prefect tasks of the data stages: discover → ingest (one task per file) → clean/dedup/stats."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import dapt_core.clean as clean
import dapt_core.ingest as ingest
from dapt_core import layout, leftovers, manifest
from dapt_core.config import CleanConfig, DataConfig, IngestConfig
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import CleanManifest, IngestManifest, InputFile, QuarantineRecord
from dapt_core.store import open_store
from tasks.caching import check_result_record
from tasks.retries import retry_if_worthwhile

# The task module itself is part of each code version: a custom cache key replaces Prefect's task-source hash.
INGEST_CODE = code_version(ingest, manifest, sys.modules[__name__])
CLEAN_CODE = code_version(clean, manifest, sys.modules[__name__])


def ingest_key(inp: InputFile, cfg: IngestConfig) -> str:
    return "ingest-" + stable_hash(inp, cfg, INGEST_CODE)


def clean_key(ingested: list[IngestManifest], evals: list[IngestManifest], quarantined: list[QuarantineRecord], cfg: CleanConfig) -> str:
    shards = lambda ms: sorted((m.shard.sha256 if m.shard else "", m.input.uri, m.quarantined) for m in ms)  # noqa: E731
    output_settings = cfg.model_dump(exclude={"duckdb_memory_limit"})  # memory limits change speed, not results
    return "clean-" + stable_hash(
        shards(ingested), shards(evals), sorted(quarantined, key=lambda q: (q.file, q.position)), output_settings, CLEAN_CODE
    )


@task(name="discover-inputs", cache_policy=NO_CACHE)
def discover_task(data: DataConfig) -> tuple[list[InputFile], list[InputFile], list[QuarantineRecord]]:
    """List and fingerprint every input file. Never cached: it is how new or changed files are seen."""
    found: dict[str, list[InputFile]] = {"domain": [], "general": [], "eval": []}
    refused: list[QuarantineRecord] = []
    for kind, sources in (("domain", data.domain), ("general", data.general), ("eval", data.eval)):
        for source in sources:
            files, bad = ingest.discover_inputs(source, kind)
            found[kind] += files
            refused += bad
    ingest.require_complete_eval_sets(refused)
    inputs, evals = found["domain"] + found["general"], found["eval"]
    return inputs, evals, refused


@task(
    name="ingest-file",
    task_run_name="ingest {inp.source}: {inp.uri}",
    cache_key_fn=lambda ctx, p: ingest_key(p["inp"], p["cfg"]),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_worthwhile,
)
def ingest_task(inp: InputFile, cfg: IngestConfig, store_uri: str) -> IngestManifest:
    """Read one file into a Parquet shard; cached on the file's content hash, so only new or changed files run."""
    key = ingest_key(inp, cfg)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    with leftovers.temp_dir("ingest") as tmp:
        out = Path(tmp) / "docs.parquet"
        docs, quarantined = ingest.ingest_file(inp, cfg, out)
        shard = store.put_file(out, layout.ingest_shard_key(inp.kind, inp.source, key)) if docs else None
    return IngestManifest(input=inp, shard=shard, docs=docs, quarantined=quarantined, code_version=INGEST_CODE)


@task(
    name="clean-dedup-stats",
    cache_key_fn=lambda ctx, p: clean_key(p["ingested"], p["evals"], p["quarantined"], p["cfg"]),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_condition_fn=retry_if_worthwhile,
)
def clean_task(
    ingested: list[IngestManifest],
    evals: list[IngestManifest],
    quarantined: list[QuarantineRecord],
    cfg: CleanConfig,
    store_uri: str,
) -> CleanManifest:
    """Normalise, filter, decontaminate and deduplicate the whole corpus in DuckDB; write kept docs, decisions and stats."""
    key = clean_key(ingested, evals, quarantined, cfg)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    shards = [store.local_path(m.shard) for m in ingested if m.shard]
    eval_shards = [store.local_path(m.shard) for m in evals if m.shard]
    all_quarantined = quarantined + [q for m in ingested for q in m.quarantined]
    with leftovers.temp_dir("clean") as tmp:
        out = clean.clean_corpus(shards, eval_shards, all_quarantined, cfg, Path(tmp))
        prefix = layout.clean_prefix(key)
        put = lambda p, name: store.put_file(p, f"{prefix}/{name}") if p else None  # noqa: E731
        stats_json = Path(tmp) / "stats.json"
        stats_json.write_text(_json(out.stats))
        stats_md = Path(tmp) / "stats.md"
        stats_md.write_text(out.stats_markdown)
        return CleanManifest(
            domain=put(out.domain_path, "domain.parquet"),
            general=put(out.general_path, "general.parquet"),
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


def _json(obj: object) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def publish_data_report(cm: CleanManifest, store_uri: str) -> None:
    """Show the data funnel and per-source stats in the Prefect UI (every run, cached or not)."""
    create_table_artifact(
        key="dapt-data-funnel",
        table=[
            {"source": s.source, "kind": s.kind, "input": s.input_docs, "kept": s.kept_docs, "est_tokens": s.kept_est_tokens, **s.dropped}
            for s in cm.sources
        ],
        description=f"Kept / dropped documents per source ({cm.input_docs} in, {cm.kept_docs} kept).",
    )
    create_markdown_artifact(key="dapt-data-stats", markdown=open_store(store_uri).read_text(cm.stats_md))
