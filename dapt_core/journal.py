"""The resume journal of a training attempt (CPT's and SFT's): `<prefix>/journal.json` in the store.

After every checkpoint the attempt writes the decisions so far and the uploaded checkpoints; a re-run reads the
journal back (`read_journal`), verifies it, and resumes from its newest checkpoint (`resume_from_journal`). A stop
request journals its checkpoint as "interrupted" (`journal_interrupted`). What is verified: see dapt_core/cpt.py's
module docstring ("The journal is verified before it is trusted").
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dapt_core import layout, stop
from dapt_core import train as train_mod
from dapt_core.manifest import CheckpointDecision, DirRef
from dapt_core.stop import Stopped
from dapt_core.store import ArtifactStore, IntegrityError, UnsafeKeyError

log = logging.getLogger("dapt.cpt")

JOURNAL_FORMAT = "dapt-cpt-journal/1"


class JournalError(IntegrityError):
    """A resume journal that fails verification: refused, never trusted."""


class JournalEntry(BaseModel):
    """One checkpoint with its link in the hash chain: judged (`accepted` set), or a stop's resume point
    (`interrupted`, with the stop's reason: never judged, never promoted)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=1)
    checkpoint: DirRef
    chain: str = Field("", exclude=True, description="sha256 of the previous link and this entry; set when written.")
    interrupted: bool = False
    reason: str | None = None
    accepted: bool | None = None
    reasons: list[str] = Field(default_factory=list)
    numbers: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    backend: str | None = None
    trails_original: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _judged_or_interrupted(self) -> JournalEntry:
        if self.interrupted == (self.accepted is not None):
            raise ValueError(
                f"step {self.step}: an entry is either judged (accepted) or interrupted, not both or neither"
            )
        return self

    def decision(self, attempt: int) -> CheckpointDecision:
        return CheckpointDecision(
            attempt=attempt,
            step=self.step,
            accepted=bool(self.accepted),
            reasons=self.reasons,
            numbers=self.numbers,
            metrics=self.metrics,
            backend=self.backend or "",
            checkpoint=self.checkpoint.uri,
            trails_original=self.trails_original,
        )


class Journal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["dapt-cpt-journal/1"]
    attempt: str = Field(description="The attempt's store prefix (cpt/<content key>) the journal belongs to.")
    entries: list[JournalEntry]


def _chain(previous: str, row: dict) -> str:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous}\n{canonical}".encode()).hexdigest()


def journal_text(entries: list[JournalEntry], prefix: str) -> str:
    """The journal of `entries` (oldest first) for the attempt at `prefix`, each entry chained."""
    chain = _chain(JOURNAL_FORMAT, {"attempt": prefix})
    rows = []
    for entry in entries:
        row = entry.model_dump(mode="json")  # what a reader parses back and hashes
        chain = _chain(chain, row)
        rows.append({**row, "chain": chain})
    return json.dumps({"format": JOURNAL_FORMAT, "attempt": prefix, "entries": rows}, indent=1)


def read_journal(store: ArtifactStore, prefix: str) -> list[JournalEntry]:
    """The entries of the attempt at `prefix` (none when it has no journal yet), after verifying the journal
    (see module docstring); JournalError naming the journal and what to do when any check fails."""
    key = layout.journal_key(prefix)
    if not store.exists(key):
        return []

    def refuse(problem: str) -> JournalError:
        return JournalError(
            f"{store.uri(key)}: the resume journal of {prefix} fails verification ({problem}); it was changed "
            f"or damaged after it was written and is not trusted. Delete {store.uri(prefix)} (the whole attempt) "
            "to run it again from its start."
        )

    try:
        raw = json.loads(store.read_key(key))
        journal = Journal.model_validate(raw)
    except (ValueError, ValidationError) as e:  # json's and UnicodeDecodeError are ValueErrors
        raise refuse(f"not a {JOURNAL_FORMAT} document: {str(e).splitlines()[0][:200]}") from None
    if journal.attempt != prefix:
        raise refuse(f"it belongs to attempt {journal.attempt!r}")
    chain, entries = _chain(JOURNAL_FORMAT, {"attempt": prefix}), []
    for entry, raw_entry in zip(journal.entries, raw["entries"]):
        chain = _chain(chain, {k: v for k, v in raw_entry.items() if k != "chain"})
        if entry.chain != chain:
            raise refuse(f"the hash chain breaks at step {entry.step}")
        if entries and entry.step <= entries[-1].step:
            raise refuse(f"step {entry.step} follows step {entries[-1].step}")
        if entries and entries[-1].accepted is False:
            raise refuse(f"step {entry.step} follows the rejected step {entries[-1].step}, where training stops")
        own = store.uri(layout.checkpoint_key(prefix, f"{train_mod.CHECKPOINT_PREFIX}{entry.step}"))
        if entry.checkpoint.uri != own:
            raise refuse(f"the checkpoint of step {entry.step} is not this attempt's {own}")
        try:
            store.checked_files(entry.checkpoint)  # and each of its files lives in it, under a plain name
        except UnsafeKeyError as e:
            raise refuse(str(e)) from None
        entries.append(entry)
    return entries


def resume_from_journal(store: ArtifactStore, entries: list[JournalEntry], train_dir: Path) -> int:
    """Put the newest journaled checkpoint (judged or interrupted) where the training loop resumes from, and drop
    local checkpoints after it (written but never journaled: that stretch is trained again). Returns its step."""
    resume_step = entries[-1].step if entries else 0
    for step, path in train_mod.list_checkpoints(train_dir):
        if step > resume_step:
            shutil.rmtree(path)
    if entries:
        dest = train_dir / f"{train_mod.CHECKPOINT_PREFIX}{resume_step}"
        if not dest.exists():
            shutil.copytree(store.local_dir(entries[-1].checkpoint), dest)
    return resume_step


def journal_interrupted(store: ArtifactStore, prefix: str, entries: list[JournalEntry], stopped: Stopped) -> Stopped:
    """Upload the checkpoint a stopped training loop wrote and append it to `<prefix>/journal.json` as interrupted (not
    judged, never promoted): the next run resumes from it. Returns `stopped` pointing at the store's copy."""
    if stopped.checkpoint is None or (
        entries and entries[-1].step >= stopped.step
    ):  # no step since the last journaled one
        stopped = stopped.model_copy(update={"checkpoint": entries[-1].checkpoint.uri if entries else None})
    else:
        local = Path(stopped.checkpoint)
        ref = store.put_dir(local, layout.checkpoint_key(prefix, local.name))
        entries.append(JournalEntry(step=stopped.step, interrupted=True, reason=stopped.reason, checkpoint=ref))
        store.put_text(journal_text(entries, prefix), layout.journal_key(prefix))
        log.warning(
            "stopped (%s) at step %d: checkpoint %s journaled; a re-run resumes from it",
            stopped.reason,
            stopped.step,
            ref.uri,
        )
        stopped = stopped.model_copy(update={"checkpoint": ref.uri})
    stop.saved(stopped)
    return stopped
