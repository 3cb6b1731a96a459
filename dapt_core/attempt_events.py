"""An attempt's progress, from the child process that trains to the task that launched it.

A training attempt in a child process (`train.isolate`, or torchrun's ranks: tasks/child.py) has neither the CLI's
progress bar nor a Prefect run context. Its rank 0 therefore prints each observer call (a step report, a checkpoint
being evaluated, a decision, the end) as one marked JSON line on stdout; the launching task reads the child's output
and replays those lines into its own observer, the same one an in-process attempt gets (tasks/progress.py). The lines
are data: they are parsed into `AttemptEvent`, a pydantic model, never evaluated or unpickled."""

from __future__ import annotations

import sys
from typing import Literal, Protocol, TextIO

from pydantic import BaseModel, ConfigDict

from dapt_core.train import StepProgress

EVENT_MARK = "@dapt-event "  # found anywhere in a line: a launcher may prefix its ranks' lines


class AttemptObserver(Protocol):
    """Who watches an attempt (the CLI bar, the Prefect UI: tasks/progress.py), on rank 0."""

    def step(self, progress: StepProgress) -> None: ...

    def evaluating(self, step: int) -> None: ...

    def judged(self, step: int, accepted: bool, reasons: list[str], metrics: dict[str, float]) -> None: ...

    def done(self, description: str) -> None: ...


class AttemptEvent(BaseModel):
    """One observer call."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN metric travels as NaN, not as null

    kind: Literal["step", "evaluating", "judged", "done"]
    progress: StepProgress | None = None  # kind "step"
    step: int | None = None  # kinds "evaluating" and "judged"
    accepted: bool | None = None
    reasons: list[str] = []
    metrics: dict[str, float] = {}
    description: str | None = None  # kind "done"

    def replay(self, observer: AttemptObserver) -> None:
        if self.kind == "step" and self.progress is not None:
            observer.step(self.progress)
        elif self.kind == "evaluating" and self.step is not None:
            observer.evaluating(self.step)
        elif self.kind == "judged" and self.step is not None and self.accepted is not None:
            observer.judged(self.step, self.accepted, self.reasons, self.metrics)
        elif self.kind == "done":
            observer.done(self.description or "")


class EventPrinter:
    """The child's observer: every call becomes one event line on `out` (stdout), flushed at once."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def _print(self, event: AttemptEvent) -> None:
        self.out.write(EVENT_MARK + event.model_dump_json(exclude_defaults=True) + "\n")
        self.out.flush()

    def step(self, progress: StepProgress) -> None:
        self._print(AttemptEvent(kind="step", progress=progress))

    def evaluating(self, step: int) -> None:
        self._print(AttemptEvent(kind="evaluating", step=step))

    def judged(self, step: int, accepted: bool, reasons: list[str], metrics: dict[str, float]) -> None:
        self._print(AttemptEvent(kind="judged", step=step, accepted=accepted, reasons=reasons, metrics=metrics))

    def done(self, description: str) -> None:
        self._print(AttemptEvent(kind="done", description=description))


def read_event(line: str) -> AttemptEvent | None:
    """The event a line of the child's output carries, or None for an ordinary line."""
    at = line.find(EVENT_MARK)
    if at < 0:
        return None
    return AttemptEvent.model_validate_json(line[at + len(EVENT_MARK) :])
