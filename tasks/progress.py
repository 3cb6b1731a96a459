"""Progress a person can watch: rich bars in the `dapt` CLI, and Prefect artifacts in the UI.

The CLI opens `bars()` around a flow call; flows report stages with `stage()` and `advance()` (no-ops when a flow runs
elsewhere: a worker, the UI). Training reports through `TrainingProgress`, the observer a CPT attempt or SFT run is
given (in this process, or replayed from a child's event lines: dapt_core/attempt_events.py): a step-level bar in the
CLI (step, loss, tokens/s, ETA) and a line per checkpoint decision, a progress artifact in the UI that also says which
checkpoint is being evaluated, and a table artifact of checkpoint decisions that grows as they are made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # dapt_core.train imports torch: not at every CLI start
    from dapt_core.train import StepProgress

log = logging.getLogger("dapt.progress")
_active: Progress | None = None
_tasks: dict[str, int] = {}


@contextmanager
def bars(console: Console) -> Iterator[None]:
    global _active
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        _active = progress
        try:
            yield
        finally:
            _active = None
            _tasks.clear()


def stage(name: str, total: int) -> None:
    """Start a bar for a stage of `total` units (files, tasks, steps)."""
    if _active is not None:
        _tasks[name] = _active.add_task(name, total=total)


def advance(name: str, units: int = 1) -> None:
    if _active is not None and name in _tasks:
        _active.advance(_tasks[name], units)


def _say(text: str) -> None:
    """One line above the bars (a checkpoint decision), in the CLI only."""
    if _active is not None:
        _active.console.print(text, highlight=False, soft_wrap=True)


def _describe(name: str, text: str, completed: int | None = None, total: int | None = None) -> None:
    if _active is not None and name in _tasks:
        _active.update(_tasks[name], description=f"{name}: {text}", completed=completed, total=total)


class TrainingProgress:
    """Observer of one training run (`run_attempt`, `run_sft`): the CLI bar and the UI's artifacts.

    Artifact keys: `<key>-progress` (percent of steps; its description says what runs now) and `<key>-decisions`
    (a table, one row per judged checkpoint, a new version per decision). Outside a flow run the artifacts are
    skipped; an artifact that cannot be written never stops training."""

    def __init__(self, name: str, key: str):
        self.name, self.key = name, key
        self.artifact_id = None
        self.total_steps = 1
        self.decisions: list[dict] = []
        stage(name, total=1)

    def _artifact(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent, key=f"{self.key}-progress", description=description
                )
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as e:  # the UI is a view: training goes on without it
            log.warning("progress artifact %s not updated: %s", self.key, e)

    def step(self, p: StepProgress) -> None:
        self.total_steps = p.total_steps
        _describe(self.name, p.line(), completed=p.step, total=p.total_steps)
        self._artifact(100.0 * p.step / p.total_steps, f"{self.name}: {p.line()}")

    def evaluating(self, step: int) -> None:
        _describe(self.name, f"evaluating the checkpoint of step {step}")
        self._artifact(100.0 * step / self.total_steps, f"{self.name}: evaluating the checkpoint of step {step}")

    def judged(self, step: int, accepted: bool, reasons: list[str], metrics: dict[str, float]) -> None:
        from prefect.artifacts import create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        domain_bpb = metrics.get("domain/bits_per_byte")
        _say(
            f"{self.name}, step {step}: {'accepted' if accepted else 'REJECTED: ' + '; '.join(reasons)}"
            + (f" (domain bpb {domain_bpb:.4f})" if domain_bpb is not None else "")
        )
        self.decisions.append(
            {"step": step, "decision": "accepted" if accepted else "REJECTED", "reasons": "; ".join(reasons)}
            | {k: round(v, 5) for k, v in sorted(metrics.items()) if not k.endswith("_n")}
        )
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        try:
            create_table_artifact(
                self.decisions, key=f"{self.key}-decisions", description=f"{self.name}: checkpoint decisions"
            )
        except Exception as e:
            log.warning("decision table %s not updated: %s", self.key, e)

    def done(self, description: str) -> None:
        _describe(self.name, description, completed=self.total_steps, total=self.total_steps)
        self._artifact(100.0, f"{self.name}: {description}")
