"""Config validation: a bad config fails before any work, naming the field and the expected value."""

from __future__ import annotations

from pathlib import Path

import pytest

from dapt_core.config import ConfigError, load_config

EXAMPLE = Path(__file__).parents[1] / "examples" / "config.yaml"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_example_config_is_valid_and_paths_resolve():
    cfg = load_config(EXAMPLE)
    assert cfg.mix.general_fraction == 0.05
    assert cfg.data.domain[0].paths[0] == str(EXAMPLE.parent / "data/domain/**/*")
    assert cfg.store == str(EXAMPLE.parent / "dapt-artifacts")


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("data: {domain: []}", "data.domain: List should have at least 1 item"),
        (
            "data: {domain: [{name: a, paths: [x]}]}\nclean: {dedup: {bands: 20, rows: 8}}",
            "bands * rows (20*8) must be <= num_perm (128)",
        ),
        (
            "data: {domain: [{name: a, paths: [x]}]}\nmix: {general_fraction: 1.5}",
            "mix.general_fraction: Input should be less than 1",
        ),
        (
            "data: {domain: [{name: a, paths: [x]}]}\nclean: {quality: {min_wrds: 3}}",
            "clean.quality.min_wrds: Extra inputs are not permitted",
        ),
        ("data: {domain: [{name: 'bad name!', paths: [x]}]}", "data.domain.0.name: String should match pattern"),
        # Names become store keys (runs/<project>/..., ingest/<kind>/<source>/...): nothing may lead out of the store.
        (
            "project: ../../x\ndata: {domain: [{name: a, paths: [x]}]}",
            "project: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]",
        ),
        ("project: /etc\ndata: {domain: [{name: a, paths: [x]}]}", "project: String should match pattern"),
        (
            "data: {domain: [{name: a, paths: [x]}], general: [{name: '..', paths: [y]}]}",
            "data.general.0.name: String should match pattern",
        ),
        ("data: {domain: [{name: 'a..b', paths: [x]}]}", "data.domain.0.name: Value error, must not contain '..'"),
        ("data: {domain: [{name: a, paths: [x]}], general: [{name: a, paths: [y]}]}", "source names must be unique"),
        (
            "store: gs://bucket\ndata: {domain: [{name: a, paths: [x]}]}",
            "store: Value error, store must be a local directory or s3://",
        ),
        ("project: x", "data: Field required"),
    ],
)
def test_bad_config_names_field(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, yaml_text))
    assert str(_write(tmp_path, yaml_text)) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- just a list"))


@pytest.mark.parametrize(
    ("yaml_text", "hint"),
    [
        (
            "train: {learning_rate: 1.0e-4}",
            "train.learning_rate: Extra inputs are not permitted (got 0.0001); dapt calls this train.lr",
        ),
        ("learning_rate: 1e-4", "dapt calls this train.lr"),
        ("train: {lora: {rank: 8}}", "; dapt calls this train.lora.r"),
        ("train: {lora: {alhpa: 8}}", "; did you mean train.lora.alpha?"),
        ("mix: {general_fracton: 0.1}", "; did you mean mix.general_fraction?"),
        ("clean: {dedup: {jacard_threshold: 0.7}}", "; did you mean clean.dedup.jaccard_threshold?"),
        ("train: {ewc: {lamda: 10}}", "; did you mean train.ewc.lambda?"),
    ],
)
def test_unknown_key_gets_a_suggestion(tmp_path, yaml_text, hint):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "data: {domain: [{name: a, paths: [x]}]}\n" + yaml_text))
    assert hint in str(err.value)


def test_sft_train_merges_with_sft_defaults_field_by_field(tmp_path):
    cfg = load_config(_write(tmp_path, "data: {domain: [{name: a, paths: [x]}]}\nsft: {train: {lr: 1.0e-5}}"))
    default = load_config(_write(tmp_path, "data: {domain: [{name: a, paths: [x]}]}")).sft.train
    assert cfg.sft.train.lr == 1e-5
    # every other field keeps SFT's default, not CPT's (epochs 2, warmup 3%, per-document attention)
    assert cfg.sft.train.model_dump(exclude={"lr"}) == default.model_dump(exclude={"lr"})
    assert (default.epochs, default.warmup_ratio, default.block_cross_document_attention) == (2.0, 0.03, True)


def test_settings_that_do_not_change_what_is_trained_keep_the_cpt_and_sft_cache_keys(tmp_path):
    from dapt.tasks.cpt import cpt_key
    from dapt.tasks.sft import sft_key
    from dapt_core.config import DaptConfig, EvalConfig, SftConfig, TrainConfig
    from dapt_core.evaluate import EvalResult
    from dapt_core.manifest import ArtifactRef, DirRef, PackManifest

    ref = ArtifactRef(uri="/store/train", sha256="0" * 64, bytes=1)
    model = DirRef(uri="/store/model", files={})
    pack = PackManifest(
        train_shards=[ref],
        seq_len=64,
        sequences=1,
        tokens={},
        general_fraction_target=0.05,
        general_fraction_realised=0.05,
        report_json=ref,
        code_version="test",
    )
    (tmp_path / "sft.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    reference = EvalResult(metrics={})

    def keys(train: TrainConfig) -> tuple[str, str]:
        sft = SftConfig(data=[str(tmp_path / "sft.jsonl")], train=train)
        return (
            cpt_key(model, pack, train, EvalConfig(), reference, attempt=0),
            sft_key(model, pack, sft, EvalConfig(), reference),
        )

    base = TrainConfig()
    cpt, sft = keys(base)
    for field, value in {"data_workers": 4, "isolate": True, "stop_grace_s": 5.0, "rdzv_id": "other"}.items():
        assert field in TrainConfig.NOT_TRAINED
        assert keys(base.model_copy(update={field: value})) == (cpt, sft), field
    changed_cpt, changed_sft = keys(base.model_copy(update={"lr": 1e-4}))
    assert changed_cpt != cpt and changed_sft != sft
    # The pipeline's config hash (a nightly refresh re-runs everything when it changes) ignores the same fields.
    config = DaptConfig(data={"domain": [{"name": "a", "paths": ["x"]}]})
    assert config.model_copy(update={"train": base.model_copy(update={"data_workers": 4})}).result_hash() == (
        config.result_hash()
    )
