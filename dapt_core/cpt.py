"""One CPT attempt: recover → train → judge → promote.

* **Recover.** The attempt's journal (below) is read and verified; its newest checkpoint, or for a rollback that has
  not started yet the checkpoint it continues from (`AttemptSpec.continue_from`, dapt_core/continuation.py), is put
  where the training loop resumes from. A rollback trains on the data that checkpoint had not seen, plus replay.
* **Train.** dapt_core/train.py, until the end of the plan or the first rejected checkpoint.
* **Judge.** Each checkpoint is evaluated (dapt_core.evaluate) and judged by the ForgettingPolicy against the
  reference evaluation (the original base model, per-item benchmark results included), and against the same
  reference on the domain (dapt_core/gain.py: does it beat the original?). Training stops at the first rejected
  checkpoint: the caller rolls back to the best accepted one and continues with a lower LR and more replay
  (flows/cpt.py).
* **Promote.** Among the accepted checkpoints that beat the original base on the domain, the one with the best
  domain metric is written to the store as a loadable HF directory (LoRA merged), with the tokenizer. When no
  accepted checkpoint beats the original, nothing is promoted and the manifest's `gain` says "no gain" and why.
* **Crash safety.** After every checkpoint, `<prefix>/journal.json` in the store lists the decisions so far and the
  uploaded checkpoints (weights, optimizer, scheduler, RNG, data position). Running the same attempt again (a Prefect
  retry, a fresh worker) downloads the last checkpoint and resumes exactly from it, keeping the earlier decisions.
* **The journal is verified before it is trusted** (`read_journal`): it names its attempt (the prefix, which holds
  the attempt's content key), each entry carries `chain` = sha256(previous chain + canonical JSON of the entry),
  starting from a hash of the format and the prefix, steps increase and nothing follows a rejection, and every
  checkpoint it lists must be this attempt's own `<prefix>/checkpoints/checkpoint-<step>/...`. The checkpoint resumed
  from is downloaded and each file checked against its recorded sha256; its state files are read as plain data only
  (dapt_core/train/checkpoint.py `load_state`). A journal failing any check is refused (`JournalError`), never
  partly used. The journal itself lives in dapt_core/journal.py.
* **Stopping.** A stop request (SIGTERM, Ctrl-C, a cancel: dapt_core/stop.py) ends training at the next optimizer
  step; the checkpoint of that step is uploaded and journaled (chained like any entry) as "interrupted", not judged:
  the next run resumes from it, and it is never promoted (it is evaluated like any other once training reaches the
  next `save_every` step or the end). Then `StopRequested` propagates (the CLI prints how to resume).
* **Multi-GPU.** `python -m torch.distributed.run --nproc_per_node N -m dapt_core.cpt spec.json result.json` runs the
  same attempt with DDP or FSDP2 (dapt_core/train/), on one node or several
  (`dapt_core.train.distributed.torchrun_command`);
  rank 0 evaluates, uploads and writes the result; each node's first process fetches the checkpoint it resumes from.

Plain Python: the Prefect task (tasks/cpt.py) calls `run_attempt` in-process or launches it with torchrun.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from dapt_core import layout, stop
from dapt_core import train as train_mod
from dapt_core.attempt_events import AttemptObserver, EventPrinter
from dapt_core.config import EvalConfig, TrainConfig
from dapt_core.continuation import place_resume_point, write_continuation_data
from dapt_core.eval_report import write_report
from dapt_core.evaluate import EvalResult, evaluate
from dapt_core.forgetting import Decision, ForgettingPolicy
from dapt_core.gain import domain_gain, trails_original
from dapt_core.journal import JournalEntry, journal_interrupted, journal_text, read_journal, resume_from_journal
from dapt_core.manifest import (
    ArtifactRef,
    Continuation,
    ContinuationData,
    CptManifest,
    DirRef,
    PackManifest,
)
from dapt_core.memory import release_heap
from dapt_core.model import load_from_dir
from dapt_core.model_card import ModelProvenance, write_model_card
from dapt_core.stop import StopRequested
from dapt_core.store import ArtifactStore, open_store
from dapt_core.train.checkpoint import read_trainer_state

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dapt.cpt")


class AttemptSpec(BaseModel):
    """Everything one attempt needs; JSON-serialisable so torchrun workers can read it from a file."""

    start: DirRef  # the model (and tokenizer) this attempt starts from
    pack: PackManifest
    train: TrainConfig
    eval: EvalConfig
    reference: EvalResult  # what every checkpoint is judged against: the original base's evaluation
    store: str
    prefix: str  # store key prefix of this attempt's outputs
    attempt: int
    new_token_ids: list[int] = []  # rows the tokenizer stage added: LoRA trains them (train.train_new_tokens)
    continue_from: Continuation | None = None  # a rollback: continue from this checkpoint on the data it had not seen
    provenance: ModelProvenance | None = None  # for the promoted model's card (README.md)
    code_version: str


def eval_files(store: ArtifactStore, pack: PackManifest) -> dict[str, Path]:
    files = {
        k: store.local_path(r)
        for k, r in (("domain", pack.eval_domain), ("general", pack.eval_general))
        if r is not None
    }
    if not files:
        raise ValueError("the pack stage held out no eval documents (mix.heldout_fraction is 0): nothing to evaluate")
    return files


def _general_samples(store: ArtifactStore, spec: AttemptSpec) -> list[list[int]] | None:
    if not spec.train.ewc.enabled:
        return None
    if spec.pack.general_sample is None:
        raise ValueError(
            "train.ewc.enabled needs general text for the Fisher estimate: add data.general sources "
            "(mix.general_sample_sequences > 0)"
        )
    seqs = train_mod.PackedSequences([store.local_path(spec.pack.general_sample)])
    return [seqs[i][0].tolist() for i in range(len(seqs))]


def _judged(entries: list[JournalEntry]) -> list[JournalEntry]:
    """Journal entries with a decision (interrupted checkpoints are resume points only)."""
    return [e for e in entries if not e.interrupted]


def _model_at(spec: AttemptSpec, store: ArtifactStore, checkpoint: Path):
    """The start model with a checkpoint's weights loaded (a peft model for LoRA): what gets promoted; and its
    tokenizer."""
    model, tokenizer = load_from_dir(store.local_dir(spec.start))
    if spec.train.method == "lora":
        model = train_mod.apply_lora(model, spec.train, spec.new_token_ids)
    train_mod.load_weights(model, checkpoint / "model.safetensors", spec.train.method)
    return model, tokenizer


def _judged_model(spec: AttemptSpec, store: ArtifactStore, model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """The model a checkpoint's evaluation runs on: the trained model itself, except under FSDP with several ranks,
    where rank 0 holds only its shard: then the checkpoint's consolidated weights, loaded on rank 0's device."""
    if spec.train.strategy != "fsdp" or train_mod.distributed().world == 1:
        return model
    consolidated, _ = _model_at(spec, store, checkpoint)
    return consolidated.to(next(model.parameters()).device.type)


# ----------------------------------------------------------------------- the attempt: recover → train → judge → promote
def run_attempt(spec: AttemptSpec, workdir: Path, observer: AttemptObserver | None = None) -> CptManifest | None:
    """Train, judge and promote (see module docstring). Returns the manifest on rank 0, None on other DDP ranks."""
    dist = train_mod.distributed()
    store = open_store(spec.store)
    data = _training_data(spec, store, workdir, dist)
    judge = CheckpointJudge(spec, store, workdir, read_journal(store, spec.prefix), observer)
    if not judge.ended:  # else an earlier run of this attempt already stopped at a rejection
        _recover(spec, store, workdir / "train", judge.journal, dist)
        _train(spec, store, workdir, judge, data, dist)
    if not dist.main:
        return None
    return _promote(spec, store, workdir, judge, data)


@dataclass
class AttemptData:
    """What an attempt trains on: the pack's shards, or a rollback's continuation data (dapt_core/continuation.py)."""

    shards: list[Path]  # local files the training loop reads
    refs: list[ArtifactRef]  # the same in the store (rank 0)
    continuation: ContinuationData | None = None


def _training_data(spec: AttemptSpec, store: ArtifactStore, workdir: Path, dist: train_mod.Distributed) -> AttemptData:
    """The pack's shards; for a rollback, the data its checkpoint had not seen plus replay, written by rank 0 (stored
    with the attempt: a later rollback may continue from this attempt's checkpoints against it)."""
    c = spec.continue_from
    if c is None:
        return AttemptData([store.local_path(r) for r in spec.pack.train_shards], list(spec.pack.train_shards))
    shard, counts_file = workdir / "continuation" / "train-00000.parquet", workdir / "continuation" / "counts.json"
    refs = []
    if dist.main:
        state = read_trainer_state(store.local_dir(c.checkpoint))
        general = store.local_path(spec.pack.general_sample) if spec.pack.general_sample else None
        counts = write_continuation_data(
            [store.local_path(r) for r in c.data],
            general,
            state,
            state["seed"],
            c.data_general_fraction,
            c.general_fraction,
            shard,
        )
        counts_file.write_text(counts.model_dump_json())
        refs = [store.put_file(shard, layout.continuation_shard_key(spec.prefix, shard.name))]
        log.info(
            "attempt %d continues from %s (step %d of %d): %d sequences it had not seen + %d replay sequences, lr %.3g",
            spec.attempt,
            c.source,
            counts.resume_step,
            counts.total_steps,
            counts.unseen_sequences,
            counts.replay_sequences,
            spec.train.lr,
        )
        store.put_text(counts.model_dump_json(), layout.continuation_shard_key(spec.prefix, counts_file.name))
    dist.barrier()
    if dist.local_rank == 0 and not dist.main:  # another node: fetch what node 0 wrote
        for path in (shard, counts_file):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.read_key(layout.continuation_shard_key(spec.prefix, path.name)))
    dist.barrier()
    return AttemptData([shard], refs, ContinuationData.model_validate_json(counts_file.read_text()))


def _recover(
    spec: AttemptSpec, store: ArtifactStore, train_dir: Path, journal: list[JournalEntry], dist: train_mod.Distributed
) -> None:
    """On each node's first process (its ranks resume from their local train_dir), put the journal's newest checkpoint
    (or, for a rollback not started yet, the checkpoint it continues from) where the training loop resumes from."""
    if dist.local_rank == 0:
        resume_step = resume_from_journal(store, journal, train_dir)
        if journal:
            if dist.main:
                log.info(
                    "attempt %d: resuming after step %d (%d checkpoint(s) already judged)",
                    spec.attempt,
                    resume_step,
                    len(_judged(journal)),
                )
        elif spec.continue_from is not None:
            place_resume_point(store.local_dir(spec.continue_from.checkpoint), train_dir)
    dist.barrier()


class CheckpointJudge:
    """Called by the training loop after each checkpoint (rank 0): evaluate the model being trained, judge it against
    the reference, upload the checkpoint and journal the decision (last: an entry means the checkpoint is safe).
    Returns whether training may go on."""

    def __init__(
        self,
        spec: AttemptSpec,
        store: ArtifactStore,
        workdir: Path,
        journal: list[JournalEntry],
        observer: AttemptObserver | None,
    ):
        self.spec, self.store, self.workdir, self.journal, self.observer = spec, store, workdir, journal, observer
        self.policy = ForgettingPolicy.from_config(spec.eval)
        self.files = eval_files(store, spec.pack)
        self.model = self.tokenizer = self.tensorboard = None
        self.tensorboard_ref: DirRef | None = None

    @property
    def ended(self) -> bool:
        """Training stopped at a rejected checkpoint (in this run or an earlier run of the attempt)."""
        return any(e.accepted is False for e in self.journal)

    def __call__(self, step: int, path: Path) -> bool:
        # get_peft_model injects adapters into `model` in place: `model` is the model being trained, for either method.
        if self.observer is not None:
            self.observer.evaluating(step)
        result = evaluate(
            _judged_model(self.spec, self.store, self.model, path),
            self.tokenizer,
            self.files,
            self.workdir / f"eval-{step}",
            self.spec.eval,
        )
        release_heap()  # the evaluation's temporary logits, before training goes on (dapt_core/memory.py)
        decision = self.policy.judge(self.spec.reference, result, step=step)  # logs the decision
        trails, domain_numbers = trails_original(self.spec.reference, result, self.spec.eval)
        if trails:
            log.info(
                "attempt %d step %d does not beat the original base on the domain: %s",
                self.spec.attempt,
                step,
                "; ".join(trails),
            )
        if self.observer is not None:
            self.observer.judged(step, decision.accepted, decision.reasons, result.metrics)
        ref = self.store.put_dir(path, layout.checkpoint_key(self.spec.prefix, path.name))
        self.journal.append(
            JournalEntry(
                step=step,
                checkpoint=ref,
                accepted=decision.accepted,
                reasons=list(decision.reasons),
                numbers={k: float(v) for k, v in {**decision.numbers, **domain_numbers}.items()},
                metrics=dict(result.metrics),
                backend=result.backend,
                trails_original=trails,
            )
        )
        self._tensorboard(step, result.metrics, decision.accepted)
        self.store.put_text(journal_text(self.journal, self.spec.prefix), layout.journal_key(self.spec.prefix))
        return decision.accepted

    def _tensorboard(self, step: int, metrics: dict[str, float], accepted: bool) -> None:
        if self.tensorboard is None:
            return
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"eval/{name}", value, step)
        self.tensorboard.add_scalar("eval/accepted", float(accepted), step)
        self.tensorboard.flush()
        self.tensorboard_ref = self.store.put_dir(
            self.workdir / "train" / "tensorboard", layout.tensorboard_key(self.spec.prefix)
        )


def _train(
    spec: AttemptSpec,
    store: ArtifactStore,
    workdir: Path,
    judge: CheckpointJudge,
    data: AttemptData,
    dist: train_mod.Distributed,
) -> None:
    """Train from the start model (or the checkpoint `_recover` placed) until the end or the first rejection. A
    rollback keeps the step budget of the plan it continues (module docstring of dapt_core/continuation.py)."""
    train_dir = workdir / "train"
    cfg = (
        spec.train
        if data.continuation is None
        else spec.train.model_copy(update={"max_steps": data.continuation.total_steps})
    )
    model, tokenizer = load_from_dir(store.local_dir(spec.start))
    if (
        spec.train.method == "lora"
        and spec.new_token_ids
        and not (spec.train.train_new_tokens or spec.train.train_embeddings)
    ):
        log.warning(
            "train.method lora with an extended tokenizer and train.train_new_tokens off: "
            "the new token rows will not learn"
        )
    judge.model, judge.tokenizer = model, tokenizer
    judge.tensorboard = train_mod.tensorboard_writer(spec.train, train_dir, dist)
    try:
        train_mod.train(
            model,
            data.shards,
            cfg,
            train_dir,
            resume=True,
            on_checkpoint=judge,
            general_samples=_general_samples(store, spec),
            new_token_ids=spec.new_token_ids,
            on_progress=judge.observer.step if judge.observer is not None else None,
        )
    except StopRequested as e:
        stopped = journal_interrupted(store, spec.prefix, judge.journal, e.stopped) if dist.main else e.stopped
        dist.barrier()  # the other ranks wait for the upload: torchrun ends the group when one rank exits
        raise StopRequested(stopped) from None
    finally:
        if judge.tensorboard is not None:
            judge.tensorboard.close()
        judge.model = None


def _promote(
    spec: AttemptSpec, store: ArtifactStore, workdir: Path, judge: CheckpointJudge, data: AttemptData
) -> CptManifest:
    """Promote the best checkpoint that passed the forgetting policy AND beats the original base on the domain (if
    any: else "no gain", dapt_core/gain.py), write the attempt's report, return its manifest."""
    judged = _judged(judge.journal)
    evaluated = [
        (
            e.step,
            EvalResult(metrics=e.metrics, backend=e.backend or ""),
            Decision(bool(e.accepted), e.reasons, e.numbers),
        )
        for e in judged
    ]
    promotable = [(step, r) for e, (step, r, _) in zip(judged, evaluated) if e.accepted and not e.trails_original]
    best_step = judge.policy.choose_best(promotable) if promotable else None
    decisions = [e.decision(spec.attempt) for e in judged]
    promoted = adapter = None
    if best_step is not None:
        promoted, adapter = _write_promoted(spec, store, workdir, next(e for e in judged if e.step == best_step))
    gain = domain_gain(
        spec.eval, spec.reference.metrics, decisions, next((d for d in decisions if d.step == best_step), None)
    )
    if promoted is None:
        log.warning("attempt %d: nothing promoted (%s): %s", spec.attempt, gain.verdict, "; ".join(gain.reasons))
    report = write_report(spec.reference, evaluated, workdir / "report", best_step=best_step, policy=judge.policy)
    refs = {k: store.put_file(p, layout.attempt_report_key(spec.prefix, p.name)) for k, p in report.items()}
    rejected = [e.step for e in judged if e.accepted is False]
    return CptManifest(
        accepted=any(d.accepted for d in decisions),
        promoted=promoted,
        adapter=adapter,
        best_step=best_step,
        gain=gain,
        stopped_at=rejected[0] if rejected else None,
        decisions=decisions,
        checkpoints=[e.checkpoint for e in judged],
        reference_metrics=dict(spec.reference.metrics),
        report_json=refs["json"],
        report_md=refs["md"],
        report_png=refs["png"],
        tensorboard=judge.tensorboard_ref,
        start_model=spec.start.uri,
        attempt=spec.attempt,
        lr=spec.train.lr,
        trained_on=data.refs,
        continuation=data.continuation,
        general_fraction=spec.continue_from.general_fraction
        if spec.continue_from
        else spec.pack.general_fraction_target,
        continued_from=spec.continue_from.source if spec.continue_from else None,
        code_version=spec.code_version,
    )


def _write_promoted(
    spec: AttemptSpec, store: ArtifactStore, workdir: Path, best: JournalEntry
) -> tuple[DirRef, DirRef | None]:
    """The checkpoint's model (LoRA merged) with the tokenizer and a model card, and the adapter alone
    (save_adapter)."""
    final, tokenizer = _model_at(spec, store, store.local_dir(best.checkpoint))
    final = final.to("cpu")
    adapter = None
    if spec.train.method == "lora" and spec.train.save_adapter:
        final.save_pretrained(workdir / "adapter")  # peft: adapter weights + adapter_config.json
        adapter = store.put_dir(workdir / "adapter", layout.promoted_adapter_key(spec.prefix))
    final = train_mod.merge_lora(final)
    out = workdir / "promoted"
    final.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if spec.provenance is not None:
        write_model_card(
            out,
            spec.provenance,
            "continual pretraining",
            best.metrics,
            spec.reference.metrics,
            f"accepted at step {best.step} of attempt {spec.attempt} (lr {spec.train.lr:g}).",
        )
    promoted = store.put_dir(out, layout.promoted_key(spec.prefix))
    log.info("attempt %d: promoted checkpoint step %d to %s", spec.attempt, best.step, promoted.uri)
    return promoted, adapter


STOPPED_EXIT_CODE = 3


def stopped_path(result: Path) -> Path:
    """Where the torchrun entry point writes `Stopped` when training was stopped instead of finishing."""
    return result.with_name(result.name + ".stopped")


def _read_spec(where: str) -> str:
    """The attempt spec from a local file, or from the store (`<store uri>#<key>`: how the other nodes of a multi-node
    launch get the spec node 0's task wrote)."""
    if "#" in where:
        store_uri, key = where.split("#", 1)
        return open_store(store_uri).read_key(key).decode()
    return Path(where).read_text()


def serve_attempt(argv: list[str], attempt: Callable[[str, Path, AttemptObserver | None], BaseModel | None]) -> None:
    """A child process's entry point: `SPEC_JSON RESULT_JSON [WORKDIR]` (SPEC_JSON: a file or `<store>#<key>`);
    `attempt(spec text, workdir, observer)` runs it and its result is written to RESULT_JSON (rank 0), whose observer
    prints the attempt's progress as event lines for the launching task (dapt_core/attempt_events.py).

    SIGTERM / SIGINT (the launching task forwards a stop request as SIGTERM; torchrun passes it on to every rank and
    waits --shutdown_timeout seconds) stop training at the next step with a checkpoint; rank 0 then writes
    RESULT_JSON.stopped and every rank exits with STOPPED_EXIT_CODE."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s rank {rank}: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop.request(signal.Signals(signum).name))
    workdir = Path(argv[2]) if len(argv) > 2 else Path(argv[1]).parent / "work"
    try:
        result = attempt(_read_spec(argv[0]), workdir, EventPrinter() if rank == "0" else None)
    except StopRequested as e:
        if rank == "0":
            stopped_path(Path(argv[1])).write_text(e.stopped.model_dump_json())
        sys.exit(STOPPED_EXIT_CODE)
    if result is not None:
        Path(argv[1]).write_text(result.model_dump_json())


def main(argv: list[str]) -> None:
    """`python -m dapt_core.cpt SPEC_JSON RESULT_JSON [WORKDIR]`: one CPT attempt in this process, as torchrun's ranks
    or a train.isolate child (tasks/child.py) run it."""
    serve_attempt(argv, lambda text, workdir, watch: run_attempt(AttemptSpec.model_validate_json(text), workdir, watch))


if __name__ == "__main__":
    main(sys.argv[1:])
