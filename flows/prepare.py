"""`dapt prepare`: discover → ingest (batches of files, cached) → clean/dedup/stats (cached) → report."""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.futures import PrefectFuture, as_completed
from prefect.utilities.annotations import quote

from dapt.tasks import progress
from dapt.tasks.caching import finished_result, result_storage_for, was_cached
from dapt.tasks.clean import clean_task, publish_data_report
from dapt.tasks.credentials import use_store_credentials
from dapt.tasks.ingest import discover_task, ingest_batch_key, ingest_batch_task
from dapt_core import layout
from dapt_core.benchmarks import with_benchmark_texts
from dapt_core.clean.decontam import require_complete_eval_sets
from dapt_core.clean.stats import new_documents
from dapt_core.config import DaptConfig
from dapt_core.ingest_batches import file_records, plan_batches, read_uris
from dapt_core.input_files import InputFiles
from dapt_core.manifest import ArtifactRef, IngestBatchManifest, PrepareManifest, QuarantineRecord
from dapt_core.memory import long_lived_heap
from dapt_core.store import ArtifactStore, open_store


def discover(config: DaptConfig) -> tuple[InputFiles, InputFiles, list[QuarantineRecord]]:
    """The input and eval files with their fingerprints (and the refused ones), as every flow sees them. Benchmark
    items are eval texts too: no training document may share a 13-gram with them. A file whose size, mtime and inode
    are those of its last hashing is not read again (prepare.rehash_inputs)."""
    memo_key = None if config.prepare.rehash_inputs else layout.input_fingerprints_key(config.project)
    return discover_task(with_benchmark_texts(config.data, config.eval), config.store, memo_key)


@flow(name="dapt-prepare", log_prints=True, persist_result=False)
def prepare_flow(config: DaptConfig) -> PrepareManifest:
    """Turn the configured raw corpora into cleaned, deduplicated, decontaminated Parquet with per-source stats.

    Every task is cached on content (input file hashes + config section + code version) with its result
    persisted in the artifact store, so a re-run recomputes nothing, a new file is the only one ingested,
    and a retry after a failed clean does not re-ingest.
    """
    use_store_credentials(config)
    storage = result_storage_for(config.store)
    ingest = ingest_batch_task.with_options(result_storage=storage)
    clean = clean_task.with_options(result_storage=storage)

    with long_lived_heap() as settled:  # the file lists live as long as the run: no collector pass walks them
        inputs, evals, refused = discover(config)
        settled()
        earlier_batches = _earlier_batches(config)
        ends = {b.last_uri for b in earlier_batches if b.last_uri}  # files added after a batch start a new one
        batches = {
            name: plan_batches(files, config.ingest.batch_bytes, config.ingest.batch_files, ends)
            for name, files in (("inputs", inputs), ("evals", evals))
        }
        store = open_store(config.store)
        # A batch finished before is read from its result record, without a task run: a refresh runs only new batches.
        finished = {
            name: [finished_result(store, ingest_batch_key(batch, config.ingest)) for batch in found]
            for name, found in batches.items()
        }
        # quote: Prefect walks every parameter it is handed (~7 us a field); file lists hold no futures to look for.
        earlier = quote(unmapped(earlier_batches))
        futures = {
            name: ingest.map(
                quote([batch.models() for batch, done in zip(found, finished[name]) if done is None]),
                cfg=unmapped(config.ingest),
                store_uri=unmapped(config.store),
                earlier=earlier,
                engine=unmapped(config.prepare),
            )
            for name, found in batches.items()
        }
        progress.stage("ingest files", total=len(inputs) + len(evals))
        progress.advance(
            "ingest files", sum(done.file_count for done in finished["inputs"] + finished["evals"] if done)
        )
        for done in as_completed(futures["inputs"] + futures["evals"]):
            progress.advance("ingest files", done.result().file_count)
        runs = {name: _in_batch_order(finished[name], list(futures[name])) for name in batches}
        batch_results = {
            name: [done or run.result() for done, run in zip(finished[name], runs[name])] for name in batches
        }
        require_complete_eval_sets([], file_records(store, batch_results["evals"]))

        progress.stage("clean, dedup, stats", total=1)
        shards, eval_shards = (_distinct_shards(batch_results[name]) for name in ("inputs", "evals"))
        quarantined = refused + [q for b in batch_results["inputs"] for q in b.quarantined]
        clean_future = clean.submit(shards, eval_shards, quarantined, config.clean, config.store, config.prepare)
        clean_manifest = clean_future.result()
        progress.advance("clean, dedup, stats")
        publish_data_report(clean_manifest, config.store)

        # A file is read when this run read it; a file of a finished batch, or copied from an earlier shard, is reused.
        read = {name: _read_now(store, batches[name], runs[name], batch_results[name]) for name in batches}
        files_read = sum(now for _, now in read["inputs"] + read["evals"])
        files_reused = len(read["inputs"]) + len(read["evals"]) - files_read
        clean_computed = not was_cached(clean_future)
        read_now = {uri for uri, now in read["inputs"] if now}  # training files only: eval files have no decisions
        new = new_documents(store.local_path(clean_manifest.decisions), read_now) if read_now else None
        if new:
            print(
                f"{new.docs} documents in {new.files} files read now: {new.near_duplicates_of_earlier} near and "
                f"{new.exact_duplicates_of_earlier} exact duplicates of earlier documents dropped"
            )
        result = PrepareManifest(
            store=config.store,
            ingested=batch_results["inputs"],
            evals=batch_results["evals"],
            clean=clean_manifest,
            new=new,
            files_read=files_read,
            files_reused=files_reused,
            computed=(["ingest"] if files_read else []) + (["clean"] if clean_computed else []),
            cached=(["ingest"] if files_reused else []) + ([] if clean_computed else ["clean"]),
        )
        store.put_text(result.model_dump_json(indent=2), layout.latest_manifest_key(config.project, "prepare"))
        return result


def _in_batch_order(finished: list[object | None], futures: list[PrefectFuture]) -> list[PrefectFuture | None]:
    """The task run of each batch, in batch order: None for a batch finished before (no run), else the next future."""
    pending = iter(futures)
    return [None if done is not None else next(pending) for done in finished]


def _read_now(
    store: ArtifactStore,
    batches: list[InputFiles],
    runs: list[PrefectFuture | None],
    results: list[IngestBatchManifest],
) -> list[tuple[str, bool]]:
    """(uri, read by this run) per file, in order: a batch finished before (no task run, or a cached one) read none of
    its files; a computed one says which it read (the others were copied from an earlier shard) in its per-file
    records."""
    read: list[tuple[str, bool]] = []
    for batch, run, result in zip(batches, runs, results):
        now = set() if run is None or was_cached(run) else read_uris(store.local_path(result.files))
        read += [(uri, uri in now) for uri in batch.uri]
    return read


def _distinct_shards(batches: list[IngestBatchManifest]) -> list[ArtifactRef]:
    """The batches' shards, each once, in order (a batch without documents has none)."""
    return list({b.shard.uri: b.shard for b in batches if b.shard}.values())


def _earlier_batches(config: DaptConfig) -> list[IngestBatchManifest]:
    """The ingest batches of the project's last prepare (data only: validated as a manifest), so that a batch
    recomputed for one new or changed file copies the other files' rows; none when there is no readable one."""
    store = open_store(config.store)
    key = layout.latest_manifest_key(config.project, "prepare")
    if not store.exists(key):
        return []
    try:
        last = PrepareManifest.model_validate_json(store.read_key(key))
    except ValueError:
        return []
    return last.ingested + last.evals
