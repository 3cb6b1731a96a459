"""S3 credentials from a Prefect AwsCredentials block (`aws_credentials_block`), with no AWS_* variable set: the
block is saved to a Prefect API, read by the flows' layer and handed to the store; moto's S3 server is the endpoint."""

from __future__ import annotations

import pytest

from dapt_core.config import ConfigError, DaptConfig
from dapt_core.faults import StoreError
from dapt_core.store import (
    S3Credentials,
    open_store,
    s3_environment,
    use_s3_credentials,
)
from tests.corpus import write_config, write_corpus

AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


@pytest.fixture
def no_aws_environment(monkeypatch, tmp_path):
    """No AWS_* credentials, config files or instance metadata: only what dapt is handed can reach S3."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DAPT_STORE_RETRY_SECONDS", "2")
    yield
    use_s3_credentials(None)


def test_credentials_become_client_arguments_and_subprocess_environment():
    creds = S3Credentials(
        access_key_id="AK", secret_access_key="SK", region="eu-west-1", endpoint_url="http://s3.local"
    )
    assert "SK" not in repr(creds)  # a logged config or manifest never shows the secret
    assert creds.client_arguments() == {
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK",
        "region_name": "eu-west-1",
        "endpoint_url": "http://s3.local",
    }
    use_s3_credentials(creds)
    try:
        assert s3_environment() == {
            "AWS_ACCESS_KEY_ID": "AK",
            "AWS_SECRET_ACCESS_KEY": "SK",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": "http://s3.local",
        }
    finally:
        use_s3_credentials(None)
    assert s3_environment() == {}


def test_the_block_name_is_not_part_of_the_result_hash(tmp_path):
    cfg = DaptConfig.model_validate({"data": {"domain": [{"name": "d", "paths": [str(tmp_path)]}]}})
    assert cfg.model_copy(update={"aws_credentials_block": "prod"}).result_hash() == cfg.result_hash()


@pytest.mark.integration
def test_store_reaches_s3_with_the_block_alone(prefect_harness, s3_endpoint, s3_bucket, no_aws_environment, tmp_path):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from dapt.flows.cli import _load
    from dapt.tasks.credentials import use_store_credentials

    AwsCredentials(
        aws_access_key_id="block-key",
        aws_secret_access_key="block-secret",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save("dapt-test-s3", overwrite=True)
    config = write_config(tmp_path, write_corpus(tmp_path), store=f"s3://{s3_bucket}/project")
    with_block = config.read_text() + "aws_credentials_block: dapt-test-s3\n"

    # Without the block nothing is configured: the store check fails at once with the credentials error.
    with pytest.raises(StoreError) as without:
        _load(config)
    assert without.value.kind in ("credentials", "unreachable")

    config.write_text(with_block)
    cfg = _load(config)  # the CLI's check: the store answers with the block's keys and endpoint
    store = open_store(cfg.store)
    assert store.client.meta.endpoint_url == s3_endpoint
    assert store.client._request_signer._credentials.access_key == "block-key"
    ref = store.put_text("from the block", "probe.txt")
    assert store.read_text(ref) == "from the block"
    assert s3_environment()["AWS_ACCESS_KEY_ID"] == "block-key"  # what the torchrun ranks of CPT inherit

    use_store_credentials(cfg.model_copy(update={"aws_credentials_block": None}))  # back to the (empty) environment
    assert s3_environment() == {}


@pytest.mark.integration
def test_an_unknown_block_is_one_error_naming_the_field(prefect_harness, no_aws_environment, tmp_path):
    from dapt.flows.cli import _load

    config = write_config(tmp_path, write_corpus(tmp_path), store="s3://bucket/p")
    config.write_text(config.read_text() + "aws_credentials_block: no-such-block\n")
    with pytest.raises(ConfigError) as e:
        _load(config)
    message = str(e.value)
    assert message.startswith("aws_credentials_block: there is no AwsCredentials block named 'no-such-block'")
    assert "Blocks → AWS Credentials" in message
