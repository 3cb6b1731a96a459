"""Rich progress bars for flows run from the `dapt` CLI; no-ops when a flow runs elsewhere (worker, UI).

The CLI opens `bars()` around a flow call; flows report stages with `stage()` and `advance()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_active: Progress | None = None
_tasks: dict[str, int] = {}


@contextmanager
def bars(console: Console) -> Iterator[None]:
    global _active
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        _active = progress
        try:
            yield
        finally:
            _active = None
            _tasks.clear()


def stage(name: str, total: int) -> None:
    """Start a bar for a stage of `total` units (files, tasks)."""
    if _active is not None:
        _tasks[name] = _active.add_task(name, total=total)


def advance(name: str, units: int = 1) -> None:
    if _active is not None and name in _tasks:
        _active.advance(_tasks[name], units)
