"""`dapt plan`: token counts, the rules of thumb as warnings, and a GPU-hours estimate with its assumptions.

The figures come from the domain-adaptive pretraining literature (README, "Defaults and why"):
under ~100M domain tokens gains are small, replay below 5% risks forgetting, 0% replay typically costs
5-15 general points, and training compute is about 6 * parameters * tokens FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from dapt_core import layout, leftovers
from dapt_core.config import DaptConfig
from dapt_core.gpus import GPU_PEAK_TFLOPS
from dapt_core.model import load_tokenizer
from dapt_core.readers import parquet_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BYTES_PER_TOKEN_ESTIMATE = 4.0  # English prose with a ~32k-50k BPE vocabulary; used only without a tokenizer.


class ComputeEstimate(BaseModel):
    params: float
    train_tokens: float
    flops: float
    gpu: str
    peak_tflops: float
    mfu: float
    gpu_hours: float
    assumptions: list[str]


class PlanReport(BaseModel):
    counted_on: str = Field(description="'cleaned corpus' or 'raw inputs'.")
    token_counter: str = Field(description="Tokenizer used, or the bytes/4 estimate.")
    domain_tokens: int
    general_tokens: int
    general_fraction: float
    compute: ComputeEstimate | None
    warnings: list[str]


def count_tokens(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256) -> int:
    """Exact count with a fast tokenizer (batched), else the bytes/4 estimate."""
    if tokenizer is None:
        return int(sum(len(t.encode("utf-8")) for t in texts) / BYTES_PER_TOKEN_ESTIMATE)
    total, batch = 0, []
    for t in texts:
        batch.append(t)
        if len(batch) == batch_size:
            total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total


def warnings_for(domain_tokens: int, general_tokens: int, general_fraction: float) -> list[str]:
    """The rules of thumb, as warnings a user can act on."""
    out = []
    if domain_tokens < 500_000:
        out.append(
            f"{domain_tokens:,} domain tokens: below the ~500k tokens practitioners need to see any measurable "
            "change; add domain text."
        )
    elif domain_tokens < 100_000_000:
        out.append(
            f"{domain_tokens:,} domain tokens (< ~100M): expect small domain gains; 100M-1B tokens gives 8-15 points."
        )
    elif domain_tokens > 10_000_000_000:
        out.append(
            f"{domain_tokens:,} domain tokens (> 10B): consider pretraining from scratch instead of "
            "continual pretraining."
        )
    elif domain_tokens > 1_000_000_000:
        out.append(
            "1B-10B domain tokens: strong gains are likely but forgetting needs care (replay; EWC for sensitive uses)."
        )
    if general_fraction == 0:
        out.append(
            "mix.general_fraction is 0: no replay typically costs 5-15 points on general benchmarks; use "
            "0.05 (0.15 for distant domains)."
        )
    elif general_fraction < 0.05:
        out.append(
            f"mix.general_fraction {general_fraction:.1%} is below 5%: forgetting risk; 5% is near the Pareto frontier."
        )
    if general_fraction > 0:
        needed = domain_tokens * general_fraction / (1 - general_fraction)
        if general_tokens == 0:
            out.append(
                "No general corpus: add data.general sources, or the replay must come from self-replay of "
                "the base model."
            )
        elif general_tokens < needed:
            out.append(
                f"General text ({general_tokens:,} tokens) is short of the {needed:,.0f} replay tokens needed: "
                "it will be repeated "
                f"~{needed / general_tokens:.1f} times; add general text if you can."
            )
    return out


def estimate_compute(params: float, domain_tokens: int, cfg: DaptConfig) -> ComputeEstimate:
    plan, fraction = cfg.plan, cfg.mix.general_fraction
    train_tokens = domain_tokens / (1 - fraction) * plan.epochs
    # Full training: 2ND forward + 4ND backward. LoRA skips the weight gradients of the frozen matrices
    # (about a third of the work); the adapters' own FLOPs are negligible at usual ranks.
    flops_per_token_param = 6.0 if plan.method == "full" else 4.0
    flops = flops_per_token_param * params * train_tokens
    try:
        peak = float(plan.gpu)
        gpu = f"{peak:g} TFLOP/s GPU"
    except ValueError:
        if plan.gpu.upper() not in GPU_PEAK_TFLOPS:
            raise ValueError(
                f"plan.gpu: unknown GPU {plan.gpu!r}; use one of {sorted(GPU_PEAK_TFLOPS)} or its bf16 TFLOP/s"
            ) from None
        gpu, peak = plan.gpu.upper(), GPU_PEAK_TFLOPS[plan.gpu.upper()]
    gpu_hours = flops / (peak * 1e12 * plan.mfu) / 3600
    return ComputeEstimate(
        params=params,
        train_tokens=train_tokens,
        flops=flops,
        gpu=gpu,
        peak_tflops=peak,
        mfu=plan.mfu,
        gpu_hours=gpu_hours,
        assumptions=[
            f"FLOPs = {flops_per_token_param:g} * N * D "
            f"({plan.method}{'; frozen weights get no weight gradients' if plan.method == 'lora' else ''})",
            f"N = {params:.3g} parameters",
            f"D = {train_tokens:.3g} tokens = domain tokens / (1 - {fraction:g} general fraction) * "
            f"{plan.epochs:g} epoch(s)",
            f"{gpu}: {peak:g} dense bf16 TFLOP/s peak at {plan.mfu:.0%} MFU",
            "excludes evaluation, checkpointing and restarts",
        ],
    )


def model_params(cfg: DaptConfig) -> float | None:
    """Parameter count from `model.params`, or from the base model's config (built on the meta device, no weights
    read)."""
    if cfg.model.params:
        return cfg.model.params
    if not cfg.model.base:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    config = AutoConfig.from_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return float(sum(p.numel() for p in model.parameters()))


def build_plan(
    cfg: DaptConfig,
    domain_texts: Iterable[str],
    general_texts: Iterable[str],
    counted_on: str,
) -> PlanReport:
    tokenizer = load_tokenizer(cfg.model) if (cfg.model.tokenizer or cfg.model.base) else None
    domain_tokens = count_tokens(domain_texts, tokenizer)
    general_tokens = count_tokens(general_texts, tokenizer)
    params = model_params(cfg)
    fraction = cfg.mix.general_fraction
    warnings = warnings_for(domain_tokens, general_tokens, fraction)
    if params is None:
        warnings.append("No model.base or model.params: the GPU-hours estimate is skipped.")
    return PlanReport(
        counted_on=counted_on,
        token_counter=f"tokenizer of {cfg.model.tokenizer or cfg.model.base}"
        if tokenizer
        else "estimate: UTF-8 bytes / 4",
        domain_tokens=domain_tokens,
        general_tokens=general_tokens,
        general_fraction=fraction,
        compute=estimate_compute(params, domain_tokens, cfg) if params else None,
        warnings=warnings,
    )


class CorpusTexts(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    counted_on: str
    domain: Iterable[str]
    general: Iterable[str]


def corpus_texts(cfg: DaptConfig) -> CorpusTexts:
    """Texts to count: the cleaned corpus of the last `dapt prepare` in the store, else the raw inputs."""
    from dapt_core.manifest import PrepareManifest
    from dapt_core.store import open_store

    store = open_store(cfg.store)
    latest = layout.latest_manifest_key(cfg.project, "prepare")
    if store.exists(latest):
        cm = PrepareManifest.model_validate_json(store.read_key(latest)).clean
        return CorpusTexts(
            counted_on="cleaned corpus of the last `dapt prepare`",
            domain=parquet_texts(store.local_parts(cm.domain)),
            general=parquet_texts(store.local_parts(cm.general)),
        )
    return CorpusTexts(
        counted_on="raw inputs (run `dapt prepare` to count the cleaned corpus)",
        domain=_raw_texts(cfg, "domain", cfg.data.domain),
        general=_raw_texts(cfg, "general", cfg.data.general),
    )


def _raw_texts(cfg: DaptConfig, kind: str, sources: list) -> Iterator[str]:
    """Read raw inputs through the ingest readers (same formats, same quarantine), one file at a time."""
    from dapt_core.discovery import discover_inputs
    from dapt_core.ingest_batches import ingest_files

    for source in sources:
        files, _ = discover_inputs(source, kind)
        for f in files:
            with leftovers.temp_dir("plan") as tmp:
                out = Path(tmp) / "docs.parquet"
                ingest_files([f], cfg.ingest, out)
                yield from parquet_texts([out])
