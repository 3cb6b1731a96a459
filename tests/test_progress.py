"""The CLI's view of training: a step bar and one line per checkpoint decision, fed in this process or from a child's
event lines (dapt_core/attempt_events.py)."""

from __future__ import annotations

import io

from rich.console import Console

from dapt.tasks import progress
from dapt_core.attempt_events import EventPrinter, read_event
from dapt_core.train import StepProgress


def test_child_events_drive_the_cli_bar_and_decision_lines():
    out, events = io.StringIO(), io.StringIO()
    child = EventPrinter(events)  # what a train.isolate child prints on its stdout
    child.step(StepProgress(step=3, total_steps=6, loss=2.25, lr=1e-4, tokens_per_second=512.0, eta_seconds=9.0))
    child.evaluating(3)
    child.judged(3, True, [], {"domain/bits_per_byte": 0.91234, "general/word_perplexity": float("nan")})
    child.judged(6, False, ["general word ppl +12%"], {"domain/bits_per_byte": 0.95})
    child.done("promoted step 3")
    lines = events.getvalue().splitlines()
    assert len(lines) == 5

    with progress.bars(Console(file=out, width=200, force_terminal=False)):
        watch = progress.TrainingProgress("CPT attempt 0", "test-cpt")
        for line in lines:
            read_event(f"[rank0]: {line}").replay(watch)  # a launcher's prefix does not hide an event
        bar = progress._active.tasks[progress._tasks["CPT attempt 0"]]
        assert (bar.completed, bar.total) == (6, 6) and "promoted step 3" in bar.description
    text = out.getvalue()
    assert "CPT attempt 0, step 3: accepted (domain bpb 0.9123)" in text
    assert "CPT attempt 0, step 6: REJECTED: general word ppl +12% (domain bpb 0.9500)" in text
    assert [d["decision"] for d in watch.decisions] == ["accepted", "REJECTED"]
    assert read_event("step 3/6 loss 2.25 (an ordinary log line)") is None
