"""Forgetting evaluation of a loaded model: perplexity and bits per byte on held-out text, cloze probes, and
multiple-choice benchmarks scored per item, as configured by `EvalConfig`.

The held-out splits (`eval/domain.jsonl`, `eval/general.jsonl`, one `{"text": ...}` per line, written by `dapt pack`)
and the local benchmarks become lm-eval local tasks (dapt_core/eval_tasks.py). `evaluate()` runs them through
`lm_eval.simple_evaluate` on an `HFLM` wrapping the *loaded* model object (never loaded by name). `eval.backend:
native` (or "auto" when lm-eval is not installed) computes the same numbers with `dapt_core.metrics` and the built-in
choice scorer (dapt_core/probes.py).

lm-eval's `loglikelihood_rolling` scores every token after a one-token prefix (the tokenizer's BOS, else EOS), as
`dapt_core.metrics` does, so for documents shorter than the model's context the two give the same bits per byte.
Longer documents differ a little: lm-eval's rolling windows carry context across window borders, `metrics` restarts
each window from the prefix (slightly higher bpb). Benchmarks run with `log_samples`, so every item's right/wrong is
kept (`EvalResult.samples`) for the gate's paired test (dapt_core/forgetting.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from dapt_core.benchmarks import subsample_indices
from dapt_core.config import BenchmarkConfig, EvalConfig
from dapt_core.eval_tasks import PPL_METRICS, read_texts, write_benchmark_tasks, write_tasks
from dapt_core.probes import score_choices, score_probes

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROBE_METRICS = ("acc", "acc_norm")
_SEED = 0  # probes' distractors and lm-eval's seeds: fixed, so every checkpoint sees the same items

# ----------------------------------------------------------------------------------------------------------- results


class BenchmarkSamples(BaseModel):
    """Per-item results of one benchmark: item ids (positions in the benchmark file, or lm-eval doc ids) and 1/0 for
    right/wrong under acc and acc_norm, in the same order. What the paired test compares."""

    ids: list[int]
    acc: list[int]
    acc_norm: list[int]

    def correct(self, metric: str) -> dict[int, int]:
        return dict(zip(self.ids, getattr(self, metric)))


class EvalResult(BaseModel):
    """Flat metrics: `<split>/bits_per_byte`, `<split>/word_perplexity`, `<split>/byte_perplexity`,
    `<split>/probe_acc`, `<split>/probe_acc_norm`, `<split>/probe_n`, `bench/<name>/acc`, `bench/<name>/acc_norm`,
    `bench/<name>/n`, and `<task>/<metric>` for extra tasks; `samples`: per-item benchmark results (JSON data, cached
    with the base evaluation so every checkpoint is tested against the reference on the same items)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN metric (nothing to score) survives the JSON cache

    metrics: dict[str, float]
    backend: str = "lm-eval"
    notes: list[str] = Field(default_factory=list)
    samples: dict[str, BenchmarkSamples] = Field(default_factory=dict)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_files: dict[str, Path],
    workdir: Path,
    cfg: EvalConfig,
) -> EvalResult:
    """Evaluate a loaded causal LM (under `no_grad`) on the perplexity tasks and cloze probes built from `eval_files`
    ({split: jsonl}, e.g. {"domain": .../eval/domain.jsonl, "general": .../eval/general.jsonl}) and on
    `cfg.benchmarks` (each with its own seeded subsample, scored per item: `samples`). `cfg.extra_tasks` are lm-eval
    task names (lm-eval backend only; they must be available offline); `cfg.limit` caps documents per
    perplexity/probe/extra task."""
    import torch

    workdir = Path(workdir)
    model_max = getattr(model.config, "max_position_embeddings", None)
    max_length = min(cfg.max_length, model_max) if model_max else cfg.max_length  # never past the model's positions
    task_dir = workdir / "lm_eval_tasks"
    names = write_tasks(
        eval_files,
        task_dir,
        probes=cfg.max_probes > 0,
        max_probes=cfg.max_probes,
        n_choices=cfg.probe_choices,
        seed=_SEED,
    )
    bench_tasks = write_benchmark_tasks(cfg.benchmarks, task_dir)
    backend, notes = _resolve_backend(cfg.backend)
    with torch.no_grad():
        if backend == "lm-eval":
            metrics, samples = _run_lm_eval(model, tokenizer, names, task_dir, cfg, max_length, bench_tasks)
        else:
            named = [b.name for b in cfg.benchmarks if b.task is not None]
            if cfg.extra_tasks or named:
                raise ValueError(
                    f"eval.extra_tasks and lm-eval task benchmarks ({named}) need eval.backend lm-eval (or auto with "
                    "lm-eval installed)"
                )
            metrics = _run_native(model, tokenizer, task_dir, names, cfg, max_length)
            samples = {
                name: _native_benchmark(model, tokenizer, task_dir / f"bench_{name}.jsonl") for name in bench_tasks
            }
    for name, smp in samples.items():
        n = len(smp.ids)
        metrics[f"bench/{name}/acc"] = sum(smp.acc) / n if n else float("nan")
        metrics[f"bench/{name}/acc_norm"] = sum(smp.acc_norm) / n if n else float("nan")
        metrics[f"bench/{name}/n"] = float(n)
    return EvalResult(metrics=metrics, backend=backend, notes=notes, samples=samples)


def _resolve_backend(backend: str) -> tuple[str, list[str]]:
    """("lm-eval" | "native", notes): "auto" is lm-eval when importable."""
    if backend != "auto":
        return backend, []
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        return "native", [f"lm-eval not importable ({e}); used dapt_core.metrics and the built-in probe scorer"]
    return "lm-eval", []


def _run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: dict[str, dict[str, str]],
    task_dir: Path,
    cfg: EvalConfig,
    max_length: int,
    bench_tasks: dict[str, str],
) -> tuple[dict[str, float], dict[str, BenchmarkSamples]]:
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    lm = bounded_hflm(model, tokenizer, cfg.batch_size, max_length)
    named = {b.name: b for b in cfg.benchmarks if b.task is not None}
    tm = TaskManager(include_path=str(task_dir), include_defaults=bool(cfg.extra_tasks) or bool(named))
    tasks = [n for d in names.values() for n in d.values()] + list(cfg.extra_tasks)
    seeds = dict(random_seed=_SEED, numpy_random_seed=_SEED, torch_random_seed=_SEED, fewshot_random_seed=_SEED)
    was_training = model.training
    # lm-eval runs `git describe` in the working directory for its report's git_hash; outside a checkout that prints
    # "fatal: not a git repository" on stderr at every evaluation. dapt's results record their own code version.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, limit=cfg.limit, bootstrap_iters=0, log_samples=False, **seeds
        )
        # A second run for the benchmarks: they carry their own subsamples (`limit` is per run in lm-eval), and their
        # per-item results (log_samples) feed the paired test.
        bench_out = (
            lm_eval.simple_evaluate(
                model=lm,
                tasks=list(bench_tasks.values()),
                task_manager=tm,
                samples=_named_subsamples(named, tm) or None,
                bootstrap_iters=0,
                log_samples=True,
                **seeds,
            )
            if bench_tasks
            else None
        )
    finally:
        model.train(was_training)
    metrics = _lm_eval_metrics(out, names, cfg.extra_tasks)
    samples = {name: _lm_eval_samples(bench_out, name, task, name in named) for name, task in bench_tasks.items()}
    return metrics, samples


def bounded_hflm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int) -> HFLM:
    """lm-eval's HFLM on the loaded model, with log-likelihood batches sized by memory as well as by count.

    HFLM log-softmaxes the logits of a whole batch at once: [rows, length, vocab] in fp32 beside the logits themselves,
    1.6 GB each for 8 rows of 1024 tokens and a 49k vocabulary. Here each call gets at most `batch_size` rows and at
    most as many as `dapt_core.metrics.rows_within_budget` allows for its longest request (requests are scored longest
    first, as lm-eval does), so short multiple-choice requests still batch and long perplexity windows go one or two at
    a time. The scores are lm-eval's own. It draws no progress bars (HFLM asks tqdm for them explicitly, past
    TQDM_DISABLE): a checkpoint's evaluation is one step of dapt's own progress."""
    from lm_eval.models.huggingface import HFLM

    from dapt_core.metrics import rows_within_budget

    class BoundedHFLM(HFLM):
        def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(
            self,
            requests: list[tuple[tuple[str, str], list[int], list[int]]],
            disable_tqdm: bool = False,
            override_bs: int | None = None,
        ):
            order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
            results: list = [None] * len(requests)
            start = 0
            try:
                while start < len(order):
                    _, context, continuation = requests[order[start]]
                    rows = min(
                        batch_size, rows_within_budget(model, min(len(context) + len(continuation), self.max_length))
                    )
                    group = order[start : start + rows]
                    self.batch_size_per_gpu = len(group)  # what HFLM batches by
                    scored = super()._loglikelihood_tokens(
                        [requests[i] for i in group], disable_tqdm=True, override_bs=len(group)
                    )
                    for i, score in zip(group, scored):
                        results[i] = score
                    start += len(group)
            finally:
                self.batch_size_per_gpu = batch_size
            return results

    return BoundedHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=str(next(model.parameters()).device),
        add_bos_token=False,  # text tokens as dapt_core.metrics sees them; the rolling prefix token supplies BOS/EOS
    )


def _lm_eval_metrics(out: dict, names: dict[str, dict[str, str]], extra_tasks: Sequence[str]) -> dict[str, float]:
    """Flat `<split>/<metric>` and `<task>/<metric>` from lm-eval's aggregated results."""
    results = out["results"]
    metrics: dict[str, float] = {}
    for split, d in names.items():
        for m in PPL_METRICS:
            metrics[f"{split}/{m}"] = float(results[d["ppl"]][f"{m},none"])
        if "probe" in d:
            for m in PROBE_METRICS:
                metrics[f"{split}/probe_{m}"] = float(results[d["probe"]][f"{m},none"])
            metrics[f"{split}/probe_n"] = float(
                out.get("n-samples", {}).get(d["probe"], {}).get("effective", float("nan"))
            )
    for t in extra_tasks:
        for k, v in results.get(t, {}).items():
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias":
                metrics[f"{t}/{k.split(',')[0]}"] = float(v)
    return metrics


def _lm_eval_samples(bench_out: dict, name: str, task: str, is_lm_eval_task: bool) -> BenchmarkSamples:
    """Per-item results of one benchmark, by item id (local files) or lm-eval doc id (`task:` benchmarks)."""
    logged = sorted(bench_out["samples"][task], key=lambda x: x["doc_id"])
    if logged and not {"acc", "acc_norm"} <= set(logged[0]):
        raise ValueError(
            f"benchmark {name}: lm-eval task {task} reports no per-item acc / acc_norm (not multiple choice?)"
        )
    return BenchmarkSamples(
        ids=[int(x["doc_id"]) if is_lm_eval_task else int(x["doc"]["id"]) for x in logged],
        acc=[int(x["acc"]) for x in logged],
        acc_norm=[int(x["acc_norm"]) for x in logged],
    )


def _named_subsamples(named: dict[str, BenchmarkConfig], tm: TaskManager) -> dict[str, list[int]]:
    """Seeded doc indices of each lm-eval task benchmark with a `limit` (the same rule as local files)."""
    from lm_eval.tasks import get_task_dict

    out = {}
    for b in named.values():
        if b.limit is None:
            continue
        out[b.task] = subsample_indices(len(get_task_dict([b.task], tm)[b.task].eval_docs), b.limit, b.seed)
    return out


def _native_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: Path) -> BenchmarkSamples:
    rows = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    acc, acc_norm = score_choices(model, tokenizer, rows)
    return BenchmarkSamples(ids=[r["id"] for r in rows], acc=acc, acc_norm=acc_norm)


def _run_native(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task_dir: Path,
    names: dict[str, dict[str, str]],
    cfg: EvalConfig,
    max_length: int,
) -> dict[str, float]:
    from dapt_core.metrics import nll_stats

    metrics: dict[str, float] = {}
    for split, d in names.items():
        texts = read_texts(task_dir / f"{split}.ppl.jsonl")[: cfg.limit]
        st = nll_stats(model, tokenizer, texts, max_length=max_length, batch_size=cfg.batch_size)
        words = sum(len(t.split()) for t in texts)
        metrics[f"{split}/bits_per_byte"] = st.bits_per_byte
        metrics[f"{split}/byte_perplexity"] = math.exp(st.nll_nats / st.bytes) if st.bytes else float("nan")
        metrics[f"{split}/word_perplexity"] = math.exp(st.nll_nats / words) if words else float("nan")
        if "probe" in d:
            lines = (task_dir / f"{split}.probe.jsonl").read_text(encoding="utf-8").splitlines()
            items = [json.loads(x) for x in lines][: cfg.limit]
            acc, acc_norm = score_probes(model, tokenizer, items)
            metrics[f"{split}/probe_acc"], metrics[f"{split}/probe_acc_norm"] = acc, acc_norm
            metrics[f"{split}/probe_n"] = float(len(items))
    return metrics
