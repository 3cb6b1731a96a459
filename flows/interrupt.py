"""SIGTERM and SIGINT (Ctrl-C) of a dapt process: training stops with a resumable checkpoint and nothing lingers.

* First signal while a training loop runs (dapt_core/stop.py): stop at the next optimizer step. The loop writes a
  checkpoint of that step, the CPT attempt / SFT task uploads and journals it ("interrupted, not judged"), and the
  command exits with 128 + the signal number and one line saying how to resume. Should that take longer than
  train.stop_grace_s, the process exits anyway: the last journaled checkpoint is then where the re-run resumes.
  Once the checkpoint is journaled the process exits within REPORT_SLACK_S even if Prefect cannot report the stopped
  run (a terminal's Ctrl-C also reaches the ephemeral Prefect server, which then is gone).
* First signal with no training running (data stages, evaluation, promotion: every stage is cached and safe to kill):
  exit now. A second signal: exit now.
* Exiting now first ends this process's children (the ephemeral Prefect server, torchrun, packing workers); a
  watchdog process (dapt_core/reaper.py) ends them when this process is killed with SIGKILL.

Prefect swaps in its own SIGTERM handler while a flow runs (it raises in the main thread, marks the flow crashed and
leaves the training thread running), so the training flows install this handler again for their body
(`handle_signals()`). A cancel from the Prefect UI of a run served by `dapt serve` (or a process worker) reaches the
flow-run process as SIGTERM, so it takes the same path; the runner kills the process 30 s later, so keep
train.stop_grace_s below that there. Signals can only be handled in the main thread: elsewhere this is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psutil

from dapt_core import stop
from dapt_core.stop import Stopped, StopRequested

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPORT_SLACK_S = 10.0  # after the stop checkpoint is journaled: time for Prefect to record the stopped run
_state = {"signals": 0, "signum": 0, "resume": "retry the flow run to resume", "watchdog": False, "final": False}
_final_lock = threading.Lock()


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _say_final(line: str) -> None:
    """The one closing line (the normal path and the exit watcher may both get there)."""
    with _final_lock:
        if not _state["final"]:
            _state["final"] = True
            _say(line)


def _stopped_line(s: Stopped) -> str:
    where = (
        f"checkpoint of step {s.step} saved to {s.checkpoint}"
        if s.checkpoint
        else f"stopped at step {s.step}, nothing new to save"
    )
    return f"interrupted ({s.reason}): {where}; {_state['resume']}"


def _end_children() -> None:
    """Terminate this process's descendants (SIGKILL after 3 s)."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _exit_now(signum: int, line: str) -> None:
    _say_final(line)
    _end_children()
    os._exit(128 + signum)


def _exit_when_saved(signum: int, grace: float) -> None:
    """Exit once the stop checkpoint is journaled and the command had REPORT_SLACK_S to end by itself, or at
    the grace."""
    name = signal.Signals(signum).name
    deadline = time.monotonic() + grace
    stopped = stop.wait_saved(grace)
    if stopped is None:
        _exit_now(
            signum,
            f"interrupted ({name}): no checkpoint within train.stop_grace_s "
            f"({grace:g} s); {_state['resume']} from the last one",
        )
    time.sleep(max(0.0, min(REPORT_SLACK_S, deadline - time.monotonic())))
    _exit_now(signum, _stopped_line(stopped))


def _on_signal(signum: int, _frame) -> None:
    _state["signals"] += 1
    _state["signum"] = _state["signum"] or signum
    name = signal.Signals(signum).name
    grace = stop.active_grace()
    if _state["signals"] > 1 or grace is None:
        _exit_now(signum, f"interrupted ({name}): finished stages are in the store; {_state['resume']}")
    stop.request(name)
    _say(
        f"{name}: stopping at the next training step with a checkpoint "
        f"(up to {grace:g} s); press Ctrl-C again to exit at once"
    )
    threading.Thread(target=_exit_when_saved, args=(signum, grace), name="dapt-stop-grace", daemon=True).start()


@contextmanager
def handle_signals():
    """SIGINT / SIGTERM stop training gracefully while the block runs (see module docstring); the previous handlers
    (Prefect's, inside a flow) come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def stoppable_command():
    """Around a `dapt` command: signals handled, a watchdog for SIGKILL, and a stopped training run ends the command
    with one line saying how to resume and exit code 128 + signal."""
    command = shlex.join(["dapt", *sys.argv[1:]])
    stop.reset()
    _state.update(signals=0, signum=0, final=False, resume=f"run `{command}` again to resume")
    if not _state["watchdog"]:  # one per process (tests invoke several commands in one process)
        _state["watchdog"] = True
        subprocess.Popen(
            [sys.executable, "-m", "dapt_core.reaper", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    with handle_signals():
        try:
            yield
        except StopRequested as e:
            _say_final(_stopped_line(e.stopped))
            raise SystemExit(128 + _state["signum"] if _state["signum"] else 1) from None
