"""Prefect tasks for continual pretraining: the base evaluation, and one CPT attempt (dapt_core/cpt.py).

The reference of the forgetting comparison is the ORIGINAL base model, before tokenizer extension: bits per byte, word
perplexity and benchmark accuracy do not depend on the tokenizer, so a checkpoint is judged against what the user
started with, not against the extended-but-untrained model (already worse by whatever the extension cost), which is
still evaluated (cached) and reported. Both are evaluated once on the held-out text of the pack stage and the
benchmarks, their per-item benchmark results kept for the paired test.
An attempt runs in this process, or under torchrun (DDP or FSDP, one process per GPU) when train.nproc_per_node > 1
or train.nnodes > 1.
A stop request (dapt_core/stop.py) reaches the torchrun launch as SIGTERM, forwarded by this task.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from dapt.tasks import progress
from dapt.tasks.caching import check_result_record, eval_set_hashes
from dapt_core import layout, leftovers, stop
from dapt_core.config import EvalConfig, ModelConfig, TrainConfig
from dapt_core.cpt import AttemptSpec, eval_files, run_attempt, stopped_path
from dapt_core.evaluate import EvalResult, evaluate
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import Continuation, CptManifest, DirRef, PackManifest
from dapt_core.model import load_from_dir, load_model, load_tokenizer
from dapt_core.model_card import ModelProvenance
from dapt_core.stop import Stopped, StopRequested
from dapt_core.store import open_store, s3_environment
from dapt_core.train.distributed import torchrun_command

CPT_CODE = code_version(run_attempt, evaluate, load_model, task_module=sys.modules[__name__])


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit use)
        return logging.getLogger("dapt.cpt")


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
    m, tokenizer = load_from_dir(store.local_dir(reference))
    return _metrics(m, tokenizer, store, pack, eval_cfg, "base model")


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
    with leftovers.temp_dir("base-eval") as tmp:
        result = evaluate(m, tokenizer, eval_files(store, pack), Path(tmp), eval_cfg)
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
    # The whole train section, nproc_per_node and nnodes included (batch_size is per process, so they set the global
    # batch); stop_grace_s, where the nodes meet and how many loader processes prepare the data do not change what is
    # trained (and every node of a launch must compute the same key).
    fisher = pack.general_sample.sha256 if train_cfg.ewc.enabled and pack.general_sample else None
    train = train_cfg.model_dump(
        mode="json", exclude={"stop_grace_s", "node_rank", "rdzv_endpoint", "rdzv_id", "data_workers"}
    )
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
        if train_cfg.nproc_per_node == 1 and train_cfg.nnodes == 1:
            watch = progress.TrainingProgress(f"CPT attempt {attempt}", f"dapt-cpt-attempt-{attempt}")
            result = run_attempt(spec, tmp / "work", observer=watch)
            watch.done(f"promoted step {result.best_step}" if result.promoted else "nothing promoted")
        else:  # the ranks' log lines (steps, decisions) stream into this task's log
            result = _torchrun(spec, tmp)
    return result


def _forward_stop(proc: subprocess.Popen) -> None:
    """Until `proc` ends: on a stop request, SIGTERM it (torchrun passes it on to every rank)."""
    while proc.poll() is None:
        if stop.wait(0.5):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return


def _torchrun(spec: AttemptSpec, tmp: Path) -> CptManifest:
    """The same attempt, one process per GPU (DDP or FSDP): `torch.distributed.run -m dapt_core.cpt`, on this node
    and, with train.nnodes > 1, the others (deployments/README.md, "Several nodes": they run the logged command).

    torchrun runs in its own session, so a terminal's Ctrl-C reaches it only through this process's stop request:
    SIGTERM, which torchrun forwards to the ranks, giving them train.stop_grace_s (--shutdown_timeout) to checkpoint."""
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(spec.model_dump_json())
    timeout = math.ceil(spec.train.stop_grace_s)
    cmd = torchrun_command(spec.train, [str(spec_path), str(result_path), str(tmp / "work")], timeout)
    if spec.train.nnodes > 1:
        key = layout.attempt_spec_key(spec.prefix)
        open_store(spec.store).put_text(spec.model_dump_json(), key)
        # the same work dir path: with TMPDIR on a volume the nodes share, FSDP's sharded checkpoints meet there
        other = torchrun_command(spec.train, [f"{spec.store}#{key}", str(result_path), str(tmp / "work")], timeout)
        _log().info("other nodes join with: %s", " ".join(other[1:]))
    log = _log()
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with (
        stop.training(spec.train.stop_grace_s),
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, **s3_environment()},  # the ranks open the store: the credentials this process was given
        ) as proc,
    ):
        threading.Thread(target=_forward_stop, args=(proc,), name="dapt-forward-stop", daemon=True).start()
        for line in proc.stdout:  # streamed: a long run shows its progress in the flow run's logs
            line = line.rstrip()
            tail.append(line)
            log.info("%s", line)
    stopped = stopped_path(result_path)
    if stopped.is_file():
        result = Stopped.model_validate_json(stopped.read_text())
        stop.saved(result)
        raise StopRequested(result)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}; its last lines:\n" + "\n".join(tail))
    return CptManifest.model_validate_json(result_path.read_text())
