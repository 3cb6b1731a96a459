"""`dapt cpt`: training data (cached subflow) → base eval → CPT attempts with forgetting checks and rollback."""

from __future__ import annotations

from prefect import flow, get_run_logger

from dapt_core.config import DaptConfig
from dapt_core.evaluate import rollback_plan
from dapt_core.manifest import CptManifest
from flows.training_data import training_data_flow
from tasks.caching import result_storage_for
from tasks.cpt import base_eval_task, cpt_task
from tasks.training_data import pack_task


def _summary(m: CptManifest) -> dict:
    return {
        "attempt": m.attempt, "lr": m.lr, "general_fraction": m.general_fraction, "accepted": m.accepted,
        "best_step": m.best_step, "promoted": m.promoted.uri if m.promoted else None, "decisions": m.decisions,
        "report_md": m.report_md.uri,
    }


@flow(name="dapt-cpt", log_prints=True)
def cpt_flow(config: DaptConfig) -> CptManifest:
    """Continual pretraining with rollback.

    Attempt 0 uses config.train and config.mix. When no checkpoint of an attempt passes the forgetting policy,
    `rollback_plan` halves the LR and doubles the replay fraction; the corpus is re-packed with that mix (the
    cached pack stage: a fraction packed before is not recomputed) and CPT runs again, up to eval.max_attempts
    attempts. Returns the last attempt's manifest, with every attempt's decisions in `attempts`.
    """
    log = get_run_logger()
    data = training_data_flow(config)
    storage = result_storage_for(config.store)
    base_metrics = base_eval_task.with_options(result_storage=storage).submit(
        data.tokenizer, data.pack, config.eval, config.store
    ).result()

    attempt, train_cfg, pack = 0, config.train, data.pack
    history: list[dict] = []
    while True:
        result = cpt_task.with_options(result_storage=storage).submit(
            data.tokenizer, pack, train_cfg, config.eval, base_metrics, config.store, attempt
        ).result()
        history.append(_summary(result))
        if result.accepted:
            log.info("attempt %d accepted: best step %s promoted to %s", attempt, result.best_step, result.promoted.uri)
            break
        plan = rollback_plan(attempt, config)
        if plan is None:
            log.warning("no attempt passed the forgetting policy after %d attempt(s): nothing promoted", attempt + 1)
            break
        log.warning(
            "attempt %d rejected: rolling back to lr=%.3g, general_fraction=%.3g (attempt %d)",
            attempt, plan.lr, plan.general_fraction, plan.attempt,
        )
        mix = config.mix.model_copy(update={"general_fraction": plan.general_fraction})
        pack = pack_task.with_options(result_storage=storage).submit(
            data.prepare.clean, data.tokenizer, mix, config.model, config.store
        ).result()
        train_cfg = config.train.model_copy(update={"lr": plan.lr})
        attempt = plan.attempt
    return result.model_copy(update={"attempts": history})
