"""The whole DAG (flows/dapt_pipeline.py) on a tiny Llama, for real: report, SFT, retry without recompute after a CPT
failure, and the nightly refresh (nothing changed → nothing runs; a new file → only it is ingested, CPT continues)."""

from __future__ import annotations

import json

import pytest

import tasks.cpt
from dapt_core.config import load_config
from dapt_core.store import open_store
from flows.dapt_pipeline import dapt_pipeline, load_state, nightly_refresh
from tests.corpus import prose, write_config, write_corpus
from tests.tiny_model import pretrained_general_base

SEQ = 64


def _sft_pairs(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            words = prose(2000 + i, "domain").split()
            f.write(json.dumps({"prompt": "Continue the note: " + " ".join(words[:8]), "response": " ".join(words[8:20])}) + "\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    dirs = write_corpus(root, n_domain=40, n_general=30)
    base = pretrained_general_base(root, SEQ, steps=40)
    _sft_pairs(root / "sft.jsonl")
    extra = f"""model: {{base: "{base}"}}
tokenizer: {{min_frequency: 5, domain_vocab_size: 600}}
mix: {{general_fraction: 0.05, seq_len: {SEQ}, heldout_fraction: 0.1}}
train: {{lr: 1e-4, max_steps: 10, save_every: 5, batch_size: 8, report_to: []}}
eval: {{max_probes: 20, batch_size: 8}}
sft: {{data: ["{root / 'sft.jsonl'}"], seq_len: {SEQ}, heldout_fraction: 0.2, train: {{lr: 1e-4, max_steps: 6, batch_size: 4, report_to: []}}}}
"""
    return root, dirs, write_config(root, dirs, extra=extra)


def test_retry_after_cpt_failure_recomputes_only_cpt_onward(prefect_harness, project, stage_calls, monkeypatch):
    root, dirs, config_path = project
    cfg = load_config(config_path)

    counted_cpt = tasks.cpt.run_attempt

    def gpu_lost(*a, **kw):
        stage_calls["cpt"] += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tasks.cpt, "run_attempt", gpu_lost)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        dapt_pipeline(cfg)
    assert stage_calls["ingest"] >= 2 and stage_calls["clean"] == stage_calls["tokenizer"] == stage_calls["pack"] == stage_calls["cpt"] == 1
    assert load_state(cfg) is None  # a failed run is not the "last success"

    monkeypatch.setattr(tasks.cpt, "run_attempt", counted_cpt)  # the GPU is back
    for k in stage_calls:
        stage_calls[k] = 0
    result = dapt_pipeline(cfg)  # what `dapt run` again, or a retry of the flow run, does
    assert stage_calls == {"ingest": 0, "clean": 0, "tokenizer": 0, "pack": 0, "cpt": 1}, stage_calls

    # The run's outputs: a promoted model, SFT with response metrics, a report with plots, the refresh state.
    store = open_store(cfg.store)
    assert result.cpt.promoted is not None and result.sft is not None
    assert result.sft.response_after["sft/response_loss"] < result.sft.response_before["sft/response_loss"]
    report = store.read_text(result.report_md)
    assert "Domain bits per byte on held-out text: base" in report and "## Data funnel" in report
    assert "| SFT |" in report and "sft/response_loss" in report
    doc = json.loads(store.read_text(result.report_json))
    assert doc["cpt_promoted"]["domain/bits_per_byte"] < doc["base"]["domain/bits_per_byte"]
    for plot in result.plots.values():
        assert store.local_path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_state(cfg)
    assert state is not None and state.promoted == result.cpt.promoted


def test_nightly_refresh(prefect_harness, project, stage_calls):
    root, dirs, config_path = project
    cfg = load_config(config_path)
    if load_state(cfg) is None:  # run alone: make the first success
        dapt_pipeline(cfg)
    before = load_state(cfg)
    for k in stage_calls:
        stage_calls[k] = 0

    quiet = nightly_refresh(cfg)
    assert not quiet.changed and quiet.pipeline is None
    assert stage_calls == {k: 0 for k in stage_calls}

    new_file = dirs["domain"] / "new-note.txt"
    new_file.write_text(prose(7777, "domain") + " " + prose(7778, "domain"))
    try:
        refreshed = nightly_refresh(cfg)
    finally:
        new_file.unlink()
    assert refreshed.changed and refreshed.new_or_changed == [str(new_file)]
    assert stage_calls["ingest"] == 1 and stage_calls["tokenizer"] == 0  # only the new file; the vocabulary is kept
    p = refreshed.pipeline
    assert p.refresh_of == before.promoted.uri
    assert p.cpt.attempts[0]["start_model"] == before.promoted.uri
    assert p.data.tokenizer == before.tokenizer
    assert load_state(cfg).inputs.get(str(new_file)) is not None


def test_refresh_after_a_config_change_is_a_full_run(prefect_harness, project, stage_calls):
    """A changed training setting makes the refresh a full run from the base model (cached data stages reused)."""
    root, dirs, config_path = project
    cfg = load_config(config_path)
    if load_state(cfg) is None:
        dapt_pipeline(cfg)
    for k in stage_calls:
        stage_calls[k] = 0
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 5e-5})})
    result = nightly_refresh(changed)
    assert result.changed and result.pipeline.refresh_of is None
    assert result.pipeline.cpt.attempts[0]["start_model"] == result.pipeline.data.tokenizer.model.uri
    assert stage_calls["ingest"] == stage_calls["tokenizer"] == stage_calls["pack"] == 0 and stage_calls["cpt"] >= 1
