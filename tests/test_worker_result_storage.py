"""The result storage a worker takes as its default (PREFECT_DEFAULT_RESULT_STORAGE_BLOCK): the standard block `dapt
deploy` saves on the store. A plain flow that knows nothing of dapt persists and re-reads its results through it, in a
process of its own; dapt's own block type there fails with UnknownBlockType (why it is not the default); a dapt flow in
the same profile keeps its stage results in its own storage and leaves no record in the default one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dapt.tasks.caching import (
    FLOW_RESULTS_PREFIX,
    RESULTS_PREFIX,
    result_storage_for,
    worker_result_storage,
)
from dapt_core.config import load_config
from tests.corpus import write_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]

PLAIN_FLOW = textwrap.dedent(
    """
    import json
    from prefect import flow, task
    from prefect.cache_policies import INPUTS

    @task(cache_policy=INPUTS)
    def square(x):
        return {"square": x * x}

    @flow
    def plain(x):
        future = square.submit(x)
        return future.result()["square"] + 1, future.state.name

    first, second = plain(7), plain(7)
    print(json.dumps({"results": [first[0], second[0]], "task_states": [first[1], second[1]]}))
    """
)


def _plain_flow_with_default(block: str, home: Path) -> subprocess.CompletedProcess:
    """The plain flow in a fresh process (no dapt import) on this session's API, with `block` as its default storage."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_HOME=str(home),
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=block,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PYTHONPATH", None)  # nothing of dapt on the path: a user's own project
    return subprocess.run(
        [sys.executable, "-c", PLAIN_FLOW], check=False, cwd=home, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_the_default_serves_a_plain_flow_and_dapt_keeps_its_records_out_of_it(prefect_harness, tmp_path):
    from prefect.settings import (
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from dapt.flows.prepare import prepare_flow

    home = tmp_path / "user-project"
    home.mkdir()
    config = load_config(write_config(tmp_path, write_corpus(tmp_path)))
    default = worker_result_storage(config.store, None, "dapt-flow-results-test")
    assert default == "local-file-system/dapt-flow-results-test"

    done = _plain_flow_with_default(default, home)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "results": [50, 50],
        "task_states": ["Completed", "Cached"],
    }  # the second run read the first's record
    flow_results = Path(config.store) / FLOW_RESULTS_PREFIX
    records = sorted(p.name for p in flow_results.iterdir())
    assert records, "the plain flow persisted nothing in the default storage"

    # dapt's own block type as the default: a process that does not import dapt cannot even load it.
    ours = result_storage_for(config.store)
    broken = _plain_flow_with_default(f"{ours.get_block_type_slug()}/{ours._block_document_name}", home)
    assert broken.returncode != 0 and "UnknownBlockType" in broken.stderr

    # A dapt flow in the same profile, with that default and persistence on: its stages persist in dapt's storage only.
    with temporary_settings({PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: default, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        prepared = prepare_flow(config)
    assert prepared.clean.kept_docs > 0
    stage_records = [p.name for p in (Path(config.store) / RESULTS_PREFIX).iterdir()]
    assert any(name.startswith("clean-") for name in stage_records) and any(
        name.startswith("ingest-") for name in stage_records
    )
    assert sorted(p.name for p in flow_results.iterdir()) == records


@pytest.mark.integration
def test_an_s3_store_gets_an_s3_bucket_block_with_the_configured_credentials(prefect_harness, s3_endpoint, s3_bucket):
    import boto3
    from prefect import flow, task
    from prefect.settings import (
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save("dapt-test-worker-s3", overwrite=True)
    default = worker_result_storage(f"s3://{s3_bucket}/team", "dapt-test-worker-s3", "dapt-flow-results-s3")
    assert default == "s3-bucket/dapt-flow-results-s3"

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow
    def plain() -> int:
        return double(21)

    with temporary_settings({PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: default, PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        assert plain() == 42
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys and all(k.startswith(f"team/{FLOW_RESULTS_PREFIX}/") for k in keys), keys


@pytest.mark.integration
def test_the_result_storage_block_is_saved_once_then_loaded(prefect_harness, tmp_path, monkeypatch):
    """Every flow run asks for its store's block: saving it again each time cost ~0.1 s of API calls."""
    from dapt.tasks.caching import StoreResultStorage

    saved: list[str] = []
    real_save = StoreResultStorage.save
    counted = lambda self, name, **kw: saved.append(name) or real_save(self, name, **kw)  # noqa: E731
    monkeypatch.setattr(StoreResultStorage, "save", counted)
    first = result_storage_for(str(tmp_path / "store"))
    again = result_storage_for(str(tmp_path / "store"))
    other = result_storage_for(str(tmp_path / "other"))
    assert len(saved) == 2 and again._block_document_id == first._block_document_id
    assert again.store_uri == first.store_uri == str(tmp_path / "store") and other.store_uri == str(tmp_path / "other")
