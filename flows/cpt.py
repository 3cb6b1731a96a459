"""`dapt cpt`: training data (cached subflow) → base eval → CPT attempts with forgetting checks and rollback."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dapt_core.config import DaptConfig
from dapt_core import layout
from dapt_core.forgetting import ForgettingPolicy, rollback_plan
from dapt_core.manifest import CptManifest, DirRef, TrainingDataManifest
from dapt_core.model import base_fingerprint
from dapt_core.model_card import provenance_of
from dapt_core.preflight import check_before_data_stages
from dapt_core.store import open_store
from flows.interrupt import handle_signals
from flows.training_data import training_data_flow
from tasks.caching import result_storage_for
from tasks.cpt import base_eval_task, cpt_task, original_base_eval_task
from tasks.training_data import pack_task


def _summary(m: CptManifest) -> dict:
    return {
        "attempt": m.attempt, "lr": m.lr, "general_fraction": m.general_fraction, "accepted": m.accepted,
        "best_step": m.best_step, "stopped_at": m.stopped_at, "start_model": m.start_model,
        "promoted": m.promoted.uri if m.promoted else None, "decisions": m.decisions, "report_md": m.report_md.uri,
    }


def _best_metric(m: CptManifest, policy: ForgettingPolicy) -> float:
    value = next(d["metrics"][policy.config.primary_metric] for d in m.decisions if d["step"] == m.best_step)
    return -value if policy.config.primary_higher_is_better else value


@flow(name="dapt-cpt", log_prints=True)
def cpt_flow(
    config: DaptConfig,
    data: TrainingDataManifest | None = None,
    start: DirRef | None = None,
    reference: DirRef | None = None,
    output_key: str | None = None,
) -> CptManifest:
    """Continual pretraining with rollback.

    `start` is the model CPT continues from (default: the tokenizer stage's extended base; a nightly refresh starts
    from the last promoted model) and `reference` the extended base, evaluated for the report. Every checkpoint is
    judged against the ORIGINAL base model (config.model, before tokenizer extension; cached, so the pipeline's own
    evaluation of it is reused), also in a nightly refresh. Attempt 0 uses
    config.train and config.mix and stops at the first rejected checkpoint. Then, up to eval.max_attempts attempts,
    training rolls back to the best accepted checkpoint so far (or the start model) and continues with the LR halved
    and the replay fraction doubled (`rollback_plan`), re-packed through the cached pack stage. The promoted model is
    the accepted checkpoint with the best domain metric over all attempts. Returns that attempt's manifest (the last
    one when nothing was accepted) with every attempt in `attempts`; with `output_key` it is also written to the store
    (how a caller reads the result of this flow run as a deployment on a GPU work pool).
    """
    with handle_signals():  # SIGTERM (a cancel) stops training with a checkpoint; Prefect's handler would not
        return _cpt_attempts(config, data, start, reference, output_key)


def _cpt_attempts(
    config: DaptConfig, data: TrainingDataManifest | None, start: DirRef | None, reference: DirRef | None, output_key: str | None
) -> CptManifest:
    log = get_run_logger()
    if data is None:
        check_before_data_stages(config)
        data = training_data_flow(config)
    start = start or data.tokenizer.model
    reference = reference or data.tokenizer.model
    storage = result_storage_for(config.store)
    policy = ForgettingPolicy.from_config(config.eval)
    original = original_base_eval_task.with_options(result_storage=storage).submit(
        config.model, base_fingerprint(config.model), data.pack, config.eval, config.store
    ).result()
    base = base_eval_task.with_options(result_storage=storage).submit(reference, data.pack, config.eval, config.store).result()

    attempt, train_cfg, pack = 0, config.train, data.pack
    history: list[dict] = []
    best: CptManifest | None = None
    while True:
        result = cpt_task.with_options(result_storage=storage).submit(
            start, pack, train_cfg, config.eval, original, config.store, attempt, data.tokenizer.new_token_ids,
            provenance_of(config, data),
        ).result()
        history.append(_summary(result))
        if result.accepted and (best is None or _best_metric(result, policy) < _best_metric(best, policy)):
            best = result
        if result.stopped_at is None:
            log.info("attempt %d ran to the end within the forgetting limits", attempt)
            break
        plan = rollback_plan(attempt, config)
        if plan is None:
            log.warning("attempt %d rejected at step %d and no attempts are left (eval.max_attempts)", attempt, result.stopped_at)
            break
        if best is not None:
            start = best.promoted
        log.warning(
            "attempt %d rejected at step %d: rolling back to %s, lr=%.3g, general_fraction=%.3g (attempt %d)",
            attempt, result.stopped_at, start.uri, plan.lr, plan.general_fraction, plan.attempt,
        )
        mix = config.mix.model_copy(update={"general_fraction": plan.general_fraction})
        pack = pack_task.with_options(result_storage=storage).submit(
            data.prepare.clean, data.tokenizer, mix, config.model, config.store, data.refresh_basis
        ).result()
        train_cfg = config.train.model_copy(update={"lr": plan.lr})
        attempt = plan.attempt
    final = (best or result).model_copy(update={"attempts": history, "base_metrics": dict(base.metrics)})
    if best is None:
        log.warning("no checkpoint of %d attempt(s) passed the forgetting policy: nothing promoted", len(history))
    else:
        log.info("promoted: attempt %d step %d -> %s", best.attempt, best.best_step, best.promoted.uri)
    store = open_store(config.store)
    create_markdown_artifact(
        key="dapt-cpt-report", markdown=store.read_text(final.report_md), description=f"CPT forgetting evaluation of {config.project}"
    )
    store.put_text(final.model_dump_json(indent=1), layout.latest_manifest_key(config.project, "cpt"))
    if output_key:
        store.put_text(final.model_dump_json(), output_key)
    return final
