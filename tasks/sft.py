"""Prefect task for supervised fine-tuning (dapt_core/sft.py) of the promoted CPT model, then the same forgetting
evaluation against the base plus held-out response loss / accuracy.

Stopped by a signal or a cancel (dapt_core/stop.py), the checkpoint of the current step is uploaded to
`sft/<key>/checkpoints/` and journaled in `sft/<key>/journal.json`; the next run of the task resumes from it."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task

import dapt_core.cpt as cpt_mod
import dapt_core.evaluate as evaluate_mod
import dapt_core.model as model_mod
import dapt_core.sft as sft_mod
import dapt_core.train as train_mod
from dapt_core import layout, leftovers, metrics, split
from dapt_core.config import EvalConfig, SftConfig
from dapt_core.cpt import eval_files, journal_interrupted, read_journal, resume_from_journal, run_eval
from dapt_core.evaluate import EvalResult, ForgettingPolicy
from dapt_core.hashing import code_version, sha256_file, stable_hash
from dapt_core.manifest import DirRef, PackManifest, SftManifest
from dapt_core.model import load_from_dir
from dapt_core.model_card import ModelProvenance, write_model_card
from dapt_core.stop import StopRequested
from dapt_core.store import open_store
from tasks import progress
from tasks.caching import check_result_record
from tasks.cpt import EVAL_BACKEND, _eval_hashes, _log

SFT_CODE = code_version(sft_mod, train_mod, cpt_mod, evaluate_mod, metrics, split, model_mod, sys.modules[__name__])


def sft_key(model: DirRef, pack: PackManifest, sft_cfg: SftConfig, eval_cfg: EvalConfig, reference: EvalResult) -> str:
    data = [sha256_file(p) for p in sft_cfg.data]  # content, not paths: an edited file re-runs SFT
    cfg = sft_cfg.model_dump(mode="json", exclude={"train": {"stop_grace_s"}})  # the grace changes nothing trained
    return "sft-" + stable_hash(model.sha256, data, cfg, eval_cfg, _eval_hashes(pack), reference, EVAL_BACKEND, SFT_CODE)


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
    log = _log()
    key = sft_key(model, pack, sft_cfg, eval_cfg, reference)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    prefix = layout.sft_attempt_prefix(key)
    rows = read_journal(store, prefix)
    m, tokenizer = load_from_dir(store.local_dir(model))
    watch = progress.TrainingProgress("SFT", "dapt-sft")
    with leftovers.temp_dir("sft") as tmp:
        tmp = Path(tmp)
        resume_from_journal(store, rows, tmp / "sft" / "train")
        try:
            result = sft_mod.run_sft(m, tokenizer, sft_cfg, tmp / "sft", on_progress=watch.step)
        except StopRequested as e:
            raise StopRequested(journal_interrupted(store, prefix, rows, e.stopped)) from None
        watch.evaluating(result.train.step)
        evaluated = run_eval(result.model, tokenizer, eval_files(store, pack), tmp / "eval", eval_cfg, EVAL_BACKEND)
        decision = ForgettingPolicy.from_config(eval_cfg).judge(reference, evaluated)
        watch.judged(result.train.step, decision.accepted, decision.reasons, evaluated.metrics)
        watch.done("passes the forgetting policy" if decision.accepted else "rejected by the forgetting policy")
        out = tmp / "model"
        result.model.to("cpu").save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if provenance is not None:
            verdict = "passes" if decision.accepted else "REJECTED: " + "; ".join(decision.reasons)
            write_model_card(out, provenance, "supervised fine-tuning", evaluated.metrics, reference.metrics, verdict)
        ref = store.put_dir(out, layout.sft_model_key(key))
    log.info(
        "SFT %s: response %s -> %s", "ACCEPTED" if decision.accepted else "REJECTED: " + "; ".join(decision.reasons),
        result.before, result.after,
    )
    return SftManifest(
        model=ref, examples=result.counts["examples"], heldout_examples=len(result.heldout),
        response_before=result.before, response_after=result.after, eval_metrics=dict(evaluated.metrics),
        accepted=decision.accepted, reasons=list(decision.reasons), numbers=dict(decision.numbers), code_version=SFT_CODE,
    )
