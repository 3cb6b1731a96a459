"""The training-data flow: prepare (cached subflow) → tokenizer extension → packing, cached on content."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from dapt.flows.training_data import training_data_flow
from dapt_core.config import load_config
from dapt_core.store import open_store
from tests.corpus import FILL, prose, write_config, write_corpus
from tests.tiny_model import save_tiny_model_dir


def _config(tmp_path, general_fraction=0.05):
    """Corpus and tiny base model are built once per test; only the config changes between calls."""
    dirs = {name: tmp_path / name for name in ("domain", "general", "eval")}
    if not dirs["domain"].exists():
        write_corpus(tmp_path, n_domain=40, n_general=30)
        save_tiny_model_dir(tmp_path / "base", [prose(i, "general") for i in range(100)])
    model_dir = tmp_path / "base"
    extra = f"""model: {{base: "{model_dir}"}}
tokenizer: {{min_frequency: 5, domain_vocab_size: 600}}
mix: {{general_fraction: {general_fraction}, seq_len: 64, heldout_fraction: 0.1}}
"""
    return write_config(tmp_path, dirs, extra=extra)


def test_training_data_flow_end_to_end_and_cached(prefect_harness, tmp_path, stage_calls):
    cfg_path = _config(tmp_path)
    result = training_data_flow(load_config(cfg_path))
    store = open_store(str(tmp_path / "store"))

    # Tokenizer: drug names the general-prose tokenizer splits were added; the report says so.
    assert result.tokenizer.new_tokens > 0
    report = json.loads(store.read_text(result.tokenizer.report_json))
    domain_terms = {w for key in ("drug", "drug2", "finding") for phrase in FILL[key] for w in phrase.split()}
    assert any(t["text"].strip() in domain_terms for t in report["new_tokens"])

    # Packing: fixed-length sequences, the realised replay share at the target, held-out eval sets written.
    p = result.pack
    assert p.sequences > 0 and abs(p.general_fraction_realised - 0.05) <= 0.005
    shard = pq.read_table(store.local_path(p.train_shards[0]))
    assert all(len(ids) == 64 for ids in shard.column("input_ids").to_pylist())
    heldout = [json.loads(line)["text"] for line in store.read_text(p.eval_domain).splitlines()]
    assert heldout

    assert (stage_calls["tokenizer"], stage_calls["pack"]) == (1, 1)
    again = training_data_flow(load_config(cfg_path))
    assert (stage_calls["tokenizer"], stage_calls["pack"]) == (1, 1) and again.computed == []
    assert again.pack == p


def test_replay_change_repacks_without_retokenizing(prefect_harness, tmp_path, stage_calls):
    training_data_flow(load_config(_config(tmp_path, 0.05)))
    result = training_data_flow(load_config(_config(tmp_path, 0.15)))
    assert (stage_calls["tokenizer"], stage_calls["pack"]) == (1, 2)
    assert result.computed == ["pack"]
    assert abs(result.pack.general_fraction_realised - 0.15) <= 0.005
