"""`dapt prepare`: discover → ingest (per file, cached) → clean/dedup/stats (cached) → report."""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.futures import as_completed

from dapt_core.benchmarks import with_benchmark_texts
from dapt_core.config import DaptConfig
from dapt_core.manifest import PrepareManifest
from dapt_core import layout
from dapt_core.store import open_store
from tasks import progress
from tasks.caching import result_storage_for, was_cached
from dapt_core.ingest import require_complete_eval_sets
from tasks.data import clean_task, discover_task, ingest_task, publish_data_report


@flow(name="dapt-prepare", log_prints=True)
def prepare_flow(config: DaptConfig) -> PrepareManifest:
    """Turn the configured raw corpora into cleaned, deduplicated, decontaminated Parquet with per-source stats.

    Every task is cached on content (input file hashes + config section + code version) with its result
    persisted in the artifact store, so a re-run recomputes nothing, a new file is the only one ingested,
    and a retry after a failed clean does not re-ingest.
    """
    storage = result_storage_for(config.store)
    ingest = ingest_task.with_options(result_storage=storage)
    clean = clean_task.with_options(result_storage=storage)

    # Benchmark items are eval texts too: no training document may share a 13-gram with them.
    inputs, evals, refused = discover_task(with_benchmark_texts(config.data, config.eval))
    ingest_futures = ingest.map(inputs, cfg=unmapped(config.ingest), store_uri=unmapped(config.store))
    eval_futures = ingest.map(evals, cfg=unmapped(config.ingest), store_uri=unmapped(config.store))
    progress.stage("ingest files", total=len(inputs) + len(evals))
    for _ in as_completed(ingest_futures + eval_futures):
        progress.advance("ingest files")
    ingested = [f.result() for f in ingest_futures]
    eval_manifests = [f.result() for f in eval_futures]
    require_complete_eval_sets([], eval_manifests)

    progress.stage("clean, dedup, stats", total=1)
    clean_future = clean.submit(ingested, eval_manifests, refused, config.clean, config.store)
    clean_manifest = clean_future.result()
    progress.advance("clean, dedup, stats")
    publish_data_report(clean_manifest, config.store)

    runs = [(f"ingest:{m.input.uri}", f) for m, f in zip(ingested + eval_manifests, ingest_futures + eval_futures)]
    runs.append(("clean", clean_future))
    result = PrepareManifest(
        store=config.store,
        ingested=ingested,
        evals=eval_manifests,
        clean=clean_manifest,
        computed=[name for name, f in runs if not was_cached(f)],
        cached=[name for name, f in runs if was_cached(f)],
    )
    open_store(config.store).put_text(result.model_dump_json(indent=2), layout.latest_manifest_key(config.project, "prepare"))
    return result