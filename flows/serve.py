"""The deployments of a config, two ways: `dapt serve` (this process runs their flow runs) and `dapt deploy` (workers
on work pools run them: the pipeline and the refresh on a CPU pool, the CPT stage on a GPU pool).

Both register the same deployments, built from the config alone (names, tags, schedule, concurrency): nothing is kept
in step by hand. `prefect.serve` registers them, then polls the server and runs every flow run in a subprocess of
`dapt serve`; `dapt deploy` registers them on pools and returns.
"""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from dapt_core.config import ConfigError, DaptConfig


class PrefectServerRequired(ValueError):
    """`dapt serve` was started without a reachable, persistent Prefect server."""


def require_api_server() -> str:
    """The PREFECT_API_URL `dapt serve` registers on; fails unless it is set and answers.

    Without it every client starts Prefect's ephemeral server, which lives only as long as the process and runs no
    scheduler, so the nightly schedule would never fire and nothing else could trigger the pipeline deployment.
    """
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PrefectServerRequired(
            "PREFECT_API_URL is not set, so Prefect would use its ephemeral server, on which schedules do not fire: "
            "`dapt serve` needs a real Prefect server. Start one with `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect cloud login` for Prefect Cloud), "
            "then run `dapt serve` again."
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise PrefectServerRequired(
            f"cannot reach the Prefect server at PREFECT_API_URL={url} ({problem}). Start it with "
            "`prefect server start` (or fix PREFECT_API_URL), then run `dapt serve` again."
        )
    return url


def _nightly_schedule(cfg: DaptConfig) -> CronSchedule:
    try:
        return CronSchedule(cron=cfg.deploy.cron, timezone=cfg.deploy.timezone)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(
            f"deploy: cron {cfg.deploy.cron!r} with timezone {cfg.deploy.timezone!r} is not a valid schedule "
            f"(cron: 5 fields like '0 2 * * *'; timezone: an IANA name like 'Europe/Berlin'): {e}"
        ) from None


def build_deployments(cfg: DaptConfig, config_path: str | None = None) -> list[RunnerDeployment]:
    """`dapt-pipeline/<project>` (manual), `nightly-refresh/<project>` (cron) and `dapt-cpt/<project>` (the CPT stage,
    for deploy.cpt_deployment), all with `cfg` as their parameter.

    The config travels as the `config` parameter (by alias, as the flows' parameter schema names its fields), so a
    run from the UI shows it as an editable form; entrypoints are module paths, so runs import the installed package
    whatever directory `dapt serve` was started from. Overlapping refreshes are cancelled rather than queued: the
    next refresh ingests whatever the skipped one would have.
    """
    from dapt.flows.cpt import cpt_flow  # on use: they import every stage's tasks
    from dapt.flows.dapt_pipeline import dapt_pipeline, nightly_refresh

    parameters = {"config": cfg.model_dump(mode="json", by_alias=True)}
    source = f" Parameters from {config_path}." if config_path else ""
    common = dict(
        name=cfg.project, parameters=parameters, tags=["dapt", cfg.project], entrypoint_type=EntrypointType.MODULE_PATH
    )
    pipeline = dapt_pipeline.to_deployment(
        description=f"The whole dapt DAG for project {cfg.project!r}, run on demand.{source}", **common
    )
    refresh = nightly_refresh.to_deployment(
        description=(
            f"Ingest new or changed documents and continue CPT from the last promoted model, "
            f"on '{cfg.deploy.cron}' ({cfg.deploy.timezone}).{source}"
        ),
        schedules=[_nightly_schedule(cfg)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=cfg.deploy.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        **common,
    )
    cpt = cpt_flow.to_deployment(
        description=(
            f"The CPT stage of project {cfg.project!r} on its own (set deploy.cpt_deployment: dapt-cpt/{cfg.project} "
            f"to have the pipeline run it here through run_deployment).{source}"
        ),
        **common,
    )
    return [pipeline, refresh, cpt]


def serve(cfg: DaptConfig, config_path: str | None = None) -> None:
    """Register the deployments on the Prefect server at PREFECT_API_URL and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    require_api_server()
    prefect_serve(*build_deployments(cfg, config_path))


class WorkPoolMissing(ValueError):
    """`dapt deploy` names a work pool the Prefect server does not have."""


def deploy_to_pools(cfg: DaptConfig, pool: str, gpu_pool: str, config_path: str | None = None) -> list[str]:
    """Register the deployments on work pools (dapt-pipeline and nightly-refresh on `pool`, dapt-cpt on `gpu_pool`) and
    return 'flow/name -> pool' lines. Module-path entrypoints and no pull steps: a worker needs the installed dapt
    package and nothing else (no checkout, no working directory)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    require_api_server()
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys((pool, gpu_pool)):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                raise WorkPoolMissing(
                    f"work pool {name!r} does not exist on the Prefect server: create it with "
                    f"`prefect work-pool create {name} --type process` (or name another with --pool / --gpu-pool)"
                ) from None
    placed = []
    for deployment in build_deployments(cfg, config_path):
        target = gpu_pool if deployment.flow_name == "dapt-cpt" else pool
        deployment.apply(work_pool_name=target)
        placed.append(f"{deployment.flow_name}/{deployment.name} -> {target}")
    return placed
