"""The data stages on a real two-node Ray cluster (`ray start --head` + a second node on 127.0.0.1) give the same
decisions and kept corpora as the local engine, also when a worker process is killed mid-stage."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dapt_core.clean import clean_corpus, shuffle
from dapt_core.config import CleanConfig, IngestConfig, SourceConfig, load_config
from dapt_core.discovery import discover_inputs
from dapt_core.engine import LocalEngine, RayEngine
from dapt_core.ingest_batches import BatchJob, plan_batches, run_batch
from dapt_core.store import open_store
from tests.corpus import assert_same_clean_outputs, near_copy, prose, write_config, write_corpus
from tests.local_services import ray_cluster

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
NODE_LIMITS = ["--num-cpus", "1", "--object-store-memory", "80000000"]


@pytest.fixture(scope="module")
def ray_address():
    """A head node and a second node joining it, one CPU and an 80 MB object store each."""
    import ray

    workers_import_the_repo = {"PYTHONPATH": str(REPO)}
    with ray_cluster(NODE_LIMITS, start_timeout_s=180, stop_timeout_s=20, extra_env=workers_import_the_repo) as address:
        try:
            yield address
        finally:
            ray.shutdown()  # this process's driver, before its cluster goes


def _corpus(root: Path) -> tuple[list[Path], list[Path], list]:
    """Ingested shards of a corpus with exact and near duplicates across files, and an eval set."""
    dirs = write_corpus(root, n_domain=16, n_general=8)
    (dirs["domain"] / "copy.txt").write_text((dirs["domain"] / "note0.txt").read_text())
    (dirs["domain"] / "near.txt").write_text(near_copy((dirs["domain"] / "note1.txt").read_text(), 0))
    (dirs["general"] / "more.jsonl").write_text(
        "".join(f'{{"text": "{prose(i, "general")}"}}\n' for i in range(3)) + "{oops\n"
    )
    cfg = IngestConfig(batch_bytes=2_000)  # several batches, hence several shards
    shards, evals, quarantined = [], [], []
    for kind, folder in (("domain", dirs["domain"]), ("general", dirs["general"]), ("eval", dirs["eval"])):
        inputs, _ = discover_inputs(SourceConfig(name=kind, paths=[str(folder)]), kind)
        for i, batch in enumerate(plan_batches(inputs, cfg.batch_bytes, cfg.batch_files)):
            keys = [f"k{j}" for j in range(len(batch))]
            store_uri, prefix = str(root / "store"), f"{kind}/{i}"
            job = BatchJob(batch.models(), keys, cfg, store_uri, f"{prefix}.parquet", f"{prefix}.files.parquet", [])
            out = run_batch(job)
            (evals if kind == "eval" else shards).append(Path(out.shard.uri))
            quarantined += out.quarantined
    assert len(shards) > 3
    return shards, evals, quarantined


def test_clean_on_ray_matches_local(ray_address, tmp_path):
    shards, evals, quarantined = _corpus(tmp_path)
    local = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "local", LocalEngine())
    engine = RayEngine(ray_address, max_retries=3)
    on_ray = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "ray", engine)
    assert_same_clean_outputs(local, on_ray)
    assert local.dropped["exact_duplicate"] >= 1 and local.dropped["near_duplicate"] >= 1
    assert engine.slots == 2 and shuffle.partition_count(len(shards), engine.slots) > 1  # several reduce tasks ran


def _kill_own_worker_once(fn, marker: str, item):
    """Run fn(item), but first SIGKILL this worker process the first time any item gets here."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return fn(item)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class KillOnceEngine(RayEngine):
    """Ray, where the first task of one stage (the function `stage`) kills its worker process mid-stage."""

    def __init__(self, address: str, marker: Path, stage: str):
        super().__init__(address, max_retries=2)
        self.marker = str(marker)
        self.stage = stage

    def map(self, fn, items):
        if fn.__name__ == self.stage:
            fn = functools.partial(_kill_own_worker_once, fn, self.marker)
        return super().map(fn, items)


@pytest.mark.parametrize("stage", ["prepare_shard", "reduce_partition"])
def test_a_killed_worker_is_retried_and_the_result_is_the_same(ray_address, tmp_path, stage):
    """A worker dies in the per-shard pass, or in a reduce task of the dedup shuffle."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import the test module
    shards, evals, quarantined = _corpus(tmp_path)
    marker = tmp_path / "killed-once"
    local = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "local", LocalEngine())
    on_ray = clean_corpus(
        shards, evals, quarantined, CleanConfig(), tmp_path / "ray", KillOnceEngine(ray_address, marker, stage)
    )
    assert marker.exists()  # a worker did die
    assert_same_clean_outputs(local, on_ray)


def test_prepare_flow_on_ray_gives_the_same_decisions_and_hashes(ray_address, prefect_harness, tmp_path):
    from dapt.flows.prepare import prepare_flow

    dirs = write_corpus(tmp_path, n_domain=16, n_general=8)
    (dirs["domain"] / "copy.txt").write_text((dirs["domain"] / "note0.txt").read_text())
    results = {}
    for engine in ("local", "ray"):
        extra = f"ingest: {{batch_bytes: 3000}}\nprepare: {{engine: {engine}, ray_address: '{ray_address}'}}\n"
        (tmp_path / engine).mkdir()
        results[engine] = prepare_flow(load_config(write_config(tmp_path / engine, dirs, extra=extra)))
    local, on_ray = results["local"].clean, results["ray"].clean
    assert (local.decisions.sha256, local.domain.sha256, local.general.sha256) == (
        on_ray.decisions.sha256,
        on_ray.domain.sha256,
        on_ray.general.sha256,
    )
    assert local.dropped == on_ray.dropped and local.dropped["exact_duplicate"] == 1
    decisions = pq.read_table(open_store(str(tmp_path / "ray" / "store")).local_path(on_ray.decisions)).to_pylist()
    assert len({d["doc_uid"] for d in decisions}) == len(decisions) == on_ray.input_docs
