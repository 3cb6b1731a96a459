"""The model card (README.md) written into every promoted CPT model and every SFT model directory.

Hugging Face's format: YAML front matter (base_model, library_name, tags) that the Hub and `huggingface_hub` read,
then what a reader needs to trust the weights: what they were trained from and on (the data funnel), how they
compare with the original base on the forgetting evaluation, and the dapt version and config hash that reproduce them.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from dapt_core.config import DaptConfig
from dapt_core.manifest import SourceStats, TrainingDataManifest


class ModelProvenance(BaseModel):
    """What a model came from. It describes a result and changes nothing trained, so it is in no cache key."""

    project: str
    base_model: str = Field(description="model.base (and gguf_file) as configured.")
    config_hash: str = Field(description="Hash of the config sections that change results (DaptConfig.result_hash).")
    dapt_version: str
    sources: list[SourceStats] = Field(description="The data funnel: documents in and kept per source.")
    new_tokens: int = Field(description="Tokens the tokenizer extension added.")


def provenance_of(config: DaptConfig, data: TrainingDataManifest) -> ModelProvenance:
    base = config.model.base or "unknown"
    return ModelProvenance(
        project=config.project,
        base_model=f"{base}/{config.model.gguf_file}" if config.model.gguf_file else base,
        config_hash=config.result_hash(),
        dapt_version=dapt_version(),
        sources=data.prepare.clean.sources,
        new_tokens=data.tokenizer.new_tokens,
    )


def dapt_version() -> str:
    try:
        return metadata.version("dapt")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def write_model_card(
    out_dir: Path,
    provenance: ModelProvenance,
    stage: str,
    metrics: dict[str, float],
    reference: dict[str, float],
    decision: str,
) -> Path:
    """README.md in `out_dir`: `stage` ("continual pretraining" / "supervised fine-tuning"), the evaluation `metrics`
    beside the original base's (`reference`) and the forgetting policy's `decision`."""
    front = {
        "base_model": provenance.base_model,
        "library_name": "transformers",
        "tags": ["dapt", "domain-adaptation", stage.replace(" ", "-")],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {provenance.project}: {stage}",
        "",
        f"Domain-adapted with [dapt](https://pypi.org/project/dapt/) {provenance.dapt_version} from "
        f"`{provenance.base_model}` "
        f"(config hash `{provenance.config_hash[:16]}`); the tokenizer extension added {provenance.new_tokens} tokens.",
        "",
        f"Forgetting policy: {decision}",
        "",
        "## Evaluation (held-out text and benchmarks)",
        "",
        "| metric | original base | this model |",
        "| --- | --- | --- |",
    ]
    for name in sorted(set(metrics) | set(reference)):
        if not name.endswith("/n"):
            lines.append(f"| {name} | {_fmt(reference.get(name))} | {_fmt(metrics.get(name))} |")
    lines += [
        "",
        "## Training data",
        "",
        "| source | kind | documents in | kept | est. tokens kept |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in provenance.sources:
        lines.append(f"| {s.source} | {s.kind} | {s.input_docs:,} | {s.kept_docs:,} | {s.kept_est_tokens:,} |")
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
