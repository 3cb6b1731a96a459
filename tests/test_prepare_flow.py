"""The prepare flow under Prefect: accounting, caching on content (checked with counters), retries, S3, CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dapt_core.clean as clean
import dapt_core.discovery as discovery
import dapt_core.ingest as ingest
from dapt.flows.cli import app
from dapt.flows.prepare import prepare_flow
from dapt_core.config import load_config
from dapt_core.faults import StoreError
from dapt_core.ingest_batches import file_records
from dapt_core.store import open_store
from tests.corpus import EVAL_QUESTION, near_copy, prose, write_config, write_corpus


@pytest.fixture
def counters(monkeypatch):
    """Count the real work: calls into dapt_core's ingest and clean, whatever Prefect decides to run."""
    calls = {"ingest": [], "clean": 0}
    real_ingest, real_clean = ingest.ingest_file, clean.clean_corpus

    def counting_ingest(inp, *a, **kw):
        calls["ingest"].append(inp.uri)
        return real_ingest(inp, *a, **kw)

    def counting_clean(*a, **kw):
        calls["clean"] += 1
        return real_clean(*a, **kw)

    monkeypatch.setattr(ingest, "ingest_file", counting_ingest)
    monkeypatch.setattr(clean, "clean_corpus", counting_clean)
    return calls


def test_prepare_accounts_for_every_document(prefect_harness, tmp_path, counters):
    dirs = write_corpus(tmp_path)
    # A duplicate, a too-short doc, a malformed line and an eval-contaminated doc: each dropped with its reason.
    (dirs["domain"] / "dup.txt").write_text((dirs["domain"] / "note0.txt").read_text())
    (dirs["domain"] / "short.txt").write_text("Too short to keep.")
    with open(dirs["general"] / "general.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"text": prose(4242, "general") + " " + EVAL_QUESTION}) + "\n")
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(prose(7, "domain"))
    (dirs["domain"] / "escape.txt").symlink_to(secret)  # refused at discovery: outside the input root

    result = prepare_flow(load_config(write_config(tmp_path, dirs)))
    cm = result.clean
    assert cm.input_docs == cm.kept_docs + sum(cm.dropped.values())
    assert cm.input_docs == 12 + 2 + 6 + 2 + 1  # generated docs + dup + short + malformed + contaminated + symlink
    assert cm.dropped == {
        "exact_duplicate": 1,
        "quality:min_words": 1,
        "quarantine:malformed_json": 1,
        "decontaminated": 1,
        "quarantine:symlink_outside_root": 1,
    }
    # Each quarantined input's details, not only its reason, are in the manifest and the stats report.
    details = {(q.reason, q.position): q.detail for q in cm.quarantined}
    assert details.keys() == {("symlink_outside_root", "file"), ("malformed_json", "line 7")}
    assert f"links to {secret}" in details["symlink_outside_root", "file"]
    assert "Expecting property name" in details["malformed_json", "line 7"]
    for s in cm.sources:
        assert s.input_docs == s.kept_docs + sum(s.dropped.values())
    store = open_store(str(tmp_path / "store"))
    assert "exact_duplicate" in store.read_text(cm.stats_md)
    assert f"links to {secret}" in store.read_text(cm.stats_md)
    stats = json.loads(store.read_text(cm.stats_json))
    assert {(q["file"], q["detail"]) for q in stats["quarantined"]} == {(q.file, q.detail) for q in cm.quarantined}
    assert len(counters["ingest"]) == 11 and counters["clean"] == 1  # 10 training files + 1 eval file


def test_rerun_recomputes_nothing_and_new_file_ingests_only_it(prefect_harness, tmp_path, counters):
    dirs = write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, dirs))
    first = prepare_flow(cfg)
    assert (first.files_read, first.computed, first.cached) == (9, ["ingest", "clean"], [])  # 8 training + 1 eval

    counters["ingest"].clear()
    counters["clean"] = 0
    state = prepare_flow(cfg, return_state=True)
    second = state.result()
    assert counters == {"ingest": [], "clean": 0}
    assert (second.files_reused, second.computed, second.cached) == (9, [], ["ingest", "clean"])
    assert second.clean == first.clean
    # Finished ingest batches are read from their records without a task run (~15 ms of bookkeeping each).
    assert _task_run_names(state.state_details.flow_run_id) == ["clean-dedup-stats", "discover-inputs"]

    new_file = dirs["domain"] / "new.txt"
    new_file.write_text(prose(31337, "domain"))
    third = prepare_flow(cfg)
    assert counters["ingest"] == [str(new_file)] and counters["clean"] == 1
    assert third.clean.input_docs == first.clean.input_docs + 1

    # Changing a file's content (same path) re-ingests that file only.
    counters["ingest"].clear()
    new_file.write_text(prose(4711, "domain"))
    prepare_flow(cfg)
    assert counters["ingest"] == [str(new_file)]


def test_retry_after_failed_dedup_does_not_reingest(prefect_harness, tmp_path, counters, monkeypatch):
    dirs = write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, dirs))
    real_clean = clean.clean_corpus

    def broken(*a, **kw):
        raise RuntimeError("simulated crash in dedup")

    monkeypatch.setattr(clean, "clean_corpus", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_flow(cfg)
    assert len(counters["ingest"]) == 9  # finished work is persisted before the crash

    monkeypatch.setattr(clean, "clean_corpus", real_clean)
    counters["ingest"].clear()
    result = prepare_flow(cfg)
    assert counters["ingest"] == []
    assert result.computed == ["clean"]


def test_config_change_in_clean_section_reuses_ingest(prefect_harness, tmp_path, counters):
    dirs = write_corpus(tmp_path)
    prepare_flow(load_config(write_config(tmp_path, dirs)))
    counters["ingest"].clear()
    stricter = load_config(write_config(tmp_path, dirs, extra="clean: {quality: {min_words: 1000}}"))
    result = prepare_flow(stricter)
    assert counters["ingest"] == [] and result.computed == ["clean"]
    assert result.clean.dropped == {"quality:min_words": result.clean.input_docs}


def test_s3_store_and_s3_inputs(prefect_harness, tmp_path, s3_bucket, counters):
    import boto3

    dirs = write_corpus(tmp_path)
    s3 = boto3.client("s3")
    for path in dirs["domain"].iterdir():
        s3.upload_file(str(path), s3_bucket, f"raw/domain/{path.name}")
    shutil.rmtree(dirs["domain"])
    dirs["domain"] = f"s3://{s3_bucket}/raw/domain/"
    cfg = load_config(write_config(tmp_path, dirs, store=f"s3://{s3_bucket}/artifacts"))
    first = prepare_flow(cfg)
    assert all(p.uri.startswith(f"s3://{s3_bucket}/artifacts/clean/") for p in first.clean.domain.parts)
    assert first.clean.input_docs == first.clean.kept_docs + sum(first.clean.dropped.values()) == 18
    assert open_store(cfg.store).list("prefect-results")  # task results live in the bucket, for any worker

    counters["ingest"].clear()
    counters["clean"] = 0
    second = prepare_flow(cfg)
    assert counters == {"ingest": [], "clean": 0} and second.computed == []


def test_cli_prepare_json_and_plan(prefect_harness, tmp_path):
    dirs = write_corpus(tmp_path)
    cfg_path = write_config(tmp_path, dirs)
    runner = CliRunner()
    plan_before = runner.invoke(app, ["plan", str(cfg_path), "--json"])
    assert plan_before.exit_code == 0, plan_before.output
    before = json.loads(plan_before.stdout.strip().splitlines()[-1])
    assert before["counted_on"].startswith("raw inputs") and before["domain_tokens"] > 0

    res = runner.invoke(app, ["prepare", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    assert "ingest files" in res.stderr and "9/9" in res.stderr  # the progress bar counted every file
    manifest = json.loads(res.stdout.strip().splitlines()[-1])
    assert manifest["stage"] == "prepare"
    assert manifest["clean"]["input_docs"] == manifest["clean"]["kept_docs"] + sum(
        manifest["clean"]["dropped"].values()
    )

    after = json.loads(runner.invoke(app, ["plan", str(cfg_path), "--json"]).stdout.strip().splitlines()[-1])
    assert after["counted_on"].startswith("cleaned corpus")
    assert any("below the ~500k tokens" in w for w in after["warnings"])
    assert after["compute"] is None  # no model given: the estimate is skipped, and said so
    assert any("GPU-hours estimate is skipped" in w for w in after["warnings"])


def test_cli_bad_config_fails_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {domain: [{name: a, paths: [x]}]}\nclean: {dedup: {num_perm: 3}}\n")
    res = CliRunner().invoke(app, ["prepare", str(bad)])
    assert res.exit_code == 2
    assert "clean.dedup.num_perm" in res.output and "greater than or equal to 16" in res.output


def test_stats_are_published_as_prefect_artifacts(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    dirs = write_corpus(tmp_path)
    result = prepare_flow(load_config(write_config(tmp_path, dirs)))
    with get_client(sync_client=True) as client:
        table = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dapt-data-funnel"]))
        )
        markdown = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dapt-data-stats"]))
        )
    assert table and markdown
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert {r["source"] for r in rows} == {"notes", "general"}
    assert sum(r["input"] for r in rows) == result.clean.input_docs
    assert "notes" in markdown[0].data


def test_eval_set_with_wrong_text_field_is_refused(prefect_harness, tmp_path):
    dirs = write_corpus(tmp_path)
    cfg_path = write_config(tmp_path, dirs)
    cfg_path.write_text(
        cfg_path.read_text().replace("eval: [{name: evalset,", "eval: [{name: evalset, text_field: question,")
    )
    res = CliRunner().invoke(app, ["prepare", str(cfg_path), "--json"])
    assert res.exit_code == 2
    assert "data.eval" in res.output and "text_field" in res.output and "eval.jsonl" in res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["error"]


def test_missing_input_path_is_one_error_line(tmp_path):
    dirs = write_corpus(tmp_path)
    shutil.rmtree(dirs["general"])
    res = CliRunner().invoke(app, ["plan", str(write_config(tmp_path, dirs))])
    assert res.exit_code == 2
    assert "error:" in res.output and str(dirs["general"]) in res.output and "Traceback" not in res.output


def test_success_ends_with_the_log_file_path(tmp_path):
    """A quiet terminal still says where the full log went."""
    dirs = write_corpus(tmp_path)
    res = CliRunner().invoke(app, ["plan", str(write_config(tmp_path, dirs))])
    assert res.exit_code == 0, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("log: ")
    log_file = Path(last.removeprefix("log: "))
    assert log_file.parent == Path(os.environ["DAPT_LOG_DIR"]) and log_file.name.startswith("plan-")
    assert log_file.is_file()


def test_input_deleted_after_discovery_fails_once_and_is_not_cached(prefect_harness, tmp_path, counters, monkeypatch):
    dirs = write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, dirs))
    victim = dirs["domain"] / "note0.txt"
    content = victim.read_text()
    real_discover = discovery.discover_inputs

    def discover_then_delete(*a, **kw):
        found = real_discover(*a, **kw)
        victim.unlink(missing_ok=True)
        return found

    monkeypatch.setattr(discovery, "discover_inputs", discover_then_delete)
    with pytest.raises(StoreError, match=f"{victim}: deleted after it was discovered") as e:
        prepare_flow(cfg)
    assert e.value.kind == "vanished"
    assert counters["ingest"].count(str(victim)) == 1  # not retried: it cannot succeed

    # Had the failed read been cached (as an 'unreadable' file under the same content hash), the restored file
    # would come back from the cache with no documents.
    monkeypatch.setattr(discovery, "discover_inputs", real_discover)
    victim.write_text(content)
    counters["ingest"].clear()
    result = prepare_flow(cfg)
    assert str(victim) in counters["ingest"]
    records = file_records(open_store(result.store), result.ingested)
    (restored,) = [m for m in records if m.input.uri == str(victim)]
    assert restored.docs == 1 and restored.quarantined == []


def test_cli_disk_full_is_one_error_line(prefect_harness, tmp_path, monkeypatch):
    import dapt_core.store as store_module

    dirs = write_corpus(tmp_path)
    cfg_path = write_config(tmp_path, dirs)

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.shutil, "copyfileobj", no_space)
    res = CliRunner().invoke(app, ["prepare", str(cfg_path), "--json"])
    assert res.exit_code == 2, res.output
    error = json.loads(res.stdout.strip().splitlines()[-1])
    assert "no space left on device" in error["error"] and str(tmp_path / "store") in error["error"]
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] and "Traceback" not in res.stderr
    assert "OSError: [Errno 28]" in Path(error["log"]).read_text()  # the details are in the log file


def test_refresh_signs_only_new_files_and_reports_duplicates_of_earlier_documents(
    prefect_harness, tmp_path, counters, signed_docs
):
    dirs = write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, dirs, extra="ingest: {batch_bytes: 1}"))  # a batch (and shard) per file
    first = prepare_flow(cfg)
    assert first.new is not None and first.new.near_duplicates_of_earlier == 0

    signed_docs.clear()  # the first run's
    (dirs["domain"] / "zz-near.txt").write_text(near_copy((dirs["domain"] / "note0.txt").read_text(), 0))
    (dirs["domain"] / "zz-new.txt").write_text(prose(4242, "domain"))
    second = prepare_flow(cfg)
    assert sum(signed_docs) == 2  # the two new documents; every other signature is read from the store
    assert second.new is not None and (second.new.files, second.new.docs) == (2, 2)
    assert (second.new.near_duplicates_of_earlier, second.new.exact_duplicates_of_earlier) == (1, 0)
    assert second.clean.dropped.get("near_duplicate", 0) == first.clean.dropped.get("near_duplicate", 0) + 1


def test_files_added_after_the_last_ones_make_a_batch_of_their_own(prefect_harness, tmp_path):
    """A source's last batch has no boundary after it; the last run's batch ends keep it as it was, so a nightly
    drop in a new folder is the only batch read and cleaned again."""
    dirs = write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, dirs))
    first = prepare_flow(cfg)
    drop = dirs["domain"] / "zz-drop"
    drop.mkdir()
    (drop / "a.txt").write_text(prose(4242, "domain"))
    (drop / "b.txt").write_text(prose(4243, "domain"))
    second = prepare_flow(cfg)
    assert all(batch in second.ingested for batch in first.ingested)
    new_batches = [batch for batch in second.ingested if batch not in first.ingested]
    assert sum(b.file_count for b in new_batches) == 2 and all(str(drop) in b.first_uri for b in new_batches)


def _task_run_names(flow_run_id) -> list[str]:
    """The task runs of a flow run, by task name (sorted)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return sorted(run.name.rsplit("-", 1)[0] for run in runs)

    return asyncio.run(read())


def test_ingest_cache_keys_follow_every_field_of_every_file_and_the_settings():
    from dapt.tasks.ingest import ingest_batch_key, ingest_keys
    from dapt_core.config import IngestConfig
    from dapt_core.input_files import InputFiles
    from dapt_core.manifest import InputFile

    batch = [
        InputFile(uri=f"/in/{i}.txt", source="notes", kind="domain", fingerprint=f"sha-{i}", bytes=10 + i)
        for i in range(3)
    ]
    cfg = IngestConfig()
    key, keys = ingest_batch_key(batch, cfg), ingest_keys(batch, cfg)
    assert ingest_batch_key(InputFiles.of(batch), cfg) == key and ingest_keys(InputFiles.of(batch), cfg) == keys
    assert len(set(keys)) == 3
    changes = {"uri": "/in/x.txt", "source": "other", "kind": "general", "text_field": "body", "fingerprint": "sha-x"}
    for field, value in {**changes, "bytes": 99}.items():
        changed = [batch[0], batch[1].model_copy(update={field: value}), batch[2]]
        assert ingest_batch_key(changed, cfg) != key, field
        assert [a == b for a, b in zip(ingest_keys(changed, cfg), keys)] == [True, False, True], field
    assert ingest_batch_key(batch, IngestConfig(max_doc_bytes=1000)) != key
    assert ingest_keys(batch, IngestConfig(max_doc_bytes=1000)) != keys
    # How files are grouped shapes the batch, not a file's rows: a file keeps its key when batching changes.
    assert ingest_keys(batch, IngestConfig(batch_files=7)) == keys
