"""What a run checks before its first data stage, so that a setting which cannot work fails in seconds, not after
hours of ingest, cleaning and packing: the config checks of dapt_core (dapt_core/preflight.py), then what needs the
store or the Prefect server: the store answers with the configured credentials, and the CPT deployment named by
deploy.cpt_deployment exists.
"""

from __future__ import annotations

from dapt_core.config import ConfigError, DaptConfig
from dapt_core.preflight import check_before_data_stages
from dapt_core.store import open_store


def check_cpt_deployment(name: str, project: str) -> None:
    """ConfigError naming deploy.cpt_deployment and the command that creates it, unless the Prefect server has it."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    create = (
        f"`dapt deploy CONFIG --pool cpu --gpu-pool gpu` registers it as dapt-cpt/{project} on the GPU pool "
        "(`prefect work-pool create gpu --type process` first)"
    )
    if name.count("/") != 1:
        raise ConfigError(
            f"deploy.cpt_deployment: {name!r} is not '<flow>/<deployment>' (e.g. dapt-cpt/{project}); {create}"
        )
    server = PREFECT_API_URL.value() or "the ephemeral Prefect server (PREFECT_API_URL is not set)"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"deploy.cpt_deployment: there is no deployment {name!r} on {server}; {create}, "
                "or correct the name (or remove it to train in this flow run)"
            ) from None


def check_before_first_stage(config: DaptConfig, cpt_deployment: str | None = None) -> None:
    """Raise on the first problem: the config's own (all listed at once), the store (with the credentials the flow set
    up: `use_store_credentials`), then `cpt_deployment` when the run hands CPT to it."""
    check_before_data_stages(config)
    open_store(config.store).check_reachable()
    if cpt_deployment:
        check_cpt_deployment(cpt_deployment, config.project)
