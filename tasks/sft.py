"""Prefect task for supervised fine-tuning of the promoted CPT model: one attempt of dapt_core/sft.py (train, the same
forgetting evaluation against the original base plus held-out response loss / accuracy, judge, save), cached on
content. A stopped attempt resumes from its journal on the next run."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task

from dapt.tasks import progress
from dapt.tasks.caching import check_result_record, eval_set_hashes
from dapt.tasks.child import run_in_child, task_log
from dapt_core import layout, leftovers
from dapt_core.config import EvalConfig, SftConfig, TrainConfig
from dapt_core.evaluate import EvalResult
from dapt_core.hashing import code_version, sha256_file, stable_hash
from dapt_core.manifest import DirRef, PackManifest, SftManifest
from dapt_core.model_card import ModelProvenance
from dapt_core.sft import SftAttemptSpec, run_sft_attempt

SFT_CODE = code_version(run_sft_attempt, task_module=sys.modules[__name__])


def sft_key(model: DirRef, pack: PackManifest, sft_cfg: SftConfig, eval_cfg: EvalConfig, reference: EvalResult) -> str:
    data = [sha256_file(p) for p in sft_cfg.data]  # content, not paths: an edited file re-runs SFT
    cfg = sft_cfg.model_dump(mode="json", exclude={"train": set(TrainConfig.NOT_TRAINED)})
    return "sft-" + stable_hash(model.sha256, data, cfg, eval_cfg, eval_set_hashes(pack), reference, SFT_CODE)


@task(
    name="sft",
    cache_key_fn=lambda ctx, p: sft_key(p["model"], p["pack"], p["sft_cfg"], p["eval_cfg"], p["reference"]),
    persist_result=True,
    result_serializer="json",
)
def sft_task(
    model: DirRef,
    pack: PackManifest,
    sft_cfg: SftConfig,
    eval_cfg: EvalConfig,
    reference: EvalResult,
    store_uri: str,
    provenance: ModelProvenance | None = None,
) -> SftManifest:
    """Fine-tune on the instruction pairs (loss on responses only), evaluate like a CPT checkpoint against `reference`
    (the original base's evaluation), store the model."""
    key = sft_key(model, pack, sft_cfg, eval_cfg, reference)
    check_result_record(store_uri, key)
    spec = SftAttemptSpec(
        start=model,
        pack=pack,
        sft=sft_cfg,
        eval=eval_cfg,
        reference=reference,
        store=store_uri,
        prefix=layout.sft_attempt_prefix(key),
        provenance=provenance,
        code_version=SFT_CODE,
    )
    watch = progress.TrainingProgress("SFT", "dapt-sft")
    with leftovers.temp_dir("sft") as tmp:
        if sft_cfg.train.isolate:  # a fresh child: earlier stages' memory is not under the peak (tasks/child.py)
            return run_in_child(
                "dapt_core.sft", spec, SftManifest, Path(tmp), sft_cfg.train.stop_grace_s, task_log("dapt.sft"), watch
            )
        return run_sft_attempt(spec, Path(tmp), watch)
