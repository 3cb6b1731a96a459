"""Prefect tasks for continual pretraining and the forgetting evaluation: base eval, then one CPT attempt.

The base of the forgetting comparison is the model CPT starts from: the extended-but-untrained model of the
tokenizer stage (`tok.model`), evaluated once on the held-out domain and general text of the pack stage.
Each CPT attempt evaluates every checkpoint as it is written, judges it with the ForgettingPolicy, uploads it,
and promotes the best accepted one (LoRA merged) as a loadable HF directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

import dapt_core.evaluate as evaluate_mod
import dapt_core.train as train_mod
from dapt_core import manifest, metrics, model
from dapt_core.config import EvalConfig, TrainConfig
from dapt_core.evaluate import EvalResult, ForgettingPolicy, evaluate, write_report
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import CptManifest, PackManifest, TokenizerManifest
from dapt_core.model import load_from_dir
from dapt_core.store import ArtifactStore, open_store

CPT_CODE = code_version(train_mod, evaluate_mod, metrics, model, manifest, sys.modules[__name__])

# "auto" (lm-eval when importable), "lm-eval" or "native"; part of every cache key.
EVAL_BACKEND = os.environ.get("DAPT_EVAL_BACKEND", "auto")


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit use)
        return logging.getLogger("dapt.cpt")


def _eval_hashes(pack: PackManifest) -> list[str | None]:
    return [r.sha256 if r else None for r in (pack.eval_domain, pack.eval_general)]


def _eval_files(store: ArtifactStore, pack: PackManifest) -> dict[str, Path]:
    files = {k: store.local_path(r) for k, r in (("domain", pack.eval_domain), ("general", pack.eval_general)) if r is not None}
    if not files:
        raise ValueError("the pack stage held out no eval documents (mix.heldout_fraction is 0): nothing to evaluate")
    return files


def _run_eval(m, tokenizer, files: dict[str, Path], workdir: Path, cfg: EvalConfig) -> EvalResult:
    return evaluate(
        m, tokenizer, files, workdir, extra_tasks=cfg.extra_tasks, limit=cfg.limit, batch_size=cfg.batch_size,
        max_probes=cfg.max_probes, n_choices=cfg.probe_choices, probes=cfg.max_probes > 0, backend=EVAL_BACKEND,
    )


# ------------------------------------------------------------------------------------------------------- base eval
def base_eval_key(tok: TokenizerManifest, pack: PackManifest, eval_cfg: EvalConfig) -> str:
    return "base-eval-" + stable_hash(tok.model.sha256, _eval_hashes(pack), eval_cfg, EVAL_BACKEND, CPT_CODE)


@task(
    name="base-eval",
    cache_key_fn=lambda ctx, p: base_eval_key(p["tok"], p["pack"], p["eval_cfg"]),
    persist_result=True,
    result_serializer="json",
)
def base_eval_task(tok: TokenizerManifest, pack: PackManifest, eval_cfg: EvalConfig, store_uri: str) -> dict:
    """Metrics of the model CPT starts from (the extended, untrained model): the reference of the forgetting policy."""
    store = open_store(store_uri)
    m, tokenizer = load_from_dir(store.local_dir(tok.model))
    with tempfile.TemporaryDirectory(prefix="dapt-base-eval-") as tmp:
        result = _run_eval(m, tokenizer, _eval_files(store, pack), Path(tmp), eval_cfg)
    _log().info("base model metrics (%s): %s", result.backend, json.dumps(result.metrics, sort_keys=True))
    return dict(result.metrics)


# ------------------------------------------------------------------------------------------------------------- cpt
def cpt_key(tok: TokenizerManifest, pack: PackManifest, train_cfg: TrainConfig, eval_cfg: EvalConfig, attempt: int) -> str:
    shards = [r.sha256 for r in pack.train_shards]
    return "cpt-" + stable_hash(
        tok.model.sha256, shards, _eval_hashes(pack), train_cfg, eval_cfg, attempt, EVAL_BACKEND, CPT_CODE
    )


@task(
    name="cpt-attempt",
    cache_key_fn=lambda ctx, p: cpt_key(p["tok"], p["pack"], p["train_cfg"], p["eval_cfg"], p["attempt"]),
    persist_result=True,
    result_serializer="json",
)
def cpt_task(
    tok: TokenizerManifest,
    pack: PackManifest,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    base_metrics: dict,
    store_uri: str,
    attempt: int = 0,
) -> CptManifest:
    """Train on the packed shards; evaluate, judge and upload every checkpoint; promote the best accepted one."""
    import torch

    log = _log()
    key = cpt_key(tok, pack, train_cfg, eval_cfg, attempt)
    prefix = f"cpt/{key}"
    store = open_store(store_uri)
    policy = ForgettingPolicy.from_config(eval_cfg)
    base = EvalResult(metrics=dict(base_metrics), backend=EVAL_BACKEND)
    m, tokenizer = load_from_dir(store.local_dir(tok.model))
    shards = [store.local_path(r) for r in pack.train_shards]
    files = _eval_files(store, pack)
    evaluated: list[tuple[int, EvalResult, evaluate_mod.Decision]] = []
    ckpt_refs: dict[int, object] = {}
    ckpt_paths: dict[int, Path] = {}
    log.info(
        "CPT attempt %d: lr=%.3g, general_fraction=%.3g, %d sequences of %d tokens",
        attempt, train_cfg.lr, pack.general_fraction_target, pack.sequences, pack.seq_len,
    )

    with tempfile.TemporaryDirectory(prefix="dapt-cpt-") as tmp:
        tmp = Path(tmp)

        def on_checkpoint(step: int, path: Path) -> None:
            # get_peft_model injects adapters into `m` in place: `m` is the model being trained, for either method.
            with torch.no_grad():
                res = _run_eval(m, tokenizer, files, tmp / f"eval-{step}", eval_cfg)
            decision = policy.judge(base, res, step=step)
            log.info(
                "attempt %d checkpoint step %d %s: %s %s", attempt, step, "ACCEPTED" if decision.accepted else "REJECTED",
                "; ".join(decision.reasons) or "within limits", json.dumps(decision.numbers, sort_keys=True),
            )
            evaluated.append((step, res, decision))
            ckpt_paths[step] = path
            ckpt_refs[step] = store.put_dir(path, f"{prefix}/checkpoints/{path.name}")

        result = train_mod.train(m, shards, train_cfg, tmp / "train", resume=False, on_checkpoint=on_checkpoint)

        accepted = [(s, r) for s, r, d in evaluated if d.accepted]
        best_step = policy.choose_best(accepted) if accepted else None
        promoted = None
        if best_step is not None:
            trained = result.model
            train_mod.load_weights(trained, ckpt_paths[best_step] / "model.safetensors", train_cfg.method)
            final = train_mod.merge_lora(trained).to("cpu")
            out = tmp / "promoted"
            final.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            promoted = store.put_dir(out, f"{prefix}/promoted")
            log.info("attempt %d: promoted checkpoint step %d to %s", attempt, best_step, promoted.uri)
        else:
            log.warning("attempt %d: no checkpoint passed the forgetting policy; nothing promoted", attempt)
        report = write_report(base, evaluated, tmp / "report", best_step=best_step, policy=policy)
        refs = {k: store.put_file(p, f"{prefix}/report/{p.name}") for k, p in report.items()}

    decisions = [
        {
            "attempt": attempt, "step": s, "accepted": d.accepted, "reasons": list(d.reasons),
            "numbers": {k: float(v) for k, v in d.numbers.items()}, "metrics": dict(r.metrics),
            "checkpoint": ckpt_refs[s].uri,
        }
        for s, r, d in evaluated
    ]
    return CptManifest(
        accepted=best_step is not None,
        promoted=promoted,
        best_step=best_step,
        decisions=decisions,
        checkpoints=[ckpt_refs[s] for s, _, _ in evaluated],
        base_metrics=dict(base_metrics),
        report_json=refs["json"],
        report_md=refs["md"],
        report_png=refs["png"],
        attempt=attempt,
        lr=train_cfg.lr,
        general_fraction=pack.general_fraction_target,
        code_version=CPT_CODE,
    )
