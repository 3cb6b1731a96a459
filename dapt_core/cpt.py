"""One CPT attempt: train from a start model, judge every checkpoint against the base, promote the best accepted one.

* **Judgement.** Each checkpoint is evaluated (dapt_core.evaluate) and judged by the ForgettingPolicy against the
  reference evaluation (the original base model, per-item benchmark results included). Training stops at the first rejected checkpoint: the caller rolls back to
  the best accepted one and continues with a lower LR and more replay (flows/cpt.py).
* **Promotion.** The accepted checkpoint with the best domain metric is written to the store as a loadable HF
  directory (LoRA merged), with the tokenizer.
* **Crash safety.** After every checkpoint, `<prefix>/journal.json` in the store lists the decisions so far and the
  uploaded checkpoints (weights, optimizer, scheduler, RNG, data position). Running the same attempt again (a Prefect
  retry, a fresh worker) downloads the last checkpoint and resumes exactly from it, keeping the earlier decisions.
* **The journal is verified before it is trusted** (`read_journal`): it names its attempt (the prefix, which holds
  the attempt's content key), each entry carries `chain` = sha256(previous chain + canonical JSON of the entry),
  starting from a hash of the format and the prefix, steps increase and nothing follows a rejection, and every
  checkpoint it lists must be this attempt's own `<prefix>/checkpoints/checkpoint-<step>/...`. The checkpoint resumed
  from is downloaded and each file checked against its recorded sha256; its state files are read as plain data only
  (dapt_core/train/checkpoint.py `load_state`). A journal failing any check is refused (`JournalError`), never partly used.
* **Stopping.** A stop request (SIGTERM, Ctrl-C, a cancel: dapt_core/stop.py) ends training at the next optimizer
  step; the checkpoint of that step is uploaded and journaled (chained like any entry) as "interrupted", not judged: the next run resumes from
  it, and it is never promoted (it is evaluated like any other once training reaches the next `save_every` step or
  the end). Then `StopRequested` propagates (the CLI prints how to resume).
* **Multi-GPU.** `python -m torch.distributed.run --nproc_per_node N -m dapt_core.cpt spec.json result.json` runs the
  same attempt with DDP or FSDP2 (dapt_core/train/), on one node or several (`dapt_core.train.distributed.torchrun_command`);
  rank 0 evaluates, uploads and writes the result; each node's first process fetches the checkpoint it resumes from.

Plain Python: the Prefect task (tasks/cpt.py) calls `run_attempt` in-process or launches it with torchrun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dapt_core import layout, stop
from dapt_core import train as train_mod
from dapt_core.config import EvalConfig, TrainConfig
from dapt_core.eval_report import write_report
from dapt_core.evaluate import EvalResult, evaluate
from dapt_core.forgetting import Decision, ForgettingPolicy
from dapt_core.manifest import CptManifest, DirRef, PackManifest
from dapt_core.model import load_from_dir
from dapt_core.model_card import ModelProvenance, write_model_card
from dapt_core.stop import Stopped, StopRequested
from dapt_core.store import ArtifactStore, IntegrityError, UnsafeKeyError, open_store

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
    provenance: ModelProvenance | None = None  # for the promoted model's card (README.md)
    code_version: str


def eval_files(store: ArtifactStore, pack: PackManifest) -> dict[str, Path]:
    files = {k: store.local_path(r) for k, r in (("domain", pack.eval_domain), ("general", pack.eval_general)) if r is not None}
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


def _decision_row(step: int, result: EvalResult, decision: Decision, checkpoint: DirRef) -> dict:
    return {
        "step": step, "accepted": decision.accepted, "reasons": list(decision.reasons),
        "numbers": {k: float(v) for k, v in decision.numbers.items()}, "metrics": dict(result.metrics),
        "backend": result.backend, "checkpoint": checkpoint.model_dump(mode="json"),
    }


JOURNAL_FORMAT = "dapt-cpt-journal/1"


class JournalError(IntegrityError):
    """A resume journal that fails verification: refused, never trusted."""


class JournalEntry(BaseModel):
    """One checkpoint with its link in the hash chain: judged (as `_decision_row` writes it), or a stop's resume point
    (`interrupted`, with the stop's reason: never judged, never promoted)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=1)
    checkpoint: DirRef
    chain: str
    interrupted: bool = False
    reason: str | None = None
    accepted: bool | None = None
    reasons: list[str] = Field(default_factory=list)
    numbers: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    backend: str | None = None

    @model_validator(mode="after")
    def _judged_or_interrupted(self) -> JournalEntry:
        if self.interrupted == (self.accepted is not None):
            raise ValueError(f"step {self.step}: an entry is either judged (accepted) or interrupted, not both or neither")
        return self


class Journal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["dapt-cpt-journal/1"]
    attempt: str = Field(description="The attempt's store prefix (cpt/<content key>) the journal belongs to.")
    entries: list[JournalEntry]


def _chain(previous: str, row: dict) -> str:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous}\n{canonical}".encode()).hexdigest()


def journal_text(rows: list[dict], prefix: str) -> str:
    """The journal of `rows` (decision rows, oldest first) for the attempt at `prefix`, each entry chained."""
    chain = _chain(JOURNAL_FORMAT, {"attempt": prefix})
    entries = []
    for row in rows:
        chain = _chain(chain, json.loads(json.dumps(row)))  # hash what a reader will parse back
        entries.append({**row, "chain": chain})
    return json.dumps({"format": JOURNAL_FORMAT, "attempt": prefix, "entries": entries}, indent=1)


def read_journal(store: ArtifactStore, prefix: str) -> list[dict]:
    """The decision rows of the attempt at `prefix` (none when it has no journal yet), after verifying the journal
    (see module docstring); JournalError naming the journal and what to do when any check fails."""
    key = layout.journal_key(prefix)
    if not store.exists(key):
        return []

    def refuse(problem: str) -> JournalError:
        return JournalError(
            f"{store.uri(key)}: the resume journal of {prefix} fails verification ({problem}); it was changed "
            f"or damaged after it was written and is not trusted. Delete {store.uri(prefix)} (the whole attempt) to run "
            "it again from its start."
        )

    try:
        raw = json.loads(store.read_key(key))
        journal = Journal.model_validate(raw)
    except (ValueError, ValidationError) as e:  # json's and UnicodeDecodeError are ValueErrors
        raise refuse(f"not a {JOURNAL_FORMAT} document: {str(e).splitlines()[0][:200]}") from None
    if journal.attempt != prefix:
        raise refuse(f"it belongs to attempt {journal.attempt!r}")
    chain, rows, last_step = _chain(JOURNAL_FORMAT, {"attempt": prefix}), [], 0
    for entry, raw_entry in zip(journal.entries, raw["entries"]):
        row = {k: v for k, v in raw_entry.items() if k != "chain"}
        chain = _chain(chain, row)
        if entry.chain != chain:
            raise refuse(f"the hash chain breaks at step {entry.step}")
        if entry.step <= last_step:
            raise refuse(f"step {entry.step} follows step {last_step}")
        if rows and rows[-1].get("accepted") is False:
            raise refuse(f"step {entry.step} follows the rejected step {last_step}, where training stops")
        own = store.uri(layout.checkpoint_key(prefix, f"{train_mod.CHECKPOINT_PREFIX}{entry.step}"))
        if entry.checkpoint.uri != own:
            raise refuse(f"the checkpoint of step {entry.step} is not this attempt's {own}")
        try:
            store.checked_files(entry.checkpoint)  # and each of its files lives in it, under a plain name
        except UnsafeKeyError as e:
            raise refuse(str(e)) from None
        rows.append(row)
        last_step = entry.step
    return rows


def resume_from_journal(store: ArtifactStore, rows: list[dict], train_dir: Path) -> int:
    """Put the newest journaled checkpoint (judged or interrupted) where the training loop resumes from, and drop
    local checkpoints after it (written but never journaled: that stretch is trained again). Returns its step."""
    resume_step = rows[-1]["step"] if rows else 0
    for step, path in train_mod.list_checkpoints(train_dir):
        if step > resume_step:
            shutil.rmtree(path)
    if rows:
        dest = train_dir / f"{train_mod.CHECKPOINT_PREFIX}{resume_step}"
        if not dest.exists():
            shutil.copytree(store.local_dir(DirRef.model_validate(rows[-1]["checkpoint"])), dest)
    return resume_step


def journal_interrupted(store: ArtifactStore, prefix: str, rows: list[dict], stopped: Stopped) -> Stopped:
    """Upload the checkpoint a stopped training loop wrote and append it to `<prefix>/journal.json` as interrupted (not
    judged, never promoted): the next run resumes from it. Returns `stopped` pointing at the store's copy."""
    if stopped.checkpoint is None or (rows and rows[-1]["step"] >= stopped.step):  # no step since the last journaled one
        stopped = stopped.model_copy(update={"checkpoint": rows[-1]["checkpoint"]["uri"] if rows else None})
    else:
        local = Path(stopped.checkpoint)
        ref = store.put_dir(local, layout.checkpoint_key(prefix, local.name))
        rows.append({"step": stopped.step, "interrupted": True, "reason": stopped.reason, "checkpoint": ref.model_dump(mode="json")})
        store.put_text(journal_text(rows, prefix), layout.journal_key(prefix))
        log.warning("stopped (%s) at step %d: checkpoint %s journaled; a re-run resumes from it", stopped.reason, stopped.step, ref.uri)
        stopped = stopped.model_copy(update={"checkpoint": ref.uri})
    stop.saved(stopped)
    return stopped


def _judged(rows: list[dict]) -> list[dict]:
    """Journal rows with a decision (interrupted checkpoints are resume points only)."""
    return [r for r in rows if not r.get("interrupted")]


def _restore(rows: list[dict]) -> list[tuple[int, EvalResult, Decision]]:
    return [
        (r["step"], EvalResult(metrics=r["metrics"], backend=r["backend"]), Decision(r["accepted"], r["reasons"], r["numbers"]))
        for r in rows
    ]


def _model_at(spec: AttemptSpec, store: ArtifactStore, checkpoint: Path):
    """The start model with a checkpoint's weights loaded (a peft model for LoRA): what gets promoted."""
    model, _ = load_from_dir(store.local_dir(spec.start))
    if spec.train.method == "lora":
        model = train_mod.apply_lora(model, spec.train, spec.new_token_ids)
    train_mod.load_weights(model, checkpoint / "model.safetensors", spec.train.method)
    return model


def _judged_model(spec: AttemptSpec, store: ArtifactStore, model, checkpoint: Path):
    """The model a checkpoint's evaluation runs on: the trained model itself, except under FSDP with several ranks,
    where rank 0 holds only its shard: then the checkpoint's consolidated weights, loaded on rank 0's device."""
    if spec.train.strategy != "fsdp" or train_mod.distributed().world == 1:
        return model
    return _model_at(spec, store, checkpoint).to(next(model.parameters()).device.type)


class AttemptObserver(Protocol):
    """Who watches an attempt (the CLI bar, the Prefect UI: tasks/progress.py), on rank 0."""

    def step(self, progress: train_mod.StepProgress) -> None: ...

    def evaluating(self, step: int) -> None: ...

    def judged(self, step: int, accepted: bool, reasons: list[str], metrics: dict[str, float]) -> None: ...


def run_attempt(spec: AttemptSpec, workdir: Path, observer: AttemptObserver | None = None) -> CptManifest | None:
    """Train, judge and promote (see module docstring). Returns the manifest on rank 0, None on other DDP ranks."""
    dist = train_mod.distributed()
    store = open_store(spec.store)
    policy = ForgettingPolicy.from_config(spec.eval)
    base = spec.reference
    train_dir = workdir / "train"
    rows = read_journal(store, spec.prefix)
    ended = not all(r["accepted"] for r in _judged(rows))  # an earlier run of this attempt already stopped at a rejection
    if dist.local_rank == 0 and not ended:  # on every node: its ranks resume from their local train_dir
        resume_step = resume_from_journal(store, rows, train_dir)
        if rows and dist.main:
            log.info("attempt %d: resuming after step %d (%d checkpoint(s) already judged)", spec.attempt, resume_step, len(_judged(rows)))
    dist.barrier()

    model, tokenizer = load_from_dir(store.local_dir(spec.start))
    if spec.train.method == "lora" and spec.new_token_ids and not (spec.train.train_new_tokens or spec.train.train_embeddings):
        log.warning("train.method lora with an extended tokenizer and train.train_new_tokens off: the new token rows will not learn")
    files = eval_files(store, spec.pack)
    shards = [store.local_path(r) for r in spec.pack.train_shards]
    tb = train_mod.tensorboard_writer(spec.train, train_dir, dist)
    tensorboard_ref: DirRef | None = None

    def on_checkpoint(step: int, path: Path) -> bool:
        nonlocal tensorboard_ref
        # get_peft_model injects adapters into `model` in place: `model` is the model being trained, for either method.
        if observer is not None:
            observer.evaluating(step)
        result = evaluate(_judged_model(spec, store, model, path), tokenizer, files, workdir / f"eval-{step}", spec.eval)
        decision = policy.judge(base, result, step=step)
        if observer is not None:
            observer.judged(step, decision.accepted, decision.reasons, result.metrics)
        log.info(
            "attempt %d checkpoint step %d %s: %s %s", spec.attempt, step, "ACCEPTED" if decision.accepted else "REJECTED",
            "; ".join(decision.reasons) or "within limits", json.dumps(decision.numbers, sort_keys=True),
        )
        ref = store.put_dir(path, layout.checkpoint_key(spec.prefix, path.name))
        rows.append(_decision_row(step, result, decision, ref))
        if tb is not None:
            for name, value in result.metrics.items():
                tb.add_scalar(f"eval/{name}", value, step)
            tb.add_scalar("eval/accepted", float(decision.accepted), step)
            tb.flush()
            tensorboard_ref = store.put_dir(train_dir / "tensorboard", layout.tensorboard_key(spec.prefix))
        store.put_text(journal_text(rows, spec.prefix), layout.journal_key(spec.prefix))  # last: an entry means the checkpoint is safe
        return decision.accepted

    if not ended:
        try:
            train_mod.train(
                model, shards, spec.train, train_dir, resume=True, on_checkpoint=on_checkpoint,
                general_samples=_general_samples(store, spec), new_token_ids=spec.new_token_ids,
                on_progress=observer.step if observer is not None else None,
            )
        except StopRequested as e:
            stopped = journal_interrupted(store, spec.prefix, rows, e.stopped) if dist.main else e.stopped
            dist.barrier()  # the other ranks wait for the upload: torchrun ends the group when one rank exits
            raise StopRequested(stopped) from None
        finally:
            if tb is not None:
                tb.close()
    if not dist.main:
        return None

    rows = _judged(rows)
    evaluated = _restore(rows)
    accepted = [(s, r) for s, r, d in evaluated if d.accepted]
    best_step = policy.choose_best(accepted) if accepted else None
    promoted = adapter = None
    if best_step is not None:
        del model
        best = next(r for r in rows if r["step"] == best_step)
        final = _model_at(spec, store, store.local_dir(DirRef.model_validate(best["checkpoint"]))).to("cpu")
        if spec.train.method == "lora" and spec.train.save_adapter:
            final.save_pretrained(workdir / "adapter")  # peft: adapter weights + adapter_config.json
            adapter = store.put_dir(workdir / "adapter", layout.promoted_adapter_key(spec.prefix))
        final = train_mod.merge_lora(final)
        out = workdir / "promoted"
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if spec.provenance is not None:
            write_model_card(
                out, spec.provenance, "continual pretraining", best["metrics"], spec.reference.metrics,
                f"accepted at step {best_step} of attempt {spec.attempt} (lr {spec.train.lr:g}).",
            )
        promoted = store.put_dir(out, layout.promoted_key(spec.prefix))
        log.info("attempt %d: promoted checkpoint step %d to %s", spec.attempt, best_step, promoted.uri)
    else:
        log.warning("attempt %d: no checkpoint passed the forgetting policy; nothing promoted", spec.attempt)
    report = write_report(base, evaluated, workdir / "report", best_step=best_step, policy=policy)
    refs = {k: store.put_file(p, layout.attempt_report_key(spec.prefix, p.name)) for k, p in report.items()}
    rejected = [r["step"] for r in rows if not r["accepted"]]
    return CptManifest(
        accepted=best_step is not None,
        promoted=promoted,
        adapter=adapter,
        best_step=best_step,
        stopped_at=rejected[0] if rejected else None,
        decisions=[{**{k: v for k, v in r.items() if k != "checkpoint"}, "attempt": spec.attempt, "checkpoint": r["checkpoint"]["uri"]} for r in rows],
        checkpoints=[DirRef.model_validate(r["checkpoint"]) for r in rows],
        reference_metrics=dict(spec.reference.metrics),
        report_json=refs["json"],
        report_md=refs["md"],
        report_png=refs["png"],
        tensorboard=tensorboard_ref,
        start_model=spec.start.uri,
        attempt=spec.attempt,
        lr=spec.train.lr,
        general_fraction=spec.pack.general_fraction_target,
        code_version=spec.code_version,
    )


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


def main(argv: list[str]) -> None:
    """torchrun entry point: `-m dapt_core.cpt SPEC_JSON RESULT_JSON [WORKDIR]` (SPEC_JSON: a file or `<store>#<key>`).

    SIGTERM / SIGINT (torchrun forwards the launcher's SIGTERM to every rank, and waits --shutdown_timeout seconds)
    stop training at the next step with a checkpoint; rank 0 then writes RESULT_JSON.stopped and every rank exits
    with STOPPED_EXIT_CODE."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s rank {rank}: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop.request(signal.Signals(signum).name))
    spec = AttemptSpec.model_validate_json(_read_spec(argv[0]))
    workdir = Path(argv[2]) if len(argv) > 2 else Path(argv[1]).parent / "work"
    try:
        manifest = run_attempt(spec, workdir)
    except StopRequested as e:
        if rank == "0":
            stopped_path(Path(argv[1])).write_text(e.stopped.model_dump_json())
        sys.exit(STOPPED_EXIT_CODE)
    if manifest is not None:
        Path(argv[1]).write_text(manifest.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1:])
