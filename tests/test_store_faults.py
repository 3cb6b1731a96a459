"""Store and network faults end in one clear error: `dapt prepare --json` runs as a subprocess against moto's S3
server running as a separate process on 127.0.0.1, which the tests kill, pause (SIGSTOP) or never start.

Each failing run must end within the retry budget with exactly one `error:` line (and few lines in all) on
stderr, exit code 2, the JSON error as the last stdout line, a log file holding the details, no partial object
under a final key, and a re-run once the server is back must give the manifest hashes of an undisturbed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from dapt_core.manifest import CleanManifest
from tests.corpus import write_config, write_corpus
from tests.local_services import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration  # moto's S3 server and `dapt prepare` subprocesses, some killed mid-run

BUDGET_S = 4.0  # DAPT_STORE_RETRY_SECONDS for the failing runs
STARTUP_S = 20.0  # interpreter + imports + flow start on a busy 2-core machine, on top of the budget
BUCKET = "faults"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class MotoProcess:
    """moto's S3 server in its own process, so it can be killed, paused and started again on the same port.

    It records every request it completes in `recording` (moto's recorder), so that a restarted server can replay
    them: the state a killed server had, with any half-received request missing."""

    def __init__(self, port: int, recording: Path):
        self.port, self.url, self.proc, self.recording = port, f"http://127.0.0.1:{port}", None, recording

    def start(self) -> None:
        env = {**os.environ, "MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(self.recording)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def replay(self) -> None:
        """Rebuild the state of the previous process from the recording. moto appends one JSON line per request: a
        line the kill cut off half-written is a request that never completed, and would make the replay fail (500),
        so only whole lines are replayed."""
        lines = self.recording.read_text(encoding="utf-8", errors="replace").splitlines()
        whole = [line for line in lines if _is_json(line)]
        if len(whole) != len(lines):
            self.recording.write_text("".join(line + "\n" for line in whole), encoding="utf-8")
        urllib.request.urlopen(
            urllib.request.Request(f"{self.url}/moto-api/recorder/replay-recording", method="POST"), timeout=120
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # a paused process must be able to die
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last_json(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


@pytest.fixture
def moto(tmp_path):
    server = MotoProcess(free_port(), tmp_path / "moto-recording.jsonl")
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _client(url: str):
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


def _seed(url: str, corpus: dict[str, Path]) -> None:
    """The bucket and the raw corpus under raw/<kind>/ (moto keeps its state in memory: a restart loses it)."""
    s3 = _client(url)
    s3.create_bucket(Bucket=BUCKET)
    for kind, folder in corpus.items():
        for path in sorted(folder.iterdir()):
            s3.upload_file(str(path), BUCKET, f"raw/{kind}/{path.name}")


def _config(tmp_path: Path, prefix: str) -> Path:
    dirs = {kind: f"s3://{BUCKET}/raw/{kind}/" for kind in ("domain", "general", "eval")}
    return write_config(tmp_path, dirs, store=f"s3://{BUCKET}/{prefix}")


def _env(tmp_path: Path, url: str, prefect_harness, **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAPT_", "PREFECT_"))}
    env.update(
        PYTHONPATH=str(REPO),
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        DAPT_STORE_RETRY_SECONDS=str(BUDGET_S),
        DAPT_LOG_DIR=str(tmp_path / "logs"),
        DAPT_CACHE_DIR=str(tmp_path / "cache"),
        PREFECT_HOME=str(prefect_harness),
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_LOGGING_TO_API_ENABLED="false",
    )
    env.update(extra)
    return env


def _start(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dapt.flows.cli", "prepare", str(config), "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, started: float) -> Run:
    out, err = proc.communicate(timeout=300)
    return Run(proc.returncode, out, err, time.monotonic() - started)


def _prepare(config: Path, env: dict[str, str]) -> Run:
    started = time.monotonic()
    return _finish(_start(config, env), started)


def _assert_one_clear_error(run: Run, *needles: str) -> str:
    """Exit 2, one `error:` line (and under 20 lines in all) on stderr, the JSON error last on stdout, and the log
    file it names holding the details. Returns the message."""
    lines = run.stderr.strip().splitlines()
    if os.environ.get("SHOW_FAULT_STDERR"):
        print(f"\n--- {run.seconds:.1f} s, rc {run.rc}\n{run.stderr}")
    assert run.rc == 2, run.stderr[-3000:]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, run.stderr[-3000:]
    assert len(lines) < 20, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    err = run.last_json
    for needle in needles:
        assert needle in err["error"], err["error"]
    assert " ".join(err["error"].split()) in " ".join(run.stderr.split())  # the same message on the terminal
    log = Path(err["log"])
    assert f"details: {log}" in run.stderr
    assert "Traceback" in log.read_text() and err["error"] in log.read_text()
    return err["error"]


def _manifest_hashes(manifest: dict) -> dict:
    """The content of a prepare run: each ingest batch's file table and shard, every clean output (sha256s; not which
    ran or was cached)."""
    clean = CleanManifest.model_validate(manifest["clean"])
    return {
        "ingested": sorted(
            (m["files"]["sha256"], m["shard"]["sha256"] if m["shard"] else None)
            for m in manifest["ingested"] + manifest["evals"]
        ),
        "clean": {
            k: getattr(clean, k).sha256
            for k in ("domain", "general", "decisions", "stats_json", "stats_md")
            if getattr(clean, k)
        },
        "counts": (clean.input_docs, clean.kept_docs, clean.dropped),
    }


def _assert_no_partial_objects(url: str, prefix: str) -> list[str]:
    """Every object the store wrote carries the sha256 of the file it uploaded: the bytes under that key must match.
    Returns the keys checked."""
    s3 = _client(url)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    for key in keys:
        obj = s3.get_object(Bucket=BUCKET, Key=key)
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == obj["Metadata"]["sha256"], key
    return keys


def _wait_for_objects(url: str, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the run has written its first object under `prefix` (ingest has begun) or has ended."""
    s3 = _client(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount"):
            return
        time.sleep(0.05)
    raise AssertionError("the run wrote nothing under " + prefix)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, prefect_harness):
    """The manifest hashes of an undisturbed run on the same corpus (its own server, so no test disturbs it)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    server = MotoProcess(free_port(), tmp_path / "moto-recording.jsonl")
    server.start()
    try:
        _seed(server.url, corpus)
        run = _prepare(_config(tmp_path, "reference"), _env(tmp_path, server.url, prefect_harness))
    finally:
        server.kill()
    assert run.rc == 0, run.stderr[-3000:]
    return _manifest_hashes(run.last_json)


def test_no_credentials(moto, corpus, tmp_path, prefect_harness):
    _seed(moto.url, corpus)
    env = _env(tmp_path, moto.url, prefect_harness)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    run = _prepare(_config(tmp_path, "art"), env)
    _assert_one_clear_error(run, f"s3://{BUCKET}/art", moto.url, "AWS_ACCESS_KEY_ID")
    assert run.seconds < STARTUP_S


def test_missing_bucket(moto, corpus, tmp_path, prefect_harness):
    _seed(moto.url, corpus)
    missing = write_config(
        tmp_path, {k: f"s3://{BUCKET}/raw/{k}/" for k in ("domain", "general", "eval")}, store="s3://no-such-bucket/art"
    )
    run = _prepare(missing, _env(tmp_path, moto.url, prefect_harness))
    _assert_one_clear_error(run, "bucket 'no-such-bucket' does not exist", moto.url)


def test_server_not_running(tmp_path, prefect_harness):
    url = f"http://127.0.0.1:{free_port()}"
    run = _prepare(_config(tmp_path, "art"), _env(tmp_path, url, prefect_harness))
    _assert_one_clear_error(run, f"s3://{BUCKET}/art", "cannot reach", url, "DAPT_STORE_RETRY_SECONDS=4")
    assert 0.75 * BUDGET_S <= run.seconds < BUDGET_S + STARTUP_S  # it retried, within the budget


def test_server_killed_mid_ingest_then_rerun(moto, corpus, tmp_path, prefect_harness, reference):
    _seed(moto.url, corpus)
    config, env = _config(tmp_path, "art"), _env(tmp_path, moto.url, prefect_harness)
    started = time.monotonic()
    proc = _start(config, env)
    _wait_for_objects(moto.url, "art/ingest/", proc)
    moto.kill()
    killed = time.monotonic()
    run = _finish(proc, started)
    _assert_one_clear_error(run, "cannot reach", moto.url)
    assert time.monotonic() - killed < BUDGET_S + 15

    moto.start()
    moto.replay()  # the state the killed server had
    stored = _assert_no_partial_objects(moto.url, "art/")
    assert any(key.startswith("art/ingest/") for key in stored)  # the killed run had stored some work

    rerun = _prepare(config, env)
    assert rerun.rc == 0, rerun.stderr[-3000:]
    assert _manifest_hashes(rerun.last_json) == reference
    _assert_no_partial_objects(moto.url, "art/")


def test_server_paused_longer_than_budget_then_rerun(moto, corpus, tmp_path, prefect_harness, reference):
    _seed(moto.url, corpus)
    config, env = _config(tmp_path, "art"), _env(tmp_path, moto.url, prefect_harness)
    started = time.monotonic()
    proc = _start(config, env)
    _wait_for_objects(moto.url, "art/ingest/", proc)
    moto.pause()
    try:
        paused = time.monotonic()
        run = _finish(proc, started)
        waited = time.monotonic() - paused
    finally:
        moto.resume()
    _assert_one_clear_error(run, moto.url)
    assert waited < BUDGET_S + 15
    _assert_no_partial_objects(moto.url, "art/")  # what was in flight when the server froze never became an object

    rerun = _prepare(config, env)
    assert rerun.rc == 0, rerun.stderr[-3000:]
    assert _manifest_hashes(rerun.last_json) == reference


def test_config_error_under_json(tmp_path, prefect_harness):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {domain: [{name: a, paths: [x]}]}\nclean: {dedup: {num_perm: 3}}\n")
    run = _prepare(bad, _env(tmp_path, "http://127.0.0.1:9", prefect_harness))
    message = _assert_one_clear_error(run, str(bad), "clean.dedup.num_perm")
    assert "greater than or equal to 16" in message
