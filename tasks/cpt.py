"""Prefect tasks for continual pretraining: the base evaluation, and one CPT attempt (dapt_core/cpt.py).

The reference of the forgetting comparison is the ORIGINAL base model, before tokenizer extension: bits per byte, word
perplexity and benchmark accuracy do not depend on the tokenizer, so a checkpoint is judged against what the user
started with, not against the extended-but-untrained model (already worse by whatever the extension cost), which is
still evaluated (cached) and reported. Both are evaluated once on the held-out text of the pack stage and the
benchmarks, their per-item benchmark results kept for the paired test.
An attempt runs in this process, in a fresh child process with train.isolate (bounded memory: tasks/child.py), or
under torchrun (DDP or FSDP, one process per GPU) when train.nproc_per_node > 1 or train.nnodes > 1.
A stop request (dapt_core/stop.py) reaches a child process or the torchrun launch as SIGTERM, forwarded by this task.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from prefect import task

from dapt.tasks import progress
from dapt.tasks.caching import check_result_record, eval_set_hashes
from dapt.tasks.child import EntryFiles, run_child, run_in_child, task_log
from dapt_core import layout, leftovers
from dapt_core.attempt_events import AttemptObserver
from dapt_core.config import EvalConfig, ModelConfig, TrainConfig
from dapt_core.cpt import AttemptSpec, eval_files, run_attempt
from dapt_core.evaluate import EvalResult, evaluate
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import Continuation, CptManifest, DirRef, PackManifest
from dapt_core.memory import release_heap
from dapt_core.model import load_from_dir, load_model, load_tokenizer
from dapt_core.model_card import ModelProvenance
from dapt_core.store import open_store
from dapt_core.train.distributed import torchrun_command

CPT_CODE = code_version(run_attempt, evaluate, load_model, task_module=sys.modules[__name__])


def _log() -> logging.Logger | logging.LoggerAdapter:
    return task_log("dapt.cpt")


# ------------------------------------------------------------------------------------------------------- base eval
def base_eval_key(reference: DirRef, pack: PackManifest, eval_cfg: EvalConfig) -> str:
    return "base-eval-" + stable_hash(reference.sha256, eval_set_hashes(pack), eval_cfg, CPT_CODE)


@task(
    name="base-eval",
    cache_key_fn=lambda ctx, p: base_eval_key(p["reference"], p["pack"], p["eval_cfg"]),
    persist_result=True,
    result_serializer="json",
)
def base_eval_task(reference: DirRef, pack: PackManifest, eval_cfg: EvalConfig, store_uri: str) -> EvalResult:
    """Metrics of the model CPT starts from (the extended base) on the held-out sets and benchmarks: reported."""
    check_result_record(store_uri, base_eval_key(reference, pack, eval_cfg))
    store = open_store(store_uri)
    return _metrics(*load_from_dir(store.local_dir(reference)), store, pack, eval_cfg, "base model")


def original_eval_key(fingerprint: str, pack: PackManifest, eval_cfg: EvalConfig) -> str:
    return "original-eval-" + stable_hash(fingerprint, eval_set_hashes(pack), eval_cfg, CPT_CODE)


@task(
    name="original-base-eval",
    cache_key_fn=lambda ctx, p: original_eval_key(p["fingerprint"], p["pack"], p["eval_cfg"]),
    persist_result=True,
    result_serializer="json",
)
def original_base_eval_task(
    model_cfg: ModelConfig, fingerprint: str, pack: PackManifest, eval_cfg: EvalConfig, store_uri: str
) -> EvalResult:
    """Metrics of the base model as configured, before tokenizer extension, with per-item benchmark results: the
    reference every CPT checkpoint and the SFT model are judged against (a nightly refresh too)."""
    check_result_record(store_uri, original_eval_key(fingerprint, pack, eval_cfg))
    return _metrics(
        load_model(model_cfg), load_tokenizer(model_cfg), open_store(store_uri), pack, eval_cfg, "original base model"
    )


def _metrics(m, tokenizer, store, pack: PackManifest, eval_cfg: EvalConfig, what: str) -> EvalResult:
    """Evaluate `m` (which only this call holds) and give its memory back: the stages after this one run in the same
    process (dapt_core/memory.py)."""
    with leftovers.temp_dir("base-eval") as tmp:
        result = evaluate(m, tokenizer, eval_files(store, pack), Path(tmp), eval_cfg)
    del m
    release_heap()
    _log().info("%s metrics (%s): %s", what, result.backend, json.dumps(result.metrics, sort_keys=True))
    return result


# ------------------------------------------------------------------------------------------------------------- cpt
def cpt_key(
    start: DirRef,
    pack: PackManifest,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    reference: EvalResult,
    attempt: int,
    new_token_ids: list[int] | None = None,
    continue_from: Continuation | None = None,
) -> str:
    shards = [r.sha256 for r in pack.train_shards]
    fisher = pack.general_sample.sha256 if train_cfg.ewc.enabled and pack.general_sample else None
    train = train_cfg.model_dump(mode="json", exclude=set(TrainConfig.NOT_TRAINED))
    return "cpt-" + stable_hash(
        start.sha256,
        shards,
        eval_set_hashes(pack),
        fisher,
        train,
        eval_cfg,
        reference,
        attempt,
        CPT_CODE,
        *([sorted(new_token_ids)] if new_token_ids else []),  # the rows LoRA trains (absent: the key stays as it was)
        *([continue_from] if continue_from else []),  # a rollback: the checkpoint and data it continues from
    )


@task(
    name="cpt-attempt",
    cache_key_fn=lambda ctx, p: cpt_key(
        p["start"],
        p["pack"],
        p["train_cfg"],
        p["eval_cfg"],
        p["reference"],
        p["attempt"],
        p["new_token_ids"],
        p["continue_from"],
    ),
    persist_result=True,
    result_serializer="json",
)
def cpt_task(
    start: DirRef,
    pack: PackManifest,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    reference: EvalResult,
    store_uri: str,
    attempt: int = 0,
    new_token_ids: list[int] | None = None,
    provenance: ModelProvenance | None = None,
    continue_from: Continuation | None = None,
) -> CptManifest:
    """Train from `start` on the packed shards; judge every checkpoint against `reference` (the original base's
    evaluation); stop at a rejection; promote the best accepted."""
    log = _log()
    key = cpt_key(start, pack, train_cfg, eval_cfg, reference, attempt, new_token_ids, continue_from)
    check_result_record(store_uri, key)
    spec = AttemptSpec(
        start=start,
        pack=pack,
        train=train_cfg,
        eval=eval_cfg,
        reference=reference,
        store=store_uri,
        prefix=layout.cpt_attempt_prefix(key),
        attempt=attempt,
        new_token_ids=new_token_ids or [],
        code_version=CPT_CODE,
        provenance=provenance,
        continue_from=continue_from,
    )
    log.info(
        "CPT attempt %d from %s: lr=%.3g, general_fraction=%.3g, %d sequences of %d tokens, %d process(es)",
        attempt,
        continue_from.source if continue_from else start.uri,
        train_cfg.lr,
        continue_from.general_fraction if continue_from else pack.general_fraction_target,
        pack.sequences,
        pack.seq_len,
        train_cfg.nproc_per_node,
    )
    with leftovers.temp_dir("cpt") as tmp:
        tmp = Path(tmp)
        watch = progress.TrainingProgress(f"CPT attempt {attempt}", f"dapt-cpt-attempt-{attempt}")
        if train_cfg.nproc_per_node > 1 or train_cfg.nnodes > 1:  # rank 0's log lines and events stream back
            result = _torchrun(spec, tmp, watch)
        elif train_cfg.isolate:
            result = _in_child(spec, tmp, watch)
        else:
            result = run_attempt(spec, tmp / "work", observer=watch)
        watch.done(f"promoted step {result.best_step}" if result.promoted else "nothing promoted")
    return result


def _in_child(spec: AttemptSpec, tmp: Path, watch: AttemptObserver | None = None) -> CptManifest:
    """The same attempt in a fresh child process, `python -m dapt_core.cpt` (train.isolate, one process): the memory
    this process holds from earlier stages is not under the training peak (tasks/child.py)."""
    return run_in_child("dapt_core.cpt", spec, CptManifest, tmp, spec.train.stop_grace_s, _log(), watch)


def _torchrun(spec: AttemptSpec, tmp: Path, watch: AttemptObserver | None = None) -> CptManifest:
    """The same attempt, one process per GPU (DDP or FSDP): `torch.distributed.run -m dapt_core.cpt`, on this node
    and, with train.nnodes > 1, the others (deployments/README.md, "Several nodes": they run the logged command).
    torchrun forwards the stop request's SIGTERM to the ranks, giving them train.stop_grace_s (--shutdown_timeout)
    to checkpoint (tasks/child.py)."""
    files = EntryFiles.write(spec, tmp)
    timeout = math.ceil(spec.train.stop_grace_s)
    cmd = torchrun_command(spec.train, files.args, timeout)
    if spec.train.nnodes > 1:
        key = layout.attempt_spec_key(spec.prefix)
        open_store(spec.store).put_text(spec.model_dump_json(), key)
        # the same work dir path: with TMPDIR on a volume the nodes share, FSDP's sharded checkpoints meet there
        other = torchrun_command(spec.train, [f"{spec.store}#{key}", str(files.result), str(files.work)], timeout)
        _log().info("other nodes join with: %s", " ".join(other[1:]))
    return run_child(cmd, files.result, CptManifest, spec.train.stop_grace_s, _log(), watch)
