"""S3 credentials from a Prefect AwsCredentials block (prefect-aws), named by the config's `aws_credentials_block`.

dapt_core knows nothing of Prefect: the block is read here, on the Prefect side, and handed to the store as plain
`S3Credentials` for the whole process (every flow calls `use_store_credentials` first), so the stages, the s3://
inputs and the torchrun ranks of CPT (through their environment) all reach S3 with the block's keys, region and
endpoint. Without the field, boto3 reads the standard AWS_* environment as before.
"""

from __future__ import annotations

from dapt_core.config import ConfigError, DaptConfig
from dapt_core.store import S3Credentials, use_s3_credentials


def s3_credentials_from_block(name: str) -> S3Credentials:
    """The keys (a profile or an assumed role resolved to keys), region and endpoint of the AwsCredentials block
    `name`; ConfigError naming the field when the block or prefect-aws is missing."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ConfigError(
            f"aws_credentials_block: {name!r} names a prefect-aws block, but prefect-aws is not installed; "
            "install it with `pip install 'dapt[aws]'` (or remove the field to use the AWS_* environment variables)"
        ) from None
    try:
        block = AwsCredentials.load(name)
    except ValueError:
        from prefect.settings import PREFECT_API_URL

        server = PREFECT_API_URL.value() or "the ephemeral Prefect server (PREFECT_API_URL is not set)"
        raise ConfigError(
            f"aws_credentials_block: there is no AwsCredentials block named {name!r} on {server}. Create it in the "
            f"UI (Blocks → AWS Credentials) or with `AwsCredentials(aws_access_key_id=..., aws_secret_access_key=..., "
            f"region_name=...).save({name!r})` (from prefect_aws), or correct the name in the config"
        ) from None
    session = block.get_boto3_session()
    keys = session.get_credentials()
    frozen = keys.get_frozen_credentials() if keys else None
    return S3Credentials(
        access_key_id=frozen.access_key if frozen else None,
        secret_access_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
        region=session.region_name,
        endpoint_url=block.aws_client_parameters.endpoint_url,
    )


def use_store_credentials(config: DaptConfig) -> None:
    """Point every S3 client of this process at the config's AwsCredentials block, or back at the environment."""
    name = config.aws_credentials_block
    use_s3_credentials(s3_credentials_from_block(name) if name else None)
