"""Shared test harness: an S3 endpoint on 127.0.0.1 (moto server mode), one Prefect home per session, and the test
tiers.

Tiers (markers in pyproject.toml): `integration` tests start a real service or process: a test that uses a fixture of
INTEGRATION_FIXTURES is marked here; a module whose tests start processes themselves (torchrun, a subprocess killed
mid-run, a Prefect server of its own) says `pytestmark = pytest.mark.integration`. `slow` tests need the real model.
Every other test is `unit`. Plain `pytest` runs unit tests only; `make test` (CI) runs unit and integration.
"""

from __future__ import annotations

import os

import pytest

from tests.local_services import free_port

# Fixtures that start a service: a test using one (directly or through another fixture) is an integration test.
INTEGRATION_FIXTURES = {"prefect_harness", "s3_endpoint"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("integration"):
            continue
        tier = "integration" if INTEGRATION_FIXTURES & set(item.fixturenames) else "unit"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's ThreadedMotoServer) with test credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the test endpoint; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session", autouse=True)
def dapt_log_dir(tmp_path_factory):
    """CLI log files go to a temp folder, not the developer's ~/.cache/dapt/logs."""
    saved = os.environ.get("DAPT_LOG_DIR")
    os.environ["DAPT_LOG_DIR"] = str(tmp_path_factory.mktemp("dapt-logs"))
    yield
    if saved is None:
        os.environ.pop("DAPT_LOG_DIR", None)
    else:
        os.environ["DAPT_LOG_DIR"] = saved


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect server for the whole session, its PREFECT_HOME in a temp dir (it takes ~10 s to start)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(
        updates={
            PREFECT_HOME: str(home),
            PREFECT_API_URL: None,
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: True,
            PREFECT_LOGGING_TO_API_ENABLED: False,
        }
    ):
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield home


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they thrash (measured: 60 tiny
    training steps 17 s with the default threads, 2.7 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stage_calls(monkeypatch):
    """How often each stage's library function really ran (cache hits do not call them)."""
    import dapt.tasks.cpt
    import dapt_core.clean as clean_pkg
    import dapt_core.ingest as ingest
    import dapt_core.pack as pack
    import dapt_core.tokenizer_ext as tokenizer_ext

    calls = {"ingest": 0, "clean": 0, "tokenizer": 0, "pack": 0, "cpt": 0}
    targets = [
        ("ingest", ingest, "ingest_file"),
        ("clean", clean_pkg, "clean_corpus"),
        ("tokenizer", tokenizer_ext, "extend"),
        ("pack", pack, "pack_corpus"),
        ("cpt", dapt.tasks.cpt, "run_attempt"),
    ]
    for name, module, attr in targets:
        real = getattr(module, attr)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, attr, counted)
    return calls


@pytest.fixture
def signed_docs(monkeypatch) -> list[int]:
    """How many documents each call of the clean pipeline's `minhash_signatures` signed, a number a call: the
    per-document work a refresh must do for new documents only (stored signatures are read, not computed)."""
    from dapt_core.clean import pipeline

    signed: list[int] = []
    real = pipeline.minhash_signatures

    def counted(words, *args):
        signed.append(len(words.offsets) - 1)
        return real(words, *args)

    monkeypatch.setattr(pipeline, "minhash_signatures", counted)
    return signed
