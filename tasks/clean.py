"""Prefect tasks of the clean stage: normalise, filter, decontaminate and deduplicate the ingested shards; publish the
data funnel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import dapt_core.clean as clean
from dapt.tasks.caching import check_result_record
from dapt.tasks.retries import retry_if_worthwhile
from dapt_core import layout, leftovers
from dapt_core.clean.parts import StorePartCache
from dapt_core.config import CleanConfig, PrepareConfig
from dapt_core.engine import open_engine
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import ArtifactRef, CleanManifest, KeptCorpus, QuarantineRecord
from dapt_core.store import open_store

# The task module itself is part of the code version: a custom cache key replaces Prefect's task-source hash.
CLEAN_CODE = code_version(clean.clean_corpus, task_module=sys.modules[__name__])


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
