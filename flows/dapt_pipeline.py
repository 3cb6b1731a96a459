"""The whole DAG as one flow, and the nightly refresh.

dapt-pipeline: ingest → clean/dedup/stats → tokenizer extension → packing → CPT + forgetting eval + rollback →
SFT → final report. Every stage is a task cached on the content hashes of its inputs, its config section and its
code version, with results persisted in the artifact store: a retry (Prefect UI, `prefect flow-run retry`, or
`dapt run` again, on any worker that reaches the store) recomputes only the stage that failed and those after it.

nightly-refresh: compares the discovered inputs with the last success of its lineage (`lineage_of`); when nothing
changed it stops there. Otherwise only new or changed files are ingested (ingest is cached per file), the corpus is
re-cleaned, and packing takes the documents new to the lineage plus a replay share of earlier ones (the held-out split
fixed by the lineage), with the SAME tokenizer; CPT continues from the lineage's last promoted model, still judged
against the original base. When no new document survived cleaning, it stops before CPT.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from dapt.flows.cpt import cpt_flow
from dapt.flows.interrupt import handle_signals
from dapt.flows.preflight import check_before_first_stage
from dapt.flows.prepare import discover
from dapt.flows.training_data import training_data_flow
from dapt.tasks.caching import result_storage_for
from dapt.tasks.cpt import original_base_eval_task
from dapt.tasks.credentials import use_store_credentials
from dapt.tasks.sft import sft_task
from dapt_core import layout, leftovers
from dapt_core.config import DaptConfig
from dapt_core.forgetting import ForgettingPolicy
from dapt_core.hashing import stable_hash
from dapt_core.ingest_batches import file_records
from dapt_core.manifest import (
    CptManifest,
    DirRef,
    PipelineManifest,
    PrepareManifest,
    RefreshBasis,
    RunState,
    TrainingDataManifest,
)
from dapt_core.model import base_fingerprint
from dapt_core.model_card import provenance_of
from dapt_core.report import inline_images, write_pipeline_report
from dapt_core.store import ArtifactStore, open_store


def lineage_of(config: DaptConfig) -> str:
    """`deploy.lineage`, else the deployment this flow run belongs to, else 'local' (the CLI, a test)."""
    if config.deploy.lineage:
        return config.deploy.lineage
    from prefect.runtime import deployment, flow_run

    if deployment.name is None:
        return "local"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{flow_run.flow_name}-{deployment.name}").strip("-")


def load_state_at(store: ArtifactStore, project: str, lineage: str) -> RunState | None:
    key = layout.lineage_state_key(project, lineage)
    return RunState.model_validate_json(store.read_key(key)) if store.exists(key) else None


def load_state(config: DaptConfig, lineage: str = "local") -> RunState | None:
    return load_state_at(open_store(config.store), config.project, lineage)


@flow(name="dapt-pipeline", log_prints=True, persist_result=False)
def dapt_pipeline(config: DaptConfig) -> PipelineManifest:
    """Base model + domain documents → a domain-adapted model that did not forget, and its report."""
    use_store_credentials(config)
    return run_stages(config, lineage_of(config))


class RefreshManifest(BaseModel):
    changed: bool = Field(description="False: the inputs are those of the last successful run; nothing was run.")
    new_or_changed: list[str] = Field(
        default_factory=list, description="Input uris new or changed since the last success."
    )
    removed: list[str] = Field(default_factory=list, description="Input uris of the last success that are gone.")
    pipeline: PipelineManifest | None = None
    lineage: str = ""


@flow(name="nightly-refresh", log_prints=True, persist_result=False)
def nightly_refresh(config: DaptConfig) -> RefreshManifest:
    """Re-run on what changed since the lineage's last success, continuing CPT from its last promoted model."""
    log = get_run_logger()
    use_store_credentials(config)
    lineage = lineage_of(config)
    state = load_state(config, lineage)
    inputs, evals, _ = discover(config)
    current = dict(zip(inputs.uri + evals.uri, inputs.fingerprint + evals.fingerprint))
    if state is None or state.config_hash != config.result_hash():
        why = (
            "no successful run of lineage %r yet"
            if state is None
            else "the config changed since the last success of lineage %r"
        )
        log.info(why + ": running the full pipeline from the base model", lineage)
        return RefreshManifest(
            changed=True, new_or_changed=sorted(current), pipeline=run_stages(config, lineage), lineage=lineage
        )
    new_or_changed = sorted(u for u, f in current.items() if state.inputs.get(u) != f)
    removed = sorted(set(state.inputs) - set(current))
    if not new_or_changed and not removed:
        log.info(
            "nothing changed since the last success of lineage %r (%d inputs): nothing to do", lineage, len(current)
        )
        return RefreshManifest(changed=False, lineage=lineage)
    log.info(
        "%d new or changed input(s), %d removed: lineage %r continues CPT from %s",
        len(new_or_changed),
        len(removed),
        lineage,
        state.promoted.uri,
    )
    pipeline = run_stages(config, lineage, state)
    return RefreshManifest(
        changed=True, new_or_changed=new_or_changed, removed=removed, pipeline=pipeline, lineage=lineage
    )


def run_stages(config: DaptConfig, lineage: str, state: RunState | None = None) -> PipelineManifest | None:
    """The stages of dapt-pipeline. A refresh gives the lineage's `state`: keep its vocabulary, pack what is new to it,
    continue CPT from its promoted model; it returns None, before CPT, when no new document survived cleaning."""
    log = get_run_logger()
    storage = result_storage_for(config.store)
    store = open_store(config.store)

    check_before_first_stage(config, config.deploy.cpt_deployment)
    start = state.promoted if state else None
    data = training_data_flow(
        config, tokenizer=state.tokenizer if state else None, refresh=state.refresh_basis if state else None
    )
    prepared, tokenizer, pack = data.prepare, data.tokenizer, data.pack
    if state and prepared.new:
        log.info(
            "refresh: %d documents in %d new or changed files; %d near "
            "and %d exact duplicates of earlier documents dropped",
            prepared.new.docs,
            prepared.new.files,
            prepared.new.near_duplicates_of_earlier,
            prepared.new.exact_duplicates_of_earlier,
        )
    if pack.refresh is not None and pack.refresh.new_documents == 0:
        log.info(
            "no new domain document was kept since the last success of lineage %r (dropped by the filters, duplicates "
            "or held out): nothing to train, the lineage stays at %s",
            lineage,
            state.promoted.uri,
        )
        _save_state(store, state.model_copy(update={"inputs": _ingested(prepared)}), config.project)
        return None
    # The reference of the forgetting policy (cpt_flow reads it back from the cache). Before CPT, not beside it: two
    # models in memory at once doubled the demo's peak RSS.
    original = (
        original_base_eval_task.with_options(result_storage=storage)
        .submit(config.model, base_fingerprint(config.model), pack, config.eval, config.store)
        .result()
    )
    cpt = _cpt_stage(config, data, start)  # step-level bars and UI artifacts: tasks/progress.py
    if cpt.without_extension is not None:  # tokenizer.on_no_gain: CPT ran again with the base tokenizer
        data = cpt.without_extension
        prepared, tokenizer, pack = data.prepare, data.tokenizer, data.pack

    sft = None
    if config.sft.data and cpt.promoted is not None:
        with handle_signals():  # SIGTERM (a cancel) stops SFT with a checkpoint; Prefect's handler would not
            sft = (
                sft_task.with_options(result_storage=storage)
                .submit(
                    cpt.promoted, pack, config.sft, config.eval, original, config.store, provenance_of(config, data)
                )
                .result()
            )
    elif config.sft.data:
        log.warning("SFT skipped: no CPT model was promoted (%s)", cpt.gain.verdict if cpt.gain else "nothing accepted")

    run_key = stable_hash(data.pack.train_shards, cpt.promoted, sft.model if sft else None)[:16]
    with leftovers.temp_dir("report") as tmp:
        paths = write_pipeline_report(
            Path(tmp),
            project=config.project,
            clean=prepared.clean,
            tokenizer=tokenizer,
            pack=pack,
            cpt=cpt,
            sft=sft,
            original_base=original.metrics,
            policy=ForgettingPolicy.from_config(config.eval),
        )
        refs = {k: store.put_file(p, layout.run_report_key(config.project, run_key, p.name)) for k, p in paths.items()}
        markdown = inline_images(
            paths["md"].read_text(encoding="utf-8"), {k: paths[k] for k in ("funnel", "checkpoints")}
        )
    create_markdown_artifact(key="dapt-report", markdown=markdown, description=f"dapt report of {config.project}")

    final_model = sft.model if sft is not None and sft.accepted else cpt.promoted
    result = PipelineManifest(
        project=config.project,
        data=data,
        cpt=cpt,
        sft=sft,
        final_model=final_model,
        report_md=refs["md"],
        report_json=refs["json"],
        plots={k: refs[k] for k in ("funnel", "checkpoints")},
        refresh_of=start.uri if start else None,
    )
    store.put_text(result.model_dump_json(indent=1), layout.latest_manifest_key(config.project, "pipeline"))
    if cpt.promoted is not None:
        success = RunState(
            lineage=lineage,
            generation=state.generation + 1 if state else 0,
            inputs=_ingested(prepared),
            config_hash=config.result_hash(),
            tokenizer=tokenizer,
            promoted=cpt.promoted,
            report_md=refs["md"],
            refresh_basis=RefreshBasis(seen_domain=prepared.clean.domain, heldout_fractions=pack.heldout_fractions)
            if prepared.clean.domain
            else None,
        )
        _advance(store, config.project, success, started_from=start)
    log.info("report: %s; model: %s", refs["md"].uri, final_model.uri if final_model else "none promoted")
    return result


def _ingested(prepared: PrepareManifest) -> dict[str, str]:
    """The fingerprints of exactly what a run ingested: what the next refresh compares against."""
    records = file_records(open_store(prepared.store), prepared.ingested + prepared.evals)
    return {m.input.uri: m.input.fingerprint for m in records}


def _save_state(store: ArtifactStore, state: RunState, project: str) -> None:
    store.put_text(state.model_dump_json(indent=1), layout.lineage_state_key(project, state.lineage))


def _advance(store: ArtifactStore, project: str, success: RunState, started_from: DirRef | None) -> None:
    """Record a success as its lineage's state unless that would move the lineage back: a run from the base (a cached
    `dapt run`, say) with the config the lineage has since refreshed under leaves the newer promoted model in place."""
    log = get_run_logger()
    current = load_state_at(store, project, success.lineage)
    moves_back = (
        current is not None
        and current.generation > 0
        and current.config_hash == success.config_hash
        and started_from != current.promoted
        and success.promoted != current.promoted
    )
    if moves_back:
        log.warning(
            "lineage %r is at generation %d (%s); this run started from %s and does not replace it",
            success.lineage,
            current.generation,
            current.promoted.uri,
            started_from.uri if started_from else "the base model",
        )
        return
    _save_state(store, success, project)


def _cpt_stage(config: DaptConfig, data: TrainingDataManifest, start: DirRef | None) -> CptManifest:
    """CPT in this flow run, or as a run of `deploy.cpt_deployment` (a GPU work pool) whose result is read back from
    the store: flow results of another worker are not returned through the API."""
    reference = data.tokenizer.model
    if not config.deploy.cpt_deployment:
        return cpt_flow(config, data=data, start=start, reference=reference)
    from prefect.deployments import run_deployment

    key = layout.cpt_result_key(config.project, stable_hash(data.pack, start, config.train, config.eval))
    run = run_deployment(
        config.deploy.cpt_deployment,
        parameters={
            "config": config.model_dump(mode="json", by_alias=True),
            "data": data.model_dump(mode="json"),
            "start": start.model_dump(mode="json") if start else None,
            "reference": reference.model_dump(mode="json"),
            "output_key": key,
        },
    )
    if not run.state or not run.state.is_completed():
        raise RuntimeError(
            f"CPT deployment {config.deploy.cpt_deployment} run {run.id} "
            f"ended {run.state.name if run.state else 'without a state'}"
        )
    return CptManifest.model_validate_json(open_store(config.store).read_key(key))
