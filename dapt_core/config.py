"""The one YAML config, validated by pydantic before any work starts.

The same models are the parameter forms of the Prefect flows, so every field carries a description.
Defaults encode the rules of thumb of domain-adaptive pretraining (see README, "Defaults and why").
The section models live in dapt_core/config_sections.py; import them from here (`__all__`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from dapt_core.config_sections import (
    BenchmarkConfig,
    CleanConfig,
    DataConfig,
    DecontaminationConfig,
    DedupConfig,
    DeployConfig,
    EvalConfig,
    EWCConfig,
    IngestConfig,
    LoraTrainConfig,
    MixConfig,
    ModelConfig,
    NormalizeConfig,
    PlanConfig,
    PrepareConfig,
    QualityConfig,
    Section,
    SelfReplayConfig,
    SftConfig,
    SourceConfig,
    StoreName,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "BenchmarkConfig",
    "CleanConfig",
    "ConfigError",
    "DaptConfig",
    "DataConfig",
    "DecontaminationConfig",
    "DedupConfig",
    "DeployConfig",
    "EWCConfig",
    "EvalConfig",
    "IngestConfig",
    "LoraTrainConfig",
    "MixConfig",
    "ModelConfig",
    "NormalizeConfig",
    "PlanConfig",
    "PrepareConfig",
    "QualityConfig",
    "SelfReplayConfig",
    "SftConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
    "resolve_relative_paths",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field and what to do."""


class DaptConfig(Section):
    project: StoreName = Field(
        "dapt",
        description="Run name used in artifact paths and Prefect: a letter or digit, then letters, digits, '_', '.', "
        "'-' (no '..').",
    )
    store: str = Field("./dapt-artifacts", description="Artifact store: a local directory or s3://bucket/prefix.")
    aws_credentials_block: str | None = Field(
        None,
        description="Name of a Prefect AwsCredentials block (prefect-aws: `pip install 'dapt[aws]'`) whose keys, "
        "region and endpoint reach the s3:// store and s3:// inputs, instead of the AWS_* environment variables.",
    )
    data: DataConfig
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    def result_hash(self) -> str:
        """The config sections that change what the pipeline produces (not where it runs or how it is scheduled)."""
        from dapt_core.hashing import stable_hash

        exclude = {
            "project": True,
            "store": True,
            "aws_credentials_block": True,
            "plan": True,
            "deploy": True,
            "train": set(TrainConfig.NOT_TRAINED),
            "sft": {"train": set(TrainConfig.NOT_TRAINED)},
        }
        return stable_hash(self.model_dump(mode="json", exclude=exclude))

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith("s3://"):
            raise ValueError("store must be a local directory or s3://bucket/prefix")
        return v


# Hugging Face Trainer / TRL habits, and where dapt keeps the same setting.
_KNOWN_ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_grad_norm": "train.grad_clip",
    "lr_scheduler_type": "train.min_lr_ratio (cosine decay is built in)",
    "warmup_steps": "train.warmup_ratio",
    "save_steps": "train.save_every",
    "logging_steps": "train.log_every",
    "lora_r": "train.lora.r",
    "rank": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "model_name_or_path": "model.base",
    "max_seq_length": "mix.seq_len (CPT) or sft.seq_len (SFT)",
    "max_length": "mix.seq_len (CPT) or sft.seq_len (SFT)",
    "output_dir": "store",
}


def _section_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config model that holds the field at `loc` (list indices skipped), for suggestions."""
    model: type[BaseModel] = DaptConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        inner = field.annotation
        for arg in (inner, *getattr(inner, "__args__", ())):  # list[SourceConfig], X | None
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
        else:
            return None
    return model


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """A hint for an unknown key: the dapt field a Hugging Face name maps to, or the closest field name here."""
    name = str(loc[-1])
    if name in _KNOWN_ALIASES:
        return f"; dapt calls this {_KNOWN_ALIASES[name]}"
    section = _section_at(loc)
    if section is None:
        return ""
    names = [f.alias or n for n, f in section.model_fields.items()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<top level>"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r:.80})"
        hint = _did_you_mean(e["loc"]) if e["type"] == "extra_forbidden" else ""
        lines.append(f"  - {field}: {e['msg']}{got}{hint}")
    lines.append("See examples/config.yaml for a documented example.")
    return "\n".join(lines)


def load_config(path: str | Path) -> DaptConfig:
    """Read and validate a YAML config; relative paths in it are resolved against the config's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (see examples/config.yaml)")
    try:
        cfg = DaptConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None
    return resolve_relative_paths(cfg, path.parent.resolve())


def _resolve(p: str, base: Path) -> str:
    if "://" in p:
        return p
    p = os.path.expanduser(p)
    if Path(p).is_absolute():
        return p
    return str(base / p)


def resolve_relative_paths(cfg: DaptConfig, base: Path) -> DaptConfig:
    def sources(items: list[SourceConfig]) -> list[SourceConfig]:
        return [s.model_copy(update={"paths": [_resolve(p, base) for p in s.paths]}) for s in items]

    data = cfg.data.model_copy(
        update={
            "domain": sources(cfg.data.domain),
            "general": sources(cfg.data.general),
            "eval": sources(cfg.data.eval),
        }
    )
    model = cfg.model
    if model.base and Path(_resolve(model.base, base)).exists():
        model = model.model_copy(update={"base": _resolve(model.base, base)})
    if model.tokenizer and Path(_resolve(model.tokenizer, base)).exists():
        model = model.model_copy(update={"tokenizer": _resolve(model.tokenizer, base)})
    sft = cfg.sft.model_copy(update={"data": [_resolve(p, base) for p in cfg.sft.data]})
    benchmarks = [b.model_copy(update={"path": _resolve(b.path, base)}) if b.path else b for b in cfg.eval.benchmarks]
    evaluation = cfg.eval.model_copy(update={"benchmarks": benchmarks})
    return cfg.model_copy(
        update={"data": data, "model": model, "sft": sft, "eval": evaluation, "store": _resolve(cfg.store, base)}
    )
