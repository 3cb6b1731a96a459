"""`dapt plan`: the rules of thumb as warnings and the 6·N·D compute estimate with its assumptions."""

from __future__ import annotations

import pytest

from dapt_core.config import DaptConfig
from dapt_core.gpus import GPU_PEAK_TFLOPS
from dapt_core.plan import count_tokens, estimate_compute, model_params, warnings_for


def _cfg(**overrides) -> DaptConfig:
    raw = {"data": {"domain": [{"name": "d", "paths": ["x"]}]}}
    raw.update(overrides)
    return DaptConfig.model_validate(raw)


def test_compute_is_six_n_d_over_sustained_flops():
    cfg = _cfg(mix={"general_fraction": 0.05}, plan={"gpu": "H100", "mfu": 0.5})
    est = estimate_compute(7e9, 950_000_000, cfg)
    train_tokens = 950_000_000 / 0.95
    assert est.train_tokens == pytest.approx(train_tokens)
    assert est.flops == pytest.approx(6 * 7e9 * train_tokens)
    assert est.gpu_hours == pytest.approx(6 * 7e9 * train_tokens / (GPU_PEAK_TFLOPS["H100"] * 1e12 * 0.5) / 3600)
    assert any("6 * N * D" in a for a in est.assumptions) and any("50% MFU" in a for a in est.assumptions)


def test_lora_skips_frozen_weight_gradients_and_custom_gpu():
    full = estimate_compute(1e9, 10**9, _cfg(plan={"gpu": "200"}))
    lora = estimate_compute(1e9, 10**9, _cfg(plan={"gpu": "200", "method": "lora"}))
    assert lora.flops / full.flops == pytest.approx(4 / 6)
    assert full.peak_tflops == 200.0
    with pytest.raises(ValueError, match="plan.gpu: unknown GPU 'TPU9'"):
        estimate_compute(1e9, 10**9, _cfg(plan={"gpu": "TPU9"}))


@pytest.mark.parametrize(
    ("domain", "general", "fraction", "expected"),
    [
        (100_000, 10**6, 0.05, ["below the ~500k tokens"]),
        (50_000_000, 10**7, 0.05, ["expect small domain gains"]),
        (2 * 10**9, 10**9, 0.05, ["1B-10B domain tokens"]),
        (20 * 10**9, 10**10, 0.05, ["consider pretraining from scratch"]),
        (200_000_000, 10**8, 0.0, ["no replay typically costs 5-15 points"]),
        (200_000_000, 10**8, 0.02, ["below 5%: forgetting risk"]),
        (200_000_000, 0, 0.05, ["No general corpus"]),
        (200_000_000, 1_000_000, 0.05, ["will be repeated ~10.5 times"]),
        (200_000_000, 10**8, 0.05, []),
    ],
)
def test_rules_of_thumb(domain, general, fraction, expected):
    got = warnings_for(domain, general, fraction)
    assert len(got) == len(expected)
    for needle, warning in zip(expected, got):
        assert needle in warning


def test_count_tokens_with_a_real_tokenizer_and_without():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the patient received tacrolimus twice daily", "renal function was monitored"] * 20
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    expected = sum(len(tok.encode(t).ids) for t in texts)
    assert count_tokens(iter(texts), fast, batch_size=7) == expected
    assert count_tokens(["abcd" * 10]) == 10  # bytes / 4


def test_model_params_from_config_without_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert model_params(_cfg(model={"base": str(tmp_path / "m")})) == real
    assert model_params(_cfg(model={"params": 7e9})) == 7e9
    assert model_params(_cfg()) is None
