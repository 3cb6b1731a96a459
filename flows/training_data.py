"""`dapt pack`: the data stages (cached `dapt-prepare` subflow), then tokenizer extension and mixed-corpus packing."""

from __future__ import annotations

from prefect import flow

from dapt.flows.prepare import prepare_flow
from dapt.tasks import progress
from dapt.tasks.caching import result_storage_for, was_cached
from dapt.tasks.credentials import use_store_credentials
from dapt.tasks.training_data import extend_tokenizer_task, pack_task, publish_tokenizer_report
from dapt_core import layout
from dapt_core.config import DaptConfig
from dapt_core.manifest import RefreshBasis, TokenizerManifest, TrainingDataManifest
from dapt_core.model import base_fingerprint
from dapt_core.store import open_store


@flow(name="dapt-training-data", log_prints=True, persist_result=False)
def training_data_flow(
    config: DaptConfig, tokenizer: TokenizerManifest | None = None, refresh: RefreshBasis | None = None
) -> TrainingDataManifest:
    """Cleaned corpora → extended tokenizer + resized model → packed, mixed training shards and eval splits.

    Each stage is cached on the content hashes of its inputs (corpus shards, base model files), its
    config section and its code version, so only what changed is recomputed. A given `tokenizer` (a nightly
    refresh keeps the vocabulary its promoted model was trained with) skips the extension; a `refresh` basis packs
    only what is new to the lineage (plus replay), with its fixed held-out split.
    """
    use_store_credentials(config)
    prepared = prepare_flow(config)
    storage = result_storage_for(config.store)
    runs = []
    if tokenizer is None:
        tok_future = extend_tokenizer_task.with_options(result_storage=storage).submit(
            prepared.clean, base_fingerprint(config.model), config.model, config.tokenizer, config.mix, config.store
        )
        progress.stage("tokenizer extension", total=1)
        tokenizer = tok_future.result()
        progress.advance("tokenizer extension")
        publish_tokenizer_report(tokenizer, config.store)
        runs.append(("tokenizer", tok_future))
    pack_future = pack_task.with_options(result_storage=storage).submit(
        prepared.clean, tokenizer, config.mix, config.model, config.store, refresh
    )
    progress.stage("packing", total=1)
    packed = pack_future.result()
    progress.advance("packing")
    runs.append(("pack", pack_future))
    result = TrainingDataManifest(
        prepare=prepared,
        tokenizer=tokenizer,
        pack=packed,
        refresh_basis=refresh,
        computed=prepared.computed + [n for n, f in runs if not was_cached(f)],
        cached=prepared.cached + [n for n, f in runs if was_cached(f)],
    )
    open_store(config.store).put_text(
        result.model_dump_json(indent=1), layout.latest_manifest_key(config.project, "training-data")
    )
    return result
