"""Prefect tasks for continual pretraining: the base evaluation, and one CPT attempt (dapt_core/cpt.py).

The reference of the forgetting comparison is the ORIGINAL base model, before tokenizer extension: bits per byte, word
perplexity and benchmark accuracy do not depend on the tokenizer, so a checkpoint is judged against what the user
started with, not against the extended-but-untrained model (already worse by whatever the extension cost), which is
still evaluated (cached) and reported. Both are evaluated once on the held-out text of the pack stage and the
benchmarks, their per-item benchmark results kept for the paired test.
An attempt runs in this process, or under torchrun (DDP, one process per GPU) when train.nproc_per_node > 1.
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

import dapt_core.cpt as cpt_mod
import dapt_core.evaluate as evaluate_mod
import dapt_core.ewc as ewc_mod
import dapt_core.train as train_mod
from dapt_core import continuation, gain, leftovers, manifest, metrics, model, stop
from dapt_core.config import EvalConfig, ModelConfig, TrainConfig
from dapt_core.cpt import AttemptSpec, eval_files, run_attempt, run_eval
from dapt_core.evaluate import EvalResult
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import Continuation, CptManifest, DirRef, PackManifest
from dapt_core.model import load_from_dir, load_model, load_tokenizer
from dapt_core.model_card import ModelProvenance
from dapt_core.stop import Stopped, StopRequested
from dapt_core.store import open_store
from tasks import progress
from tasks.caching import check_result_record

CPT_CODE = code_version(cpt_mod, continuation, gain, train_mod, ewc_mod, evaluate_mod, metrics, model, manifest, sys.modules[__name__])

# "auto" (lm-eval when importable), "lm-eval" or "native"; part of every cache key.
EVAL_BACKEND = os.environ.get("DAPT_EVAL_BACKEND", "auto")


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit use)
        return logging.getLogger("dapt.cpt")


def _eval_hashes(pack: PackManifest) -> list[str | None]:
    return [r.sha256 if r else None for r in (pack.eval_domain, pack.eval_general)]


# ------------------------------------------------------------------------------------------------------- base eval
def base_eval_key(reference: DirRef, pack: PackManifest, eval_cfg: EvalConfig) -> str:
    return "base-eval-" + stable_hash(reference.sha256, _eval_hashes(pack), eval_cfg, EVAL_BACKEND, CPT_CODE)


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
    return "original-eval-" + stable_hash(fingerprint, _eval_hashes(pack), eval_cfg, EVAL_BACKEND, CPT_CODE)


@task(
    name="original-base-eval",
    cache_key_fn=lambda ctx, p: original_eval_key(p["fingerprint"], p["pack"], p["eval_cfg"]),
    persist_result=True,
    result_serializer="json",
)
def original_base_eval_task(model_cfg: ModelConfig, fingerprint: str, pack: PackManifest, eval_cfg: EvalConfig, store_uri: str) -> EvalResult:
    """Metrics of the base model as configured, before tokenizer extension, with per-item benchmark results: the
    reference every CPT checkpoint and the SFT model are judged against (a nightly refresh too)."""
    check_result_record(store_uri, original_eval_key(fingerprint, pack, eval_cfg))
    return _metrics(load_model(model_cfg), load_tokenizer(model_cfg), open_store(store_uri), pack, eval_cfg, "original base model")


def _metrics(m, tokenizer, store, pack: PackManifest, eval_cfg: EvalConfig, what: str) -> EvalResult:
    with leftovers.temp_dir("base-eval") as tmp:
        result = run_eval(m, tokenizer, eval_files(store, pack), Path(tmp), eval_cfg, EVAL_BACKEND)
    _log().info("%s metrics (%s): %s", what, result.backend, json.dumps(result.metrics, sort_keys=True))
    return result


# ------------------------------------------------------------------------------------------------------------- cpt
def cpt_key(
    start: DirRef, pack: PackManifest, train_cfg: TrainConfig, eval_cfg: EvalConfig, reference: EvalResult, attempt: int,
    new_token_ids: list[int] | None = None,
    continue_from: Continuation | None = None,
) -> str:
    shards = [r.sha256 for r in pack.train_shards]
    # The whole train section, nproc_per_node included (batch_size is per process, so it sets the global batch);
    # stop_grace_s does not change what is trained.
    fisher = pack.general_sample.sha256 if train_cfg.ewc.enabled and pack.general_sample else None
    train = train_cfg.model_dump(mode="json", exclude={"stop_grace_s"})
    return "cpt-" + stable_hash(
        start.sha256, shards, _eval_hashes(pack), fisher, train, eval_cfg, reference, attempt, EVAL_BACKEND, CPT_CODE,
        *([sorted(new_token_ids)] if new_token_ids else []),  # the rows LoRA trains (absent: the key stays as it was)
        *([continue_from] if continue_from else []),  # a rollback: the checkpoint and data it continues from
    )


@task(
    name="cpt-attempt",
    cache_key_fn=lambda ctx, p: cpt_key(p["start"], p["pack"], p["train_cfg"], p["eval_cfg"], p["reference"], p["attempt"], p["new_token_ids"], p["continue_from"]),
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
        start=start, pack=pack, train=train_cfg, eval=eval_cfg, reference=reference, store=store_uri,
        prefix=f"cpt/{key}", attempt=attempt, new_token_ids=new_token_ids or [], eval_backend=EVAL_BACKEND, code_version=CPT_CODE,
        provenance=provenance, continue_from=continue_from,
    )
    log.info(
        "CPT attempt %d from %s: lr=%.3g, general_fraction=%.3g, %d sequences of %d tokens, %d process(es)",
        attempt, continue_from.source if continue_from else start.uri, train_cfg.lr,
        continue_from.general_fraction if continue_from else pack.general_fraction_target, pack.sequences, pack.seq_len,
        train_cfg.nproc_per_node,
    )
    with leftovers.temp_dir("cpt") as tmp:
        tmp = Path(tmp)
        if train_cfg.nproc_per_node == 1:
            watch = progress.TrainingProgress(f"CPT attempt {attempt}", f"dapt-cpt-attempt-{attempt}")
            result = run_attempt(spec, tmp / "work", observer=watch)
            watch.done(f"promoted step {result.best_step}" if result.promoted else "nothing promoted")
        else:  # the ranks' log lines (steps, decisions) stream into this task's log
            result = _torchrun(spec, tmp, train_cfg.nproc_per_node)
    return result


def _forward_stop(proc: subprocess.Popen) -> None:
    """Until `proc` ends: on a stop request, SIGTERM it (torchrun passes it on to every rank)."""
    while proc.poll() is None:
        if stop.wait(0.5):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return


def _torchrun(spec: AttemptSpec, tmp: Path, nproc: int) -> CptManifest:
    """The same attempt, one process per GPU (DDP): `torch.distributed.run -m dapt_core.cpt`.

    torchrun runs in its own session, so a terminal's Ctrl-C reaches it only through this process's stop request:
    SIGTERM, which torchrun forwards to the ranks, giving them train.stop_grace_s (--shutdown_timeout) to checkpoint."""
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(spec.model_dump_json())
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--shutdown_timeout={math.ceil(spec.train.stop_grace_s)}",
        "-m", "dapt_core.cpt", str(spec_path), str(result_path), str(tmp / "work"),
    ]
    log = _log()
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with stop.training(spec.train.stop_grace_s), subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
    ) as proc:
        threading.Thread(target=_forward_stop, args=(proc,), name="dapt-forward-stop", daemon=True).start()
        for line in proc.stdout:  # streamed: a long run shows its progress in the flow run's logs
            line = line.rstrip()
            tail.append(line)
            log.info("%s", line)
    stopped = cpt_mod.stopped_path(result_path)
    if stopped.is_file():
        result = Stopped.model_validate_json(stopped.read_text())
        stop.saved(result)
        raise StopRequested(result)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}; its last lines:\n" + "\n".join(tail))
    return CptManifest.model_validate_json(result_path.read_text())
