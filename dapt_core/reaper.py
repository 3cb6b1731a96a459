"""Watchdog of a dapt process: once it is gone (SIGKILL included), end the processes it had started.

`python -m dapt_core.reaper PID` (started by the CLI in its own session, so a Ctrl-C does not reach it) notes PID's
descendants every second: the ephemeral Prefect server (uvicorn), torchrun and its ranks, packing workers. When PID
dies they are re-parented and would run on as orphans; the watchdog terminates those it saw (same pid and start
time: never a process that merely reused a pid), kills what is left after 5 s, and exits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import psutil


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(pid: int, interval_s: float = 1.0, kill_after_s: float = 5.0) -> list[int]:
    """Block until process `pid` ends, then end its last seen descendants; returns their pids."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    while _alive(parent):
        try:
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        seen = {c.pid: c for c in children if c.pid != os.getpid()}
        time.sleep(interval_s)
    left = [p for p in seen.values() if _alive(p)]  # Process objects check the start time: no reused pid
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, still = psutil.wait_procs(left, timeout=kill_after_s)
    for p in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [p.pid for p in left]


if __name__ == "__main__":
    watch(int(sys.argv[1]))
