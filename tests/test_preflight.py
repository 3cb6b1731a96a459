"""Settings that cannot work fail before any data stage, naming the field and what would work."""

from __future__ import annotations

import pytest

from dapt_core.config import ConfigError, DaptConfig
from dapt_core.preflight import check_before_data_stages
from tests.tiny_model import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("base") / "model", ["some text to train a tokenizer on"] * 20)


def _config(base, **sections) -> DaptConfig:
    return DaptConfig.model_validate(
        {"data": {"domain": [{"name": "d", "paths": ["x"]}]}, "model": {"base": str(base)}, **sections}
    )


def test_lora_typo_among_good_targets_is_refused_with_the_real_names(tiny_base):
    cfg = _config(tiny_base, train={"method": "lora", "lora": {"target_modules": ["q_proj", "v_prj"]}})
    with pytest.raises(ConfigError) as err:
        check_before_data_stages(cfg)
    message = str(err.value)
    assert "train.lora.target_modules: ['v_prj'] match no module of LlamaForCausalLM" in message
    assert "'v_proj'" in message and "'q_proj'" not in message.split("match")[0]


def test_sft_lora_targets_and_missing_sft_files_are_all_reported(tiny_base, tmp_path):
    cfg = _config(
        tiny_base,
        sft={
            "data": [str(tmp_path / "missing.jsonl")],
            "train": {"method": "lora", "lora": {"target_modules": ["c_attn"]}},
        },
    )
    with pytest.raises(ConfigError) as err:
        check_before_data_stages(cfg)
    lines = str(err.value).splitlines()
    assert any(line.startswith(f"  - sft.data: {tmp_path / 'missing.jsonl'} does not exist") for line in lines)
    assert any("sft.train.lora.target_modules: ['c_attn'] match no module" in line for line in lines)


def test_default_targets_and_full_training_pass(tiny_base):
    check_before_data_stages(_config(tiny_base, train={"method": "lora"}))  # Llama names: all seven projections exist
    check_before_data_stages(_config(tiny_base))  # full training: nothing to look up


def test_an_s3_store_without_its_bucket_fails_before_the_data_stages(tiny_base, s3_endpoint, monkeypatch):
    from dapt.flows.preflight import check_before_first_stage
    from dapt_core.faults import StoreError

    monkeypatch.setenv("DAPT_STORE_RETRY_SECONDS", "2")
    cfg = _config(tiny_base).model_copy(update={"store": "s3://no-such-bucket/project"})
    with pytest.raises(StoreError) as err:
        check_before_first_stage(cfg)
    assert err.value.kind == "no_bucket" and "no-such-bucket" in str(err.value)


def test_a_cpt_deployment_name_without_its_flow_is_refused(tiny_base):
    from dapt.flows.preflight import check_before_first_stage

    with pytest.raises(ConfigError) as err:
        check_before_first_stage(_config(tiny_base), cpt_deployment="gpu")
    message = str(err.value)
    assert message.startswith("deploy.cpt_deployment: 'gpu' is not '<flow>/<deployment>' (e.g. dapt-cpt/dapt)")
    assert "dapt deploy CONFIG --pool cpu --gpu-pool gpu" in message
