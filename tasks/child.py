"""Run a training attempt in a child process (`python -m dapt_core.cpt ...`, or torchrun launching it) and read back
its result: the attempt's log lines stream into the task's log, a stop request reaches the child as SIGTERM.

Why a child: memory. Everything the parent did before (libraries, tokenizer extension, packing, the base
evaluations' heap, which glibc rarely returns) would otherwise sit under the training peak (bench/README.md,
"Memory: the demo's peak RSS"); a fresh process starts from the libraries alone and gives all back when it exits.

The child runs in its own session, so a terminal's Ctrl-C reaches it only through this process's stop request:
SIGTERM, which gives it train.stop_grace_s to checkpoint (torchrun forwards it to every rank)."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from dapt_core import stop
from dapt_core.attempt_events import AttemptObserver, read_event
from dapt_core.cpt import stopped_path
from dapt_core.stop import Stopped, StopRequested
from dapt_core.store import s3_environment


def task_log(name: str) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger; the `name` logger when called outside a run (unit use)."""
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # no run context
        return logging.getLogger(name)


def _forward_stop(proc: subprocess.Popen) -> None:
    """Until `proc` ends: on a stop request, SIGTERM it (torchrun passes it on to every rank)."""
    while proc.poll() is None:
        if stop.wait(0.5):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return


Manifest = TypeVar("Manifest", bound=BaseModel)


@dataclass(frozen=True)
class EntryFiles:
    """The files of an attempt's entry point, `python -m dapt_core.cpt|dapt_core.sft SPEC RESULT WORKDIR` (run as
    it is, or by torchrun on every rank), in one temporary directory."""

    spec: Path
    result: Path
    work: Path

    @classmethod
    def write(cls, spec: BaseModel, tmp: Path) -> EntryFiles:
        """`spec` written as JSON in `tmp`, where the result and the work directory will be."""
        files = cls(spec=tmp / "spec.json", result=tmp / "result.json", work=tmp / "work")
        files.spec.write_text(spec.model_dump_json())
        return files

    @property
    def args(self) -> list[str]:
        return [str(self.spec), str(self.result), str(self.work)]


def run_child(
    cmd: list[str],
    result_path: Path,
    result_type: type[Manifest],
    grace_s: float,
    log: logging.Logger | logging.LoggerAdapter,
    observer: AttemptObserver | None = None,
) -> Manifest:
    """Run `cmd` (which writes `result_path`, or `stopped_path(result_path)` when stopped) to its end; the result,
    read as `result_type`. Its event lines go to `observer` (the CLI bar, the UI's artifacts:
    dapt_core/attempt_events.py), its other lines to `log`. Raises StopRequested when the child stopped on request,
    RuntimeError (with its last lines) on failure."""
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with (
        stop.training(grace_s),
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, **s3_environment()},  # the child opens the store: the credentials this process was given
        ) as proc,
    ):
        threading.Thread(target=_forward_stop, args=(proc,), name="dapt-forward-stop", daemon=True).start()
        for line in proc.stdout:  # streamed: a long run shows its progress in the flow run's logs
            line = line.rstrip()
            event = read_event(line)
            if event is None:
                tail.append(line)
                log.info("%s", line)
            elif observer is not None:
                event.replay(observer)
    stopped = stopped_path(result_path)
    if stopped.is_file():
        result = Stopped.model_validate_json(stopped.read_text())
        stop.saved(result)
        raise StopRequested(result)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} exited with {proc.returncode}; its last lines:\n"
            + "\n".join(tail)
        )
    return result_type.model_validate_json(result_path.read_text())


def run_in_child(
    module: str,
    spec: BaseModel,
    result_type: type[Manifest],
    tmp: Path,
    grace_s: float,
    log: logging.Logger | logging.LoggerAdapter,
    observer: AttemptObserver | None = None,
) -> Manifest:
    """An attempt in a fresh child process (train.isolate): `python -m <module> SPEC RESULT WORKDIR`, the entry point
    of dapt_core.cpt and dapt_core.sft, with its spec and result as JSON files in `tmp`."""
    files = EntryFiles.write(spec, tmp)
    return run_child([sys.executable, "-m", module, *files.args], files.result, result_type, grace_s, log, observer)
