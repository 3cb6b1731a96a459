"""A rollback continues, it does not restart: the data and the resume point of the attempt after a rejection.

When a checkpoint is rejected, the next attempt (dapt_core/cpt.py, `AttemptSpec.continue_from`) starts from the best
accepted checkpoint of the earlier attempts with its weights, AdamW moments, LR schedule position and RNG states, at
a lower peak LR on the same schedule (dapt_core/train.py resets the schedule's peak on resume). Its data is what the
best checkpoint had not yet seen, with more replay:

* **Not seen yet**: the sequences of the data the checkpoint trained on (its `trainer_state.json` data position:
  epoch e, index i in that epoch's permutation) that come after position i of epoch e's order. No sequence trained
  before the best step is trained again in the rest of that epoch; a plan longer than one epoch repeats data by design,
  as the first attempt would have.
* **More replay**: with the data at replay share f0 and the rollback's share f1 > f0, m = round(U (f1 - f0) / (1 - f1))
  general-only sequences join the U unseen ones, so the remainder is at f1. They come from the pack's general sample
  (mix.general_sample_sequences general training sequences), in a seeded order, repeated when m is larger.
* **Same step budget**: the continuation keeps the total number of optimizer steps of the plan (train.max_steps, or
  the steps the epochs came to), so the schedule it resumes on is the one the checkpoint was trained on.

The resulting data (one Parquet shard, the pack's format) is stored with the attempt: a later rollback continues from
a checkpoint of this attempt against it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dapt_core import train as train_mod
from dapt_core.config import EvalConfig
from dapt_core.manifest import (
    CheckpointDecision,
    Continuation,
    ContinuationData,
    CptManifest,
    DirRef,
)
from dapt_core.train.checkpoint import read_trainer_state, write_trainer_state


@dataclass
class RollbackPoint:
    """The best accepted checkpoint so far, with the attempt that wrote it and that attempt's start model."""

    attempt: CptManifest
    decision: CheckpointDecision
    start: DirRef

    def continuation(self, general_fraction: float) -> Continuation:
        """Continue from this checkpoint with the replay share raised to `general_fraction` (never lowered)."""
        checkpoint = next(c for c in self.attempt.checkpoints if c.uri == self.decision.checkpoint)
        return Continuation(
            checkpoint=checkpoint,
            data=self.attempt.trained_on,
            data_general_fraction=self.attempt.general_fraction,
            general_fraction=max(general_fraction, self.attempt.general_fraction),
            source=f"attempt {self.attempt.attempt} step {self.decision.step}",
        )


def better_rollback_point(
    current: RollbackPoint | None, result: CptManifest, start: DirRef, cfg: EvalConfig
) -> RollbackPoint | None:
    """`current`, or the best accepted checkpoint of attempt `result` (started from `start`) when its primary metric
    is better (ties: the earlier step)."""
    accepted = [d for d in result.decisions if d.accepted]
    if not accepted:
        return current
    best = min(accepted, key=lambda d: (cfg.primary_key(d.metrics), d.step))
    if current is None or cfg.primary_key(best.metrics) < cfg.primary_key(current.decision.metrics):
        return RollbackPoint(result, best, start)
    return current


def replay_sequences_needed(unseen: int, from_fraction: float, to_fraction: float) -> int:
    """General-only sequences that lift `unseen` sequences at replay share `from_fraction` to `to_fraction`."""
    if to_fraction <= from_fraction:
        return 0
    return round(unseen * (to_fraction - from_fraction) / (1.0 - to_fraction))


def write_continuation_data(
    data: list[Path],
    general_sample: Path | None,
    state: dict,
    seed: int,
    from_fraction: float,
    to_fraction: float,
    out: Path,
) -> ContinuationData:
    """The sequences of `data` not visited before the checkpoint's data position (`state`: its trainer_state), plus
    general-only sequences from `general_sample` for the raised replay share, as one Parquet shard at `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen = train_mod.PackedSequences(data)
    epoch, index = state["epoch"], state["index"]
    if index >= len(seen):  # the checkpoint ended an epoch: the next one is all unseen
        epoch, index = epoch + 1, 0
    unseen = [int(i) for i in train_mod.epoch_order(len(seen), seed, epoch)[index:]]
    items = [seen[i] for i in unseen]
    m = replay_sequences_needed(len(unseen), from_fraction, to_fraction)
    if m:
        if general_sample is None:
            raise ValueError(
                f"a rollback raises the replay share to {to_fraction:g} but the pack holds no general sample to "
                "replay: add "
                "data.general sources or mix.self_replay, and keep mix.general_sample_sequences above 0"
            )
        pool = train_mod.PackedSequences([general_sample])
        if pool.seq_len != seen.seq_len:
            raise ValueError(
                f"{general_sample}: general sample sequences of {pool.seq_len} tokens, training data of {seen.seq_len}"
            )
        rng = np.random.default_rng([seed, state["step"]])
        picks = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-m // len(pool)))])[:m]
        items += [pool[int(i)] for i in picks]
    if not items:
        raise ValueError(f"nothing left to train after step {state['step']}: the checkpoint saw all of its data")
    table = pa.table(
        {
            "input_ids": train_mod.list_column([ids for ids, _, _ in items], np.int32),
            "doc_lengths": train_mod.list_column([docs for _, docs, _ in items], np.int32),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, row_group_size=min(len(items), 1024), compression="zstd")
    return ContinuationData(
        unseen_sequences=len(unseen), replay_sequences=m, resume_step=state["step"], total_steps=state["total_steps"]
    )


def place_resume_point(checkpoint_dir: Path, train_dir: Path) -> None:
    """Copy the checkpoint where the training loop resumes from, its data position moved to the start of the
    continuation data (step, history, optimizer, scheduler and RNG states kept)."""
    state = read_trainer_state(checkpoint_dir)
    dest = train_dir / f"{train_mod.CHECKPOINT_PREFIX}{state['step']}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(checkpoint_dir, dest)
    write_trainer_state(dest, {**state, "epoch": 0, "index": 0})
