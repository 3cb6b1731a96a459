"""Stopping dapt: SIGTERM / Ctrl-C during CPT, kill -9 at any stage, and what is left behind.

The `dapt cpt` runs are real subprocesses on a tiny Llama (one torch thread, so runs are bitwise comparable), each with
its own ephemeral Prefect server and TMPDIR. Training is long enough (200 steps, judged only at the end) that a signal
sent shortly after the loop starts always lands mid-training. The signal tests share one store with the undisturbed
run, so their data stages and base evaluation come from its cache; each uses its own train.log_every (no logger is
on), which puts its CPT attempt under a key of its own without changing what is trained.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dapt_core import leftovers
from dapt_core.config import load_config
from dapt_core.manifest import PrepareManifest
from dapt_core.store import LocalStore, open_store
from tests.corpus import write_config, write_corpus
from tests.tiny_model import pretrained_general_base

pytestmark = (
    pytest.mark.integration
)  # `dapt cpt` subprocesses stopped by signals, and signal handlers in child processes

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
STEPS = 200
TRAINING = "dapt.train - training steps"  # logged (INFO) by the loop when it starts: see _logging_config


class Dapt:
    """`dapt cpt CONFIG --json` in a subprocess; stderr collected line by line."""

    def __init__(self, config: Path, tmpdir: Path, home: Path):
        """`home`: PREFECT_HOME, with the logging config of `_logging_config` in it."""
        tmpdir.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        env.update(
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
            TMPDIR=str(tmpdir),
            PREFECT_HOME=str(home),
            PREFECT_LOGGING_SETTINGS_PATH=str(home / "logging.yml"),
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dapt.flows.cli", "cpt", str(config), "--json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group, as in a shell
        )
        self.stderr: list[str] = []
        self._stdout: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self._stdout), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert self.proc.poll() is None, f"dapt exited ({self.proc.returncode}) before {text!r}:\n" + self.tail()
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + self.tail()
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc

    def manifest(self) -> dict:
        return json.loads(self._stdout[-1])

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.stderr[-n:])


def _logging_config(home: Path) -> None:
    """Prefect's logging config plus dapt's INFO lines on the console (how the test sees training start)."""
    import prefect.logging
    import yaml

    config = yaml.safe_load((Path(prefect.logging.__file__).parent / "logging.yml").read_text())
    config["loggers"]["dapt"] = {"level": "INFO", "handlers": ["console"], "propagate": False}
    home.mkdir(parents=True, exist_ok=True)
    (home / "logging.yml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    dirs = write_corpus(root, n_domain=30, n_general=20)
    base = pretrained_general_base(root, SEQ, steps=30)
    shared = root / "store"

    def config(run: Path, log_every: int = 10, store: Path = shared) -> Path:
        run.mkdir(parents=True)
        extra = f"""model: {{base: "{base}"}}
tokenizer: {{min_frequency: 5, domain_vocab_size: 600}}
mix: {{general_fraction: 0.05, seq_len: {SEQ}, heldout_fraction: 0.1}}
train: {{lr: 1e-4, max_steps: {STEPS}, save_every: {STEPS}, batch_size: 8, report_to: [], log_every: {log_every},
  stop_grace_s: 25}}
eval: {{max_probes: 20, batch_size: 8, max_attempts: 1}}
"""
        return write_config(run, dirs, store=str(store), extra=extra)

    config.home = root / "prefect-home"  # one Prefect database for all runs: its migrations run once
    _logging_config(config.home)
    return config


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An undisturbed run: its CPT manifest and store."""
    run = tmp_path_factory.mktemp("undisturbed")
    config = tiny(run / "run")
    dapt = Dapt(config, run / "tmp", tiny.home)
    assert dapt.finish() == 0, dapt.tail()
    return dapt.manifest(), Path(load_config(config).store)


def _final_weights(manifest: dict) -> dict[str, torch.Tensor]:
    return load_file(manifest["checkpoints"][-1]["files"]["model.safetensors"]["uri"])


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["checkpoints"][-1]["uri"].endswith(f"checkpoint-{STEPS}") and b["checkpoints"][-1]["uri"].endswith(
        f"checkpoint-{STEPS}"
    )
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def _assert_gone(procs: list[psutil.Process], timeout: float = 15) -> None:
    """Every process in `procs` ends within `timeout` (zombies count as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"still running after the dapt process ended: {[(p.pid, p.cmdline()) for p in alive]}")


def _newest_journal(store: Path) -> list[dict]:
    journal = max(store.glob("cpt/*/journal.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(journal.read_text())["entries"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cpt_with_a_checkpoint_and_the_rerun_resumes_it_exactly(tiny, reference, tmp_path, sig):
    config = tiny(tmp_path / "run", log_every=int(sig))
    store = Path(load_config(config).store)
    dapt = Dapt(config, tmp_path / "tmp", tiny.home)
    dapt.wait_for(TRAINING)
    time.sleep(1.5)  # some steps into training
    children = psutil.Process(dapt.proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # the ephemeral Prefect server
    sent = time.monotonic()
    if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole foreground process group, the Prefect server included
        os.killpg(dapt.proc.pid, sig)
    else:  # kill, Kubernetes, a spot preemption: the process
        dapt.proc.send_signal(sig)
    rc = dapt.finish(timeout=30)
    print(f"{sig.name}: exit {rc} after {time.monotonic() - sent:.1f} s")
    assert rc == 128 + sig

    # One line says how to resume, naming the checkpoint of the step training stopped at.
    resume = [line for line in dapt.stderr if "again to resume" in line]
    assert len(resume) == 1
    last = _newest_journal(store)[-1]
    assert last["interrupted"] is True and last["reason"] == sig.name and last.get("accepted") is None
    step = last["step"]
    assert 0 < step < STEPS
    checkpoint = Path(last["checkpoint"]["uri"])
    assert resume[0] == (
        f"interrupted ({sig.name}): checkpoint of step {step} saved to "
        f"{checkpoint}; run `dapt cpt {config} --json` again to resume"
    )
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    _assert_gone(children)  # the Prefect server and the watchdog: no orphan

    again = Dapt(config, tmp_path / "tmp", tiny.home)
    assert again.finish() == 0, again.tail()
    assert any(f"training steps {step + 1} to {STEPS} (resumed from" in line for line in again.stderr)
    result = again.manifest()
    assert [d["step"] for d in result["decisions"]] == [STEPS]  # the interrupted checkpoint is not judged
    _assert_same_weights(result, reference[0])
    assert not list((tmp_path / "tmp").glob("dapt-*"))


def test_kill_9_during_ingest_clean_and_cpt_then_a_rerun_equals_an_undisturbed_run(tiny, reference, tmp_path):
    store, tmpdir = tmp_path / "store", tmp_path / "tmp"
    config = tiny(tmp_path / "run", store=store)  # a store of its own: the data stages run (and are killed) here
    killed: list[str] = []
    for stage in ("ingest", "clean", "cpt"):
        dapt = Dapt(config, tmpdir, tiny.home)
        if stage == "cpt":
            dapt.wait_for(TRAINING)
            time.sleep(0.5)
        else:
            deadline = time.monotonic() + 240
            while not list(tmpdir.glob(f"dapt-{stage}-{dapt.proc.pid}@*")):
                assert dapt.proc.poll() is None and time.monotonic() < deadline, dapt.tail()
                time.sleep(0.01)
        children = psutil.Process(dapt.proc.pid).children(recursive=True)
        dapt.proc.kill()
        dapt.finish()
        killed += [p.name for p in tmpdir.glob(f"dapt-*-{dapt.proc.pid}@*")]  # what the re-run has to clean up
        _assert_gone(children)
    assert any(name.startswith("dapt-cpt-") for name in killed)  # the checkpoint copies of the killed CPT

    final = Dapt(config, tmpdir, tiny.home)
    assert final.finish() == 0, final.tail()
    _assert_same_weights(final.manifest(), reference[0])
    ours, theirs = (
        PrepareManifest.model_validate_json((root / "runs/test/prepare-latest.json").read_text()).clean
        for root in (store, reference[1])
    )
    for output in ("domain", "general", "decisions"):
        assert getattr(ours, output).sha256 == getattr(theirs, output).sha256
    assert not any((tmpdir / name).exists() for name in killed)
    assert not list(tmpdir.glob("dapt-*")) and not list(store.rglob("*.partial"))


# --- the signal handler, without Prefect ------------------------------------------------------------------------
HANDLER = textwrap.dedent(
    """
    import sys, time
    from dapt_core import stop
    from dapt.flows import interrupt
    with interrupt.stoppable_command():
        if sys.argv[1] == "train":
            with stop.training(float(sys.argv[2])):
                print("ready", flush=True)
                while True:  # a step that never ends: only the grace or a second signal end it
                    time.sleep(0.05)
        print("ready", flush=True)
        time.sleep(60)
    """
)


def _handler_process(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HANDLER, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_ctrl_c_exits_at_once():
    proc = _handler_process("train", "60")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one waits for the step to end
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 130 and time.monotonic() - sent < 5
    err = proc.stderr.read().splitlines()
    assert err[0].startswith("SIGINT: stopping at the next training step") and err[-1].startswith(
        "interrupted (SIGINT)"
    )


def test_no_checkpoint_within_the_grace_exits_anyway():
    proc = _handler_process("train", "1")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143 and 1 <= time.monotonic() - sent < 10
    assert "no checkpoint within train.stop_grace_s (1 s)" in proc.stderr.read().splitlines()[-1]


def test_without_training_a_signal_exits_at_once():
    proc = _handler_process("idle")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 143
    assert proc.stderr.read().splitlines()[-1].startswith("interrupted (SIGTERM): finished stages are in the store")


# --- leftovers ----------------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_leftovers_of_dead_processes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    host = leftovers.owner_tag().split("@")[1]
    dead, live = f"{_dead_pid()}@{host}", leftovers.owner_tag()
    dead_dir, live_dir = tmp_path / f"dapt-cpt-{dead}-x1", tmp_path / f"dapt-cpt-{live}-x2"
    foreign_old, foreign_new = tmp_path / "dapt-cpt-1@otherhost-x3", tmp_path / "dapt-cpt-1@otherhost-x4"
    untagged = tmp_path / "dapt-cpt-abcdef"
    for d in (dead_dir, live_dir, foreign_old, foreign_new, untagged):
        (d / "work").mkdir(parents=True)
    os.utime(foreign_old, (time.time() - 2 * leftovers.MAX_AGE_S,) * 2)

    with leftovers.temp_dir("sft") as mine:
        assert Path(mine).name.startswith(f"dapt-sft-{live}-")
        assert not dead_dir.exists() and not foreign_old.exists()
        assert live_dir.exists() and foreign_new.exists() and untagged.exists()

    store_root = tmp_path / "store"
    (store_root / "ingest").mkdir(parents=True)
    dead_partial = store_root / "ingest" / f".a.parquet.{dead}.q1.partial"
    other_dead = store_root / "ingest" / f".b.parquet.{dead}.q2.partial"
    live_partial = store_root / "ingest" / f".a.parquet.{live}.q3.partial"
    live_odd_name = store_root / "ingest" / f".{dead}.parquet.{live}.q4.partial"  # the owner is the last tag
    for p in (dead_partial, other_dead, live_partial, live_odd_name):
        p.write_bytes(b"half")
    src = tmp_path / "a.parquet"
    src.write_bytes(b"whole")
    LocalStore(store_root).put_file(
        src, "ingest/a.parquet"
    )  # a successful write of the same file sweeps its dead partials
    assert not dead_partial.exists() and other_dead.exists() and live_partial.exists()
    open_store(str(store_root))  # the first open in a process sweeps the whole store
    assert not other_dead.exists() and live_partial.exists() and live_odd_name.exists()
    assert (store_root / "ingest" / "a.parquet").read_bytes() == b"whole"


# --- SFT ----------------------------------------------------------------------------------------------------------
def _sft_inputs(tmp_path: Path, store_root: Path):
    """A tiny model and held-out sets in a store, as the SFT task gets them from CPT and packing."""
    from dapt_core.config import EvalConfig
    from dapt_core.manifest import PackManifest
    from tests.test_sft import _sft_cfg, repeat_task, write_jsonl
    from tests.tiny_model import byte_level_tokenizer, tiny_llama

    rows = repeat_task(200)
    tok = byte_level_tokenizer([f"{r['prompt']}\n{r['response']}" for r in rows], 300)
    model_dir = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    store = LocalStore(store_root)
    model = store.put_dir(model_dir, "cpt/x/promoted")
    heldout = store.put_file(
        write_jsonl(tmp_path / "heldout.jsonl", [{"text": f"{r['prompt']} {r['response']}"} for r in rows[:20]]),
        "pack/eval.jsonl",
    )
    pack = PackManifest(
        train_shards=[],
        eval_domain=heldout,
        eval_general=heldout,
        seq_len=32,
        sequences=0,
        tokens={},
        general_fraction_target=0.0,
        general_fraction_realised=0.0,
        report_json=heldout,
        code_version="test",
    )
    cfg = _sft_cfg(write_jsonl(tmp_path / "sft.jsonl", rows), max_steps=300)
    return model, pack, cfg, EvalConfig(max_probes=0, batch_size=8)


def test_sft_stopped_mid_training_resumes_from_its_journaled_checkpoint(tmp_path, monkeypatch):
    import dapt_core.train as train_mod
    from dapt.tasks.sft import sft_key, sft_task
    from dapt_core import stop
    from dapt_core.evaluate import EvalResult
    from dapt_core.stop import StopRequested

    def stop_once_training() -> None:  # what the signal handler does, from another thread
        while stop.active_grace() is None:
            time.sleep(0.01)
        time.sleep(0.5)
        stop.request("SIGTERM")

    model, pack, cfg, eval_cfg = _sft_inputs(tmp_path, tmp_path / "store")
    threading.Thread(target=stop_once_training, daemon=True).start()
    try:
        with pytest.raises(StopRequested) as stopped:
            sft_task.fn(model, pack, cfg, eval_cfg, EvalResult(metrics={}), str(tmp_path / "store"))
    finally:
        stop.reset()
    key = sft_key(model, pack, cfg, eval_cfg, EvalResult(metrics={}))
    (row,) = json.loads((tmp_path / "store" / "sft" / key / "journal.json").read_text())["entries"]
    assert row["interrupted"] and 0 < row["step"] < 300 and stopped.value.stopped.checkpoint == row["checkpoint"]["uri"]

    calls, real = [], train_mod.load_weights
    monkeypatch.setattr(train_mod, "load_weights", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    resumed = sft_task.fn(model, pack, cfg, eval_cfg, EvalResult(metrics={}), str(tmp_path / "store"))
    monkeypatch.setattr(train_mod, "load_weights", real)
    assert calls and calls[0].parent.name == f"checkpoint-{row['step']}"  # resumed from the journaled checkpoint

    other = tmp_path / "undisturbed"
    other.mkdir()
    model2, pack2, _, _ = _sft_inputs(other, other / "store")
    undisturbed = sft_task.fn(model2, pack2, cfg, eval_cfg, EvalResult(metrics={}), str(other / "store"))
    a = load_file(str(Path(resumed.model.uri) / "model.safetensors"))
    b = load_file(str(Path(undisturbed.model.uri) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "isolated"])
def test_child_attempt_stops_on_request_with_a_checkpoint(prefect_harness, tiny, reference, tmp_path, launch):
    """nproc_per_node=2 (torchrun) or train.isolate (one child process): the stop request reaches the child as
    SIGTERM, the ranks agree on a step, rank 0 uploads and journals its checkpoint, and the task raises
    StopRequested."""
    from dapt.flows.training_data import training_data_flow
    from dapt.tasks.cpt import CPT_CODE, _in_child, _torchrun, base_eval_task
    from dapt_core import stop
    from dapt_core.cpt import AttemptSpec
    from dapt_core.stop import StopRequested

    cfg = load_config(tiny(tmp_path / "run", log_every=99))
    data = training_data_flow(cfg)
    reference = base_eval_task.fn(data.tokenizer.model, data.pack, cfg.eval, cfg.store)
    spec = AttemptSpec(
        start=data.tokenizer.model,
        pack=data.pack,
        train=cfg.train.model_copy(
            update={"batch_size": 4, "nproc_per_node": 2} if launch == "torchrun" else {"isolate": True}
        ),
        eval=cfg.eval.model_copy(update={"backend": "native"}),
        reference=reference,
        store=cfg.store,
        prefix=f"cpt/{launch}-stop",
        attempt=0,
        code_version=CPT_CODE,
    )

    class StopOnceTraining(logging.Handler):  # the task logs every line of torchrun's output
        def emit(self, record: logging.LogRecord) -> None:
            if "training steps" in record.getMessage():
                threading.Timer(1.0, stop.request, ("SIGTERM",)).start()

    handler, logger = StopOnceTraining(), logging.getLogger("dapt.cpt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(StopRequested) as stopped:
            (_torchrun if launch == "torchrun" else _in_child)(spec, tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        stop.reset()
    journal = json.loads(open_store(cfg.store).read_key(f"cpt/{launch}-stop/journal.json"))["entries"]
    assert journal[-1]["interrupted"] and journal[-1]["step"] == stopped.value.stopped.step
    assert 0 < stopped.value.stopped.step < STEPS
