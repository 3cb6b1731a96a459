"""Deployments: `dapt serve` and `dapt deploy` against a real Prefect server, and the Dockerfile's consistency.

The server and the serve runner run as subprocesses with their own PREFECT_HOME and PREFECT_API_URL, so this process's
Prefect settings (and the session's ephemeral `prefect_harness`) are never touched; the test talks to the server
through an explicit client.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from dapt_core.config import DaptConfig, load_config
from tests.corpus import prose, write_config, write_corpus
from tests.local_services import free_port
from tests.tiny_model import save_tiny_model_dir

pytestmark = pytest.mark.integration  # a Prefect server, a serve runner and workers as subprocesses

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
REPORT_KEY = "dapt-report"
CRON, TIMEZONE = "30 3 * * 1-5", "Europe/Berlin"
STAGES = (
    "ingest ",
    "clean-dedup-stats",
    "extend-tokenizer",
    "pack-mixed-corpus",
    "base-eval",
    "cpt-attempt",
)  # task run names

TINY = f"""tokenizer: {{min_frequency: 5, domain_vocab_size: 600}}
mix: {{seq_len: 64, heldout_fraction: 0.1, workers: 1}}
train: {{max_steps: 4, save_every: 4, batch_size: 8, warmup_ratio: 0.1, report_to: [], ewc: {{lambda: 0.5}}}}
eval: {{max_attempts: 1, max_probes: 8, batch_size: 8}}
deploy: {{cron: "{CRON}", timezone: {TIMEZONE}, concurrency_limit: 1}}
"""


def _tiny_config(root: Path) -> Path:
    dirs = write_corpus(root, n_domain=40, n_general=30)
    base = save_tiny_model_dir(root / "base", [prose(i, "general") for i in range(60)])
    return write_config(root, dirs, extra=f'model: {{base: "{base}"}}\n' + TINY)


# --- the Dockerfile --------------------------------------------------------------------------------------------


def test_dockerfile_matches_the_torch_pin_and_the_gpu_pool():
    torch_pin = re.search(r'^\s*"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    dockerfile = DOCKERFILE.read_text()
    assert f'"{torch_pin}"' in dockerfile
    # The CUDA wheel index and the base image name the same CUDA 12.x.
    cuda = re.search(r"^ARG TORCH_CUDA=cu12(\d)$", dockerfile, re.M)
    assert cuda and "https://download.pytorch.org/whl/${TORCH_CUDA}" in dockerfile
    assert re.search(rf"^ARG CUDA_IMAGE=nvidia/cuda:12\.{cuda[1]}\.\d+-\S*runtime", dockerfile, re.M)
    from dapt.flows.cli import deploy

    pool = inspect.signature(deploy).parameters["gpu_pool"].default.default  # `dapt deploy`'s GPU pool
    start = ROOT / "docker" / "start-worker.sh"
    assert f"DAPT_WORK_POOL:-{pool}}}" in start.read_text() and "prefect worker start" in start.read_text()
    assert re.search(r"^USER (?!root\b|0\b)\S+", dockerfile, re.M), "the worker must not run as root"
    # Without a server address the entrypoint stops at once and says what to set.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(["sh", str(start)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "set PREFECT_API_URL" in done.stderr


# --- build_deployments and the server check (no server) ------------------------------------------------------------


def test_deployments_carry_the_config_schedule_and_concurrency(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.utilities.schema_tools import validate

    from dapt.flows.serve import build_deployments

    cfg = load_config(write_config(tmp_path, write_corpus(tmp_path), extra=TINY))
    pipeline, refresh, cpt = build_deployments(cfg, "cfg.yaml")
    assert (pipeline.flow_name, pipeline.name, refresh.flow_name, refresh.name) == (
        "dapt-pipeline",
        "test",
        "nightly-refresh",
        "test",
    )
    assert (cpt.flow_name, cpt.name, cpt.schedules) == ("dapt-cpt", "test", [])
    assert not pipeline.schedules
    (schedule,) = refresh.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (CRON, TIMEZONE)
    assert refresh.concurrency_limit == 1
    assert refresh.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    for d in (pipeline, refresh, cpt):
        # The server enforces the parameter schema: the config must pass it and load back unchanged.
        validate(d.parameters, d._parameter_openapi_schema.model_dump(), raise_on_error=True, ignore_required=True)
        assert DaptConfig.model_validate(d.parameters["config"]) == cfg
        assert "cfg.yaml" in d.description


def test_bad_schedule_is_a_config_error(tmp_path):
    from dapt.flows.serve import build_deployments
    from dapt_core.config import ConfigError

    cfg = load_config(write_config(tmp_path, write_corpus(tmp_path), extra="deploy: {timezone: Mars/Olympus}\n"))
    with pytest.raises(ConfigError, match="deploy.*Mars/Olympus.*IANA"):
        build_deployments(cfg)


@pytest.mark.parametrize("api_url", [None, "unreachable"])
def test_serve_refuses_without_a_real_server(tmp_path, api_url):
    """No PREFECT_API_URL means the ephemeral server, where schedules never fire: `dapt serve` says so and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_CLIENT_MAX_RETRIES="0")
    if api_url:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"
    config = write_config(tmp_path, write_corpus(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "dapt.flows.cli", "serve", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    if api_url:
        assert "cannot reach the Prefect server" in err and "prefect server start" in err
    else:
        assert "PREFECT_API_URL is not set" in err and "schedules do not fire" in err and "prefect server start" in err


# --- dapt serve on a real Prefect server ---------------------------------------------------------------------------


class Services:
    """Subprocesses of one test module, each in its own process group with its output in a log file."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.procs = root, env, {}

    def start(self, name: str, cmd: list[str], **env: str) -> None:
        log = self.root / f"{name.replace(' ', '-')}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = (proc, log)

    def run(self, cmd: list[str]) -> str:
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{log.read_text()[-4000:]}" for name, (_, log) in self.procs.items())

    def wait_for(self, check, what: str, timeout: float):
        """Poll `check` until it returns something truthy; fail early, with the logs, if a subprocess died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, (proc, _) in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if result := check():
                return result
            time.sleep(1)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM each process group (a runner or worker then stops its flow runs), SIGKILL what is left."""
        for proc, _ in reversed(self.procs.values()):
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME, and `dapt serve CONFIG` on it.

    Yields (services, tiny config path); services.env points every CLI call at the server.
    """
    root = tmp_path_factory.mktemp("serve")
    config = _tiny_config(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # `prefect` for start-worker.sh
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick runs up in 2 s, not 10
    )
    services = Services(root, env)
    try:
        services.start(
            "prefect server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        )

        def healthy():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        services.wait_for(healthy, "the Prefect server's /api/health", 120)
        services.env["PREFECT_API_URL"] = url
        services.start("dapt serve", [sys.executable, "-m", "dapt.flows.cli", "serve", str(config)])
        yield services, config
    finally:
        services.stop()


def _client(services: Services):
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(services.env["PREFECT_API_URL"])


async def _deployment(services: Services, name: str):
    from prefect.exceptions import ObjectNotFound

    async with _client(services) as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


async def _run(services: Services, deployment: str, parameters: dict, timeout: float):
    """Trigger a deployment like the UI or another flow would and wait for a final state.

    Returns the flow run, the artifacts by key and the task runs' {name: state name}, of the run and its subflows.
    """
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import arun_deployment

    async with _client(services) as client:
        run = await arun_deployment(deployment, client=client, parameters=parameters, timeout=0)
        deadline = time.monotonic() + timeout
        while not run.state.is_final() and time.monotonic() < deadline:
            await asyncio.sleep(2)
            run = await client.read_flow_run(run.id)
        ids = await _with_subflows(client, run.id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        logs = await _settled_logs(client, ids)
        return run, {a.key: a for a in artifacts if a.key}, {t.name: t.state.name for t in task_runs}, logs


async def _with_subflows(client, run_id) -> list:
    """The ids of a flow run and of its subflows, at any depth."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, frontier = [run_id], [run_id]
    while frontier:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [c.id for c in children]
        ids += frontier
    return ids


async def _all_logs(client, ids: list) -> list:
    """Every log of the flow runs `ids`, oldest first. Read page by page: the API answers at most its default limit
    (200) a request, and a pipeline run logs more, so one request cut off its last lines (the checkpoint decisions)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list = []
    while page := await client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=len(logs)
    ):
        logs += page
    return logs


async def _settled_logs(client, ids: list, quiet: float = 3.0, timeout: float = 60.0) -> list:
    """The runs' logs once no more arrive: the flow-run process ships its last batches after the run's final state,
    so logs read at that moment missed the end of the run (the checkpoint decisions) now and then."""
    logs, deadline = await _all_logs(client, ids), time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        if len(later := await _all_logs(client, ids)) == len(logs):
            break
        logs = later
    return logs


def _run_to_completion(services: Services, deployment: str, parameters: dict | None = None):
    """Run `deployment` (with its stored parameters unless given), fail with the logs unless it completes."""
    started = time.monotonic()
    run, artifacts, tasks, logs = asyncio.run(_run(services, deployment, parameters or {}, timeout=420))
    print(f"{deployment} run {run.name}: {run.state.type.value} after {time.monotonic() - started:.1f}s")
    if not run.state.is_completed():
        pytest.fail(f"{deployment} run ended {run.state.type.value}: {run.state.message}\n{services.logs()}")
    _LAST_LOGS[:] = logs
    _LAST_ARTIFACTS.clear()
    _LAST_ARTIFACTS.update(artifacts)
    return artifacts, tasks


_LAST_LOGS: list = []  # the flow-run logs of the last completed run (its subflows included)
_LAST_ARTIFACTS: dict = {}  # and its artifacts by key
SERVED_ARTIFACTS: dict = {}  # the served pipeline run's artifacts by key (set by served_run)


def _run_pipeline(services: Services, deployment: str, config: Path, project: str = "test") -> dict[str, str]:
    """Run a dapt-pipeline deployment with `config` as the UI's form would send it; check its report artifact."""
    params = {"config": load_config(config).model_dump(mode="json", by_alias=True)}
    artifacts, tasks = _run_to_completion(services, deployment, params)
    assert REPORT_KEY in artifacts, f"no {REPORT_KEY!r} artifact among {sorted(artifacts)}"
    report = artifacts[REPORT_KEY]
    assert report.type == "markdown" and f"# dapt report: {project}" in report.data and "Data funnel" in report.data
    # the plots are embedded (the UI's browser reaches neither the worker's disk nor the bucket) and are real PNGs
    images = re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report.data)
    assert sorted(name for name, _ in images) == ["checkpoints", "funnel"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for _, data in images)
    return tasks


def _stage_states(tasks: dict[str, str], stages: tuple[str, ...] = STAGES) -> dict[str, set[str]]:
    """The states of each stage's task runs ({stage: {state name}}), over every stage of the pipeline."""
    out = {stage: {state for name, state in tasks.items() if name.startswith(stage)} for stage in stages}
    assert all(out.values()), f"stages without a task run: {[s for s, v in out.items() if not v]}"
    return out


@pytest.fixture(scope="module")
def served_run(server):
    """dapt-pipeline/test, registered by `dapt serve`, triggered through the API and run by it: its task run states."""
    services, config = server
    started = time.monotonic()
    services.wait_for(lambda: asyncio.run(_deployment(services, "dapt-pipeline/test")), "dapt-pipeline/test", 120)
    print(f"dapt serve registered its deployments after {time.monotonic() - started:.1f}s")
    tasks = _run_pipeline(services, "dapt-pipeline/test", config)
    SERVED_LOGS[:] = _LAST_LOGS
    SERVED_ARTIFACTS.update(_LAST_ARTIFACTS)
    return tasks


SERVED_LOGS: list = []  # the served pipeline run's flow-run logs (set by served_run)


def test_training_is_visible_in_the_ui(served_run):
    """The run's logs carry dapt_core's own lines (training steps with loss and tokens/s, each checkpoint's decision);
    a progress artifact reaches 100% and a table artifact lists the decisions."""
    names = sorted({log.name for log in SERVED_LOGS})
    steps = [
        log.message
        for log in SERVED_LOGS
        if log.name == "dapt.train" and re.match(r"step \d+/\d+ loss \d", log.message)
    ]
    assert "step 4/4 loss" in " ".join(steps) and re.search(r"tokens/s .*eta \d", " ".join(steps)), names
    decisions = [log for log in SERVED_LOGS if log.name == "dapt.forgetting" and "checkpoint step 4" in log.message]
    assert decisions, names
    progress, table = SERVED_ARTIFACTS["dapt-cpt-attempt-0-progress"], SERVED_ARTIFACTS["dapt-cpt-attempt-0-decisions"]
    assert progress.type == "progress" and float(progress.data) == 100.0, progress
    rows = json.loads(table.data)
    assert [r["step"] for r in rows] == [4] and rows[0]["decision"] in ("accepted", "REJECTED")


def _served_flow_run_process(services: Services) -> psutil.Process:
    """The process `dapt serve` runs its one current flow run in: `python -m prefect.engine`, a child of the runner."""
    runner, _ = services.procs["dapt serve"]
    children = psutil.Process(runner.pid).children()
    runs = [p for p in children if p.cmdline()[1:] == ["-m", "prefect.engine"]]
    assert len(runs) == 1, [p.cmdline() for p in children]
    return runs[0]


def _journal_steps(store: Path, before: set[Path]) -> list[int]:
    """The steps journaled so far by the CPT attempt whose journal appeared after `before` was listed."""
    new = [p for p in store.glob("cpt/*/journal.json") if p not in before]
    return [e["step"] for e in json.loads(new[0].read_text())["entries"]] if new else []


@pytest.mark.integration
def test_a_killed_cpt_run_retried_from_the_ui_resumes_and_says_so(server, served_run):
    """kill -9 of the process running a pipeline flow run during CPT, then the UI's Retry (the run set to
    AwaitingRetry): the retried run's logs say where training resumed, after per-step loss lines, and the CPT progress
    artifact of the retry reaches 100%."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.states import Scheduled

    services, config = server
    cfg = load_config(config)
    steps, every = 40, 10  # a checkpoint journaled every 10 steps, each judged: training outlasts the kill
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"max_steps": steps, "save_every": every, "log_every": 5}),
            "eval": cfg.eval.model_copy(update={"max_general_ppl_increase": 1000.0, "max_general_probe_drop": 100.0}),
        }
    )
    store = Path(cfg.store)
    journals = set(store.glob("cpt/*/journal.json"))

    async def trigger():
        from prefect.deployments import arun_deployment

        async with _client(services) as client:
            return await arun_deployment(
                "dapt-pipeline/test",
                client=client,
                parameters={"config": cfg.model_dump(mode="json", by_alias=True)},
                timeout=0,
            )

    run = asyncio.run(trigger())
    services.wait_for(lambda: _journal_steps(store, journals), "the first journaled checkpoint", 420)
    process = _served_flow_run_process(services)
    process.kill()  # kill -9: no handler runs, nothing is saved on the way out
    process.wait(30)
    journaled = _journal_steps(store, journals)
    assert journaled[-1] < steps, f"training had ended before the kill: {journaled}"

    async def state_of(run_id):
        async with _client(services) as client:
            return (await client.read_flow_run(run_id)).state

    services.wait_for(lambda: asyncio.run(state_of(run.id)).is_crashed(), "the killed run to be marked crashed", 120)

    async def retry():  # what the UI's Retry button sends
        async with _client(services) as client:
            await client.set_flow_run_state(
                run.id, Scheduled(name="AwaitingRetry", message="Retry from the UI"), force=True
            )

    asyncio.run(retry())
    services.wait_for(lambda: asyncio.run(state_of(run.id)).is_final(), "the retried run to finish", 420)
    assert asyncio.run(state_of(run.id)).is_completed(), services.logs()

    ids, logs = asyncio.run(_run_logs(services, run.id))
    messages = [log.message for log in logs if log.name.startswith("dapt.")]
    resumed = [m for m in messages if re.search(r"attempt 0: resuming after step \d+", m)]
    assert resumed == [
        f"attempt 0: resuming after step {journaled[-1]} ({len(journaled)} checkpoint(s) already judged)"
    ], resumed
    losses = [m for m in messages if re.match(rf"step \d+/{steps} loss \d", m)]
    assert f"step {steps}/{steps} loss" in " ".join(losses), messages[-20:]

    async def progress_versions():
        async with _client(services) as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dapt-cpt-attempt-0-progress"]))
            )

    ours = [a for a in asyncio.run(progress_versions()) if a.flow_run_id in ids]
    latest = max(ours, key=lambda a: a.updated)
    assert latest.type == "progress" and float(latest.data) == 100.0, ours


async def _run_logs(services: Services, run_id) -> tuple[list, list]:
    """The ids of a flow run and its subflows, and their logs."""
    async with _client(services) as client:
        ids = await _with_subflows(client, run_id)
        return ids, await _settled_logs(client, ids)


@pytest.mark.integration
def test_the_pipeline_checks_its_cpt_deployment_before_the_data_stages(server, served_run):
    """deploy.cpt_deployment naming a deployment the server does not have: the run fails at once, before any data
    stage, with one error naming the field, the deployment and the command that creates it."""
    services, config = server
    cfg = load_config(config)
    cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"cpt_deployment": "dapt-cpt/gpu-missing"})})
    run, _, tasks, logs = asyncio.run(
        _run(services, "dapt-pipeline/test", {"config": cfg.model_dump(mode="json", by_alias=True)}, 180)
    )
    assert run.state.is_failed(), run.state
    assert not tasks, tasks  # not even discovery ran
    error = " ".join([run.state.message or "", *(log.message for log in logs if log.level >= 40)])
    assert "deploy.cpt_deployment: there is no deployment 'dapt-cpt/gpu-missing'" in error, error[-2000:]
    assert "dapt deploy CONFIG --pool cpu --gpu-pool gpu" in error


def test_serve_registers_both_deployments_and_runs_the_pipeline(server, served_run):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    services, config = server
    refresh = asyncio.run(_deployment(services, "nightly-refresh/test"))
    (schedule,) = refresh.schedules
    assert isinstance(schedule.schedule, CronSchedule) and schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (CRON, TIMEZONE)
    assert refresh.global_concurrency_limit.limit == 1
    assert refresh.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    pipeline = asyncio.run(_deployment(services, "dapt-pipeline/test"))
    assert not pipeline.schedules and pipeline.work_pool_name is None
    assert DaptConfig.model_validate(pipeline.parameters["config"]) == load_config(config)
    assert _stage_states(served_run)["cpt-attempt"] == {"Completed"}, served_run  # trained, not from a cache


def test_pipeline_runs_its_cpt_stage_as_a_deployment(server, served_run):
    """deploy.cpt_deployment: the pipeline starts the CPT stage as a run of dapt-cpt/test (on a GPU pool in
    production; here the same `dapt serve`) and reads its manifest back from the store."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    services, config = server
    cfg = load_config(config)
    cfg = cfg.model_copy(
        update={
            "deploy": cfg.deploy.model_copy(update={"cpt_deployment": "dapt-cpt/test"}),
            "train": cfg.train.model_copy(update={"seed": 1}),
        }
    )
    artifacts, _ = _run_to_completion(
        services, "dapt-pipeline/test", {"config": cfg.model_dump(mode="json", by_alias=True)}
    )
    assert "Domain bits per byte" in artifacts[REPORT_KEY].data or "nothing promoted" in artifacts[REPORT_KEY].data

    async def cpt_runs():
        async with _client(services) as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["test"])), limit=50
            )

    runs = [r for r in asyncio.run(cpt_runs()) if r.parameters.get("output_key")]
    assert len(runs) == 1 and runs[0].state.is_completed(), runs
    assert runs[0].parameters["config"]["train"]["seed"] == 1


def test_served_nightly_refresh_runs_with_its_stored_config(server, served_run):
    """A refresh right after the pipeline (as the schedule would start it, without parameters) finds every stage
    done: it completes without training."""
    services, _ = server
    _, tasks = _run_to_completion(services, "nightly-refresh/test")
    trained = [name for name, state in tasks.items() if name.startswith("cpt-attempt") and state != "Cached"]
    assert not trained, tasks


def test_dapt_deploy_places_the_deployments_on_pools_and_a_worker_runs_them(server, served_run, tmp_path):
    """The README's steps: create the pools, `dapt deploy CONFIG`, start a worker (docker/start-worker.sh) on the cpu
    pool, run dapt-pipeline/<project>. Another project name than the served one, so both sets of deployments exist;
    every stage comes from the cache in the shared store, as on a second machine."""
    services, config = server
    pooled = tmp_path / "pooled.yaml"
    pooled.write_text(config.read_text().replace("project: test", "project: pooled"))
    assert load_config(pooled).project == "pooled"
    missing = subprocess.run(
        [sys.executable, "-m", "dapt.flows.cli", "deploy", str(pooled)],
        cwd=ROOT,
        env=services.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "prefect work-pool create cpu --type process" in " ".join(missing.stderr.split())
    for pool in ("cpu", "gpu"):
        services.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"])
    services.run([sys.executable, "-m", "dapt.flows.cli", "deploy", str(pooled)])

    refresh = asyncio.run(_deployment(services, "nightly-refresh/pooled"))
    cfg = DaptConfig.model_validate(refresh.parameters["config"])
    (schedule,) = refresh.schedules
    assert (
        (schedule.schedule.cron, schedule.schedule.timezone)
        == (CRON, TIMEZONE)
        == (cfg.deploy.cron, cfg.deploy.timezone)
    )
    assert refresh.global_concurrency_limit.limit == cfg.deploy.concurrency_limit and refresh.work_pool_name == "cpu"
    assert refresh.tags == ["dapt", "pooled"]
    cpt = asyncio.run(_deployment(services, "dapt-cpt/pooled"))
    assert cpt.work_pool_name == "gpu" and cpt.entrypoint == "dapt.flows.cpt.cpt_flow" and cpt.pull_steps == []

    services.start("cpu worker", ["sh", "docker/start-worker.sh"], DAPT_WORK_POOL="cpu")
    tasks = _run_pipeline(services, "dapt-pipeline/pooled", pooled, project="pooled")
    # Finished ingest batches are read from their records without a task run; every other stage is a cached run.
    assert not any(name.startswith(STAGES[0]) for name in tasks), tasks
    assert set().union(*_stage_states(tasks, STAGES[1:]).values()) == {"Cached"}, tasks
