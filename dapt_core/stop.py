"""Stopping training early without losing it: a process-wide stop request honoured at the next optimizer step.

Signals can only be handled in the main thread, while training runs in a worker thread (a Prefect task) or in
torchrun's worker processes. So whoever owns the signals (the CLI and the flows: flows/interrupt.py; the torchrun entry
point: dapt_core/cpt.py) only calls `request()`; the training loop (dapt_core/train/) polls `requested()` before each
optimizer step, writes a checkpoint of the current step and raises `StopRequested`; the attempt uploads that
checkpoint with an "interrupted, not judged" journal entry that a re-run resumes from (dapt_core/cpt.py).

`training(grace_s)` marks a running loop (or a launched trainer): a signal handler uses it to decide between "stop
at the next step and checkpoint, within grace_s" and "nothing to save: exit now". `saved()` says the stop checkpoint
is in the store, so the process may exit even if what remains (Prefect reporting the stopped run) cannot finish.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import BaseModel

_requested = threading.Event()
_lock = threading.Lock()
_reason = ""
_graces: list[float] = []  # stop_grace_s of every training loop running in this process
_saved: list[Stopped] = []
_saved_event = threading.Event()


class Stopped(BaseModel):
    """Where a stopped run stands: the step its checkpoint holds (None: no step since the last one) and why."""

    step: int
    checkpoint: str | None  # a local checkpoint directory, or the store uri once it is uploaded
    reason: str


class StopRequested(Exception):
    """Training stopped on request (a signal, a cancel); `stopped.checkpoint` resumes it. Not a failure of the data
    or the code: a re-run of the same command continues from that checkpoint."""

    def __init__(self, stopped: Stopped):
        self.stopped = stopped
        where = (
            f"checkpoint of step {stopped.step}: {stopped.checkpoint}" if stopped.checkpoint else "no new checkpoint"
        )
        super().__init__(f"training stopped at step {stopped.step} ({stopped.reason}); {where}")


def request(reason: str) -> None:
    """Ask every training loop of this process to stop at its next optimizer step."""
    global _reason
    with _lock:
        _reason = _reason or reason
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _reason


def wait(timeout: float) -> bool:
    """Block up to `timeout` seconds for a stop request; True once there is one."""
    return _requested.wait(timeout)


def saved(stopped: Stopped) -> None:
    """The stopped run's checkpoint is in the store (and journaled): a re-run resumes from it."""
    with _lock:
        _saved.append(stopped)
    _saved_event.set()


def wait_saved(timeout: float) -> Stopped | None:
    """Block up to `timeout` seconds for `saved()`; what was saved, or None."""
    if not _saved_event.wait(timeout):
        return None
    with _lock:
        return _saved[-1]


def reset() -> None:
    """Forget a stop request (a new run in the same process)."""
    global _reason
    with _lock:
        _reason = ""
        _saved.clear()
    _requested.clear()
    _saved_event.clear()


@contextmanager
def training(grace_s: float) -> Iterator[None]:
    """Mark a training loop (or a trainer launched as a subprocess) as running while the block runs."""
    with _lock:
        _graces.append(grace_s)
    try:
        yield
    finally:
        with _lock:
            _graces.remove(grace_s)


def active_grace() -> float | None:
    """The grace of the running training loop(s) (the longest), or None when none runs: nothing to checkpoint."""
    with _lock:
        return max(_graces) if _graces else None
