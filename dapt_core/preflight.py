"""Checks run before the data stages, so that a setting which cannot work fails in seconds, not after hours of
ingest, cleaning and packing.

They need only the config and the base model's *config* (`model.module_names`: no weights are read).
"""

from __future__ import annotations

from pathlib import Path

from dapt_core.benchmarks import BenchmarkError, load_benchmark
from dapt_core.config import ConfigError, DaptConfig, TrainConfig
from dapt_core.model import ModelConfigError, module_names


def lora_target_problems(field: str, train: TrainConfig, model_class: str, names: set[str]) -> list[str]:
    """Targets that match no module. peft matches a target by the end of a module's dotted name; it refuses only when
    no target matches at all, so a typo among correct names would silently train fewer layers."""
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    missing = [t for t in train.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    leaves = sorted(
        s for s in suffixes if s.endswith("proj") or s in ("fc1", "fc2", "c_attn", "c_proj", "query_key_value", "dense")
    )
    return [
        f"{field}.lora.target_modules: {missing} match no module of {model_class}; "
        f"its projection layers are named {leaves or sorted(suffixes)[:20]}"
    ]


def check_before_data_stages(config: DaptConfig) -> None:
    """Raise one ConfigError listing every problem found (LoRA targets of CPT and SFT, missing SFT data files, benchmark
    files that cannot be read through their field mapping)."""
    problems = [f"sft.data: {p} does not exist" for p in config.sft.data if "://" not in p and not Path(p).exists()]
    for b in config.eval.benchmarks:
        if b.path is not None:
            try:
                load_benchmark(b)
            except BenchmarkError as e:
                problems.append(f"eval.benchmarks[{b.name}]: {e}")
    lora_sections = [
        (f, t) for f, t in (("train", config.train), ("sft.train", config.sft.train)) if t.method == "lora"
    ]
    if lora_sections and config.model.base:
        try:
            model_class, names = module_names(config.model)
        except ModelConfigError as e:
            problems.append(str(e))
        except (OSError, ValueError) as e:
            problems.append(f"model.base: cannot read the model config of {config.model.base}: {e}")
        else:
            for field, train in lora_sections:
                problems += lora_target_problems(field, train, model_class, names)
    if problems:
        raise ConfigError(
            "invalid settings, found before any data stage ran:\n" + "\n".join(f"  - {p}" for p in problems)
        )
