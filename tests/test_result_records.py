"""The store is a trust boundary: a result record is data, never code, and a cached stage whose artifacts are missing
or damaged is recomputed, not handed on (issue #10)."""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dapt.flows.cli import app
from dapt.flows.prepare import prepare_flow
from dapt.tasks.caching import (
    RESULTS_PREFIX,
    ManifestSerializer,
    StoreResultStorage,
    UntrustedResultRecord,
    decode_record,
)
from dapt_core.config import load_config
from dapt_core.evaluate import EvalResult
from dapt_core.ingest_batches import file_records
from dapt_core.store import IntegrityError, open_store
from tests.corpus import write_config, write_corpus

REPO = Path(__file__).resolve().parents[1]


class _TouchMarker:
    """Unpickling this runs `touch <marker>`: what an attacker with write access to the store would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _records(store_dir: Path, kind: str) -> list[Path]:
    return sorted((store_dir / RESULTS_PREFIX).glob(f"{kind}-*"))


def _plant_pickle(record: Path, marker: Path) -> None:
    record.write_text(
        json.dumps(
            {
                "metadata": {"storage_key": record.name, "serializer": {"type": "pickle", "picklelib": "pickle"}},
                "result": base64.encodebytes(pickle.dumps(_TouchMarker(marker))).decode(),
            }
        )
    )


def _plant_class(record: Path, qualified_name: str) -> None:
    """Keep Prefect's JSON serializer, but name a class its object_decoder would import (running its module)."""
    doc = json.loads(record.read_text())
    doc["result"] = json.dumps({"__class__": qualified_name, "data": {}})
    record.write_text(json.dumps(doc))


def _dapt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own process, against the test session's Prefect server."""
    return subprocess.run(
        [sys.executable, "-m", "dapt.flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_poisoned_result_records_are_refused_and_never_run(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    dirs = write_corpus(tmp_path)
    cfg_path = write_config(tmp_path, dirs)
    prepare_flow(load_config(cfg_path))
    store_dir = tmp_path / "store"
    ingest_record, clean_record = _records(store_dir, "ingest")[0], _records(store_dir, "clean")[0]
    good_ingest = ingest_record.read_bytes()

    # A module an attacker managed to put on the path: importing it is enough to run code.
    evil_dir, import_marker, pickle_marker = tmp_path / "evil", tmp_path / "imported", tmp_path / "unpickled"
    evil_dir.mkdir()
    (evil_dir / "dapt_evil_probe.py").write_text(f"open({str(import_marker)!r}, 'w').close()\nclass Probe:\n    pass\n")
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(evil_dir)]),
    }

    _plant_pickle(ingest_record, pickle_marker)
    res = _dapt("prepare", str(cfg_path), "--json", env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    error = _last_json(res.stdout)["error"]
    assert error.startswith(f"untrusted result record {ingest_record}: its serializer is 'pickle'")
    assert "--refresh" in error
    assert not pickle_marker.exists()
    res = CliRunner().invoke(app, ["verify", str(cfg_path), "--json"])
    assert res.exit_code == 2
    refused = [c for c in _last_json(res.stdout)["checks"] if c["status"] != "ok"]
    assert [(c["uri"], c["status"]) for c in refused] == [(str(ingest_record), "untrusted")]
    assert not pickle_marker.exists()

    ingest_record.write_bytes(good_ingest)
    _plant_class(clean_record, "dapt_evil_probe.Probe")
    res = _dapt("prepare", str(cfg_path), "--json", env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    error = _last_json(res.stdout)["error"]
    assert error.startswith(
        f"untrusted result record {clean_record}: a clean result "
        "must be a CleanManifest, this one is 'dapt_evil_probe.Probe'"
    )
    assert not import_marker.exists()

    _plant_pickle(ingest_record, pickle_marker)  # both at once: --refresh recomputes and overwrites them
    res = _dapt("prepare", str(cfg_path), "--json", "--refresh", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = _last_json(res.stdout)
    assert manifest["cached"] == [] and "clean" in manifest["computed"]
    assert not pickle_marker.exists() and not import_marker.exists()
    for record in (ingest_record, clean_record):  # rewritten as dapt writes them
        decode_record(record.name, record.read_bytes(), str(record))


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda d: d["metadata"]["serializer"].update(type="pickle"), "its serializer is 'pickle'"),
        (lambda d: d["metadata"]["serializer"].update(type="compressed"), "its serializer is 'compressed'"),
        (lambda d: d["metadata"]["serializer"].update(object_decoder="os.system"), "object_decoder='os.system'"),
        (lambda d: d["metadata"]["serializer"].update(jsonlib="pickle"), "jsonlib='pickle'"),
        (
            lambda d: d.update(result=json.dumps({"__class__": "dapt_core.manifest.CptManifest", "data": {}})),
            "this one is 'dapt_core.manifest.CptManifest'",
        ),
        (
            lambda d: d.update(
                result=json.dumps({"__class__": "dapt_core.manifest.IngestManifest", "data": {"docs": "many"}})
            ),
            "not a valid ingest result",
        ),
        (lambda d: d.update(result="not json"), "its result is not JSON text"),
    ],
)
def test_decode_record_accepts_only_the_stage_manifest_as_json(change, why):
    from prefect.serializers import JSONSerializer

    from dapt_core.manifest import IngestManifest, InputFile

    manifest = IngestManifest(
        input=InputFile(uri="/in/a.txt", source="s", kind="domain", fingerprint="f", bytes=1), docs=0, code_version="v"
    )
    key = "ingest-" + "ab" * 32
    record = {
        "metadata": {"storage_key": key, "serializer": JSONSerializer().model_dump()},
        "result": JSONSerializer().dumps(manifest).decode(),
    }
    assert decode_record(key, json.dumps(record).encode(), "uri") == manifest  # what Prefect writes for dapt
    change(record)
    with pytest.raises(
        UntrustedResultRecord,
        match="untrusted result record uri: " + ".*" + why.replace("(", r"\(").replace(")", r"\)"),
    ):
        decode_record(key, json.dumps(record).encode(), "uri")
    with pytest.raises(UntrustedResultRecord, match="not the cache key of a dapt stage"):
        decode_record("0123abcd", json.dumps(record).encode(), "uri")


def test_a_tokenizer_record_written_with_the_dropped_initial_cost_field_still_reads():
    """TokenizerManifest.initial_cost was dropped (the report's extension cost is measured by the CPT stage); a record
    cached before that still decodes, so upgrading does not refuse or recompute it."""
    from prefect.serializers import JSONSerializer

    from dapt_core.manifest import ArtifactRef, DirRef, TokenizerManifest

    ref = ArtifactRef(uri="/store/t.json", sha256="0" * 64, bytes=1)
    manifest = TokenizerManifest(
        model=DirRef(uri="/store/ext", files={}),
        base_fingerprint="f",
        new_tokens=0,
        report_json=ref,
        report_md=ref,
        code_version="v",
    )
    old = json.loads(JSONSerializer().dumps(manifest))
    old["data"]["initial_cost"] = {
        "init": "mean",
        "domain_docs": 3,
        "domain_bpb_original": 1.0,
        "domain_bpb_extended": 1.1,
    }
    key = "tokenizer-" + "ab" * 32
    record = {
        "metadata": {"storage_key": key, "serializer": JSONSerializer().model_dump()},
        "result": json.dumps(old),
    }
    assert decode_record(key, json.dumps(record).encode(), "uri") == manifest


def test_prefect_reads_the_validated_manifest_back(tmp_path):
    """What read_path hands Prefect decodes to the manifest itself, with no decoder or class named by the record."""
    from prefect._internal.result_records import ResultRecord
    from prefect.serializers import JSONSerializer

    store = open_store(str(tmp_path / "store"))
    ref = store.put_text("shard", "ingest/x.parquet")
    from dapt_core.manifest import IngestManifest, InputFile

    manifest = IngestManifest(
        input=InputFile(uri="/in/a.txt", source="s", kind="domain", fingerprint="f", bytes=1),
        shard=ref,
        docs=3,
        code_version="v",
    )
    key = "ingest-" + "cd" * 32
    written = ResultRecord(metadata={"storage_key": key, "serializer": JSONSerializer()}, result=manifest).serialize()
    storage = StoreResultStorage(store_uri=str(tmp_path / "store"))
    storage.write_path(key, written)
    assert ResultRecord.deserialize(storage.read_path(key)).result == manifest

    # The Prefect server keeps only a serializer's type: task-run states read back from the API must still validate.
    from prefect._internal.result_records import ResultRecordMetadata

    assert (
        ResultRecordMetadata.model_validate({"serializer": {"type": "dapt-manifest"}}).serializer.loads(
            ManifestSerializer().dumps(manifest)
        )
        == manifest
    )

    metrics_key = "base-eval-" + "ef" * 32  # metrics may be NaN: they must survive the re-encoding
    nan_metrics = EvalResult(metrics={"bpb": float("nan")})
    storage.write_path(
        metrics_key, ResultRecord(metadata={"serializer": JSONSerializer()}, result=nan_metrics).serialize()
    )
    assert math.isnan(ResultRecord.deserialize(storage.read_path(metrics_key)).result.metrics["bpb"])

    Path(ref.uri).unlink()  # an artifact it hands on is gone: not reused (Prefect takes the error for a cache miss)
    with pytest.raises(RuntimeError, match="is not reused|missing"):
        storage.read_path(key)


def test_damaged_artifacts_of_cached_stages_are_recomputed_and_verify_says_so(prefect_harness, tmp_path, monkeypatch):
    import dapt_core.clean as clean
    import dapt_core.ingest as ingest

    calls = {"ingest": 0, "clean": 0}
    for name, module, attr in (("ingest", ingest, "ingest_file"), ("clean", clean, "clean_corpus")):
        real = getattr(module, attr)
        monkeypatch.setattr(
            module,
            attr,
            lambda *a, _real=real, _name=name, **kw: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **kw),
        )
    dirs = write_corpus(tmp_path)
    cfg_path = write_config(tmp_path, dirs)
    cfg = load_config(cfg_path)
    first = prepare_flow(cfg)
    runner = CliRunner()
    res = runner.invoke(app, ["verify", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    report = _last_json(res.stdout)
    assert report["ok"] and {c["status"] for c in report["checks"]} == {"ok"}
    batches = first.ingested + first.evals
    assert len(report["checks"]) == 1 + len(batches) + 1  # clean, ingest batches, prepare-latest

    shard = Path(first.ingested[0].shard.uri)
    in_batch = [m.input.uri for m in file_records(open_store(first.store), first.ingested[:1])]
    shard.unlink()  # an ingest shard deleted
    stats = Path(first.clean.stats_json.uri)
    stats.write_text(stats.read_text()[:-10])  # a clean output truncated
    res = runner.invoke(app, ["verify", str(cfg_path), "--json"])
    assert res.exit_code == 2
    broken = {c["uri"]: c for c in _last_json(res.stdout)["checks"] if c["status"] != "ok"}
    ingest_record = str(tmp_path / "store" / RESULTS_PREFIX / f"ingest-{shard.stem.removeprefix('ingest-')}")
    assert broken[ingest_record]["status"] == "stale" and broken[ingest_record]["problems"] == [f"{shard}: missing"]
    clean_record = str(_records(tmp_path / "store", "clean")[0])
    assert broken[clean_record]["status"] == "stale" and "the manifest says" in broken[clean_record]["problems"][0]
    assert "the next run recomputes this stage" in res.stderr

    calls.update(ingest=0, clean=0)
    second = prepare_flow(cfg)  # a plain re-run
    assert calls == {"ingest": len(in_batch), "clean": 1}  # its rows are gone: the batch's files are read again
    assert (second.files_read, second.computed) == (len(in_batch), ["ingest", "clean"])
    assert second.clean == first.clean and shard.is_file()
    assert runner.invoke(app, ["verify", str(cfg_path)]).exit_code == 0

    # Same size, other bytes: the next stage that reads it refuses it, and its advice works.
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(cfg_path), "--json"])
    assert res.exit_code == 2
    damaged = [c for c in _last_json(res.stdout)["checks"] if c["status"] != "ok"]
    assert [c["status"] for c in damaged] == ["damaged", "damaged"]  # the ingest record and prepare-latest.json
    assert all(len(c["problems"]) == 1 and c["problems"][0].startswith(f"{shard}: sha256 ") for c in damaged)
    stricter = load_config(write_config(tmp_path, dirs, extra="clean: {quality: {min_words: 5}}"))
    with pytest.raises(IntegrityError, match="Delete it and re-run") as e:
        prepare_flow(stricter)
    assert str(shard) in str(e.value)
    shard.unlink()
    calls.update(ingest=0, clean=0)
    third = prepare_flow(stricter)
    assert calls == {"ingest": len(in_batch), "clean": 1} and third.ingested[0] == first.ingested[0]
    assert runner.invoke(app, ["verify", str(cfg_path)]).exit_code == 0


def test_check_on_s3_uses_the_object_not_a_cached_copy(s3_bucket, tmp_path):
    import boto3

    store = open_store(f"s3://{s3_bucket}/store")
    src = tmp_path / "a.bin"
    src.write_bytes(b"0123456789")
    ref = store.put_file(src, "x/a.bin")
    store.local_path(ref)  # cached locally, intact
    assert store.check(ref) is None and store.check(ref, full=True) is None
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="store/x/a.bin", Body=b"0123456780")
    assert store.check(ref) is None  # same size: only a full check sees it
    assert "does not match the manifest's" in store.check(ref, full=True)
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="store/x/a.bin")
    assert store.check(ref) == f"{ref.uri}: missing"


def test_checkpoints_are_not_what_a_cpt_result_hands_on():
    """Deleting old checkpoints to free space must not make a finished CPT stage run again."""
    from dapt_core.manifest import ArtifactRef, CptManifest, DirRef, artifacts

    ref = lambda name: ArtifactRef(uri=f"/s/{name}", sha256="0" * 64, bytes=1)  # noqa: E731
    m = CptManifest(
        accepted=True,
        promoted=DirRef(uri="/s/promoted", files={"model.safetensors": ref("promoted")}),
        checkpoints=[DirRef(uri="/s/ckpt", files={"optimizer.pt": ref("ckpt")})],
        tensorboard=DirRef(uri="/s/tb", files={"events": ref("tb")}),
        decisions=[],
        report_json=ref("r.json"),
        report_md=ref("r.md"),
        report_png=ref("r.png"),
        attempt=0,
        lr=1e-5,
        general_fraction=0.05,
        code_version="v",
    )
    assert [r.uri for r in artifacts(m)] == ["/s/promoted", "/s/r.json", "/s/r.md", "/s/r.png"]


def test_with_a_store_key_records_are_signed_and_unsigned_or_altered_ones_refused(tmp_path, monkeypatch):
    from prefect._internal.result_records import ResultRecord
    from prefect.serializers import JSONSerializer

    from dapt_core.manifest import IngestManifest, InputFile

    manifest = IngestManifest(
        input=InputFile(uri="/in/a.txt", source="s", kind="domain", fingerprint="f", bytes=1), docs=3, code_version="v"
    )
    written = ResultRecord(metadata={"serializer": JSONSerializer()}, result=manifest).serialize()
    storage = StoreResultStorage(store_uri=str(tmp_path / "store"))
    key, other_key = "ingest-" + "12" * 32, "ingest-" + "34" * 32
    storage.write_path(key, written)  # no key set: written unsigned
    monkeypatch.setenv("DAPT_STORE_KEY", "team secret")
    with pytest.raises(UntrustedResultRecord, match="not signed with the key in DAPT_STORE_KEY"):
        storage.read_path(key)

    storage.write_path(key, written)
    assert ResultRecord.deserialize(storage.read_path(key)).result == manifest
    record_path = tmp_path / "store" / RESULTS_PREFIX / key
    signed = json.loads(record_path.read_text())
    (tmp_path / "store" / RESULTS_PREFIX / other_key).write_text(json.dumps(signed))  # moved under another key
    with pytest.raises(UntrustedResultRecord, match="not signed"):
        storage.read_path(other_key)
    altered = json.loads(signed["result"])
    altered["data"]["docs"] = 4  # still a valid manifest, but not the one that was signed
    record_path.write_text(json.dumps({**signed, "result": json.dumps(altered)}))
    with pytest.raises(UntrustedResultRecord, match="not signed"):
        storage.read_path(key)
    monkeypatch.setenv("DAPT_STORE_KEY", "another secret")
    record_path.write_text(json.dumps(signed))
    with pytest.raises(UntrustedResultRecord, match="not signed"):
        storage.read_path(key)


def test_every_persisted_task_returns_a_registered_result_type():
    """A new cached task must add its manifest class to RESULT_TYPES, or every cached read of it would be refused."""
    import typing

    from prefect import Task

    import dapt.tasks.clean
    import dapt.tasks.cpt
    import dapt.tasks.ingest
    import dapt.tasks.sft
    import dapt.tasks.training_data
    from dapt.tasks.caching import RESULT_TYPES

    persisted = [
        t
        for module in (dapt.tasks.ingest, dapt.tasks.clean, dapt.tasks.training_data, dapt.tasks.cpt, dapt.tasks.sft)
        for t in vars(module).values()
        if isinstance(t, Task) and t.persist_result
    ]
    assert len(persisted) == 8
    registered = [typing.get_origin(t) or t for t in RESULT_TYPES.values()]
    for t in persisted:
        assert typing.get_type_hints(t.fn)["return"] in registered, t.name
