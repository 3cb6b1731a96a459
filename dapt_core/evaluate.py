"""Forgetting evaluation: local lm-eval tasks built from held-out text, an accept/reject policy, rollback, report.

Held-out text (`eval/domain.jsonl`, `eval/general.jsonl`, one `{"text": ...}` per line, written by `dapt pack`) is
turned into lm-eval *local* tasks, written as YAML into a work directory and loaded with
`TaskManager(include_path=...)`; nothing is fetched from a hub:

* `dapt_ppl_<split>`: `loglikelihood_rolling` over each document (word_perplexity, byte_perplexity, bits_per_byte).
  lm-eval scores every token after a one-token prefix (the tokenizer's BOS, else EOS), as `dapt_core.metrics` does,
  so for documents shorter than the model's context the two give the same bits per byte. Longer documents differ a
  little: lm-eval's rolling windows carry context across window borders, `metrics` restarts each window from the
  prefix (slightly higher bpb).
* `dapt_probe_<split>`: cloze knowledge probes, `multiple_choice` with `acc` / `acc_norm`: for a sentence of a
  held-out document, the context is the text up to its last word and the choices are the true last word and
  distractor words of similar length drawn from the same held-out corpus.

`evaluate()` runs them through `lm_eval.simple_evaluate` on an `HFLM` wrapping the *loaded* model object (the model is
never loaded by name). `backend="native"` (or "auto" when lm-eval is not installed) computes the same numbers with
`dapt_core.metrics` and a built-in probe scorer.

* `dapt_bench_<name>`: each local benchmark (dapt_core/benchmarks.py) as `multiple_choice` on its seeded subsample,
  run with `log_samples` so every item's right/wrong is kept (`EvalResult.samples`) for the paired test.

`ForgettingPolicy.judge` accepts a checkpoint unless general perplexity rose more than 15% over the reference (the
original base), a general benchmark lost more than 3 points with a drop significant at alpha (exact McNemar on the
same items), or a general probe lost more than 3 points (DAPT-FACTS); `choose_best` picks the accepted checkpoint with the best domain metric;
`rollback_plan` gives the next attempt's LR (halved) and replay fraction (doubled, capped).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dapt_core.benchmarks import BenchmarkItem, compare_paired, load_benchmark, subsample, subsample_indices
from dapt_core.config import BenchmarkConfig

log = logging.getLogger("dapt.evaluate")

PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PROBE_METRICS = ("acc", "acc_norm")
_TASK_PREFIX = "dapt"


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


# ------------------------------------------------------------------------------------------------------------ probes

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z-]*[A-Za-z]$")


def _clean_word(w: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", w)


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                t = json.loads(line).get(text_field)
                if isinstance(t, str) and t.strip():
                    texts.append(t)
    return texts


def build_probes(
    texts: Sequence[str], max_probes: int = 200, n_choices: int = 4, seed: int = 0, context_words: int = 48, min_words: int = 5
) -> list[dict[str, Any]]:
    """Cloze probes `{"context", "choices", "label"}`: context = the text before a sentence's last word (at most
    `context_words` words, crossing sentence borders within the document), choices = that word plus `n_choices - 1`
    distractors of similar length drawn from the words of `texts`. Deterministic in `seed`."""
    if n_choices < 2:
        raise ValueError("n_choices must be >= 2")
    vocab: dict[str, str] = {}
    for t in texts:
        for w in t.split():
            c = _clean_word(w)
            if len(c) >= 3 and _WORD.match(c):
                vocab.setdefault(c.lower(), c)
    words = sorted(vocab.values())
    candidates: list[tuple[str, str]] = []
    for text in texts:
        pos = 0
        for sentence in _SENTENCE_END.split(text):
            start = text.find(sentence, pos)
            pos = start + len(sentence)
            toks = sentence.split()
            if len(toks) < min_words:
                continue
            target = _clean_word(toks[-1])
            if len(target) < 3 or not _WORD.match(target):
                continue
            cut = start + sentence.rfind(toks[-1])
            context = " ".join(text[:cut].split()[-context_words:])
            candidates.append((context, target))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    probes = []
    for context, target in candidates:
        if len(probes) >= max_probes:
            break
        pool = [w for w in words if w.lower() != target.lower() and abs(len(w) - len(target)) <= 2]
        if len(pool) < n_choices - 1:
            pool = [w for w in words if w.lower() != target.lower()]
        if len(pool) < n_choices - 1:
            continue
        choices = rng.sample(pool, n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, target)
        probes.append({"context": context, "choices": choices, "label": label})
    return probes


# ------------------------------------------------------------------------------------------------------------- tasks


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def write_tasks(
    eval_files: dict[str, Path], task_dir: Path, probes: bool = True, max_probes: int = 200, n_choices: int = 4, seed: int = 0
) -> dict[str, dict[str, str]]:
    """Write lm-eval task YAMLs (and probe JSONL) for each split into `task_dir`.

    Returns {split: {"ppl": task_name, "probe": task_name}} ("probe" absent when no probe could be built).
    The data files are given as `data_files: {test: <abs path>}` so the split is `test` (a bare string would name it
    `train`)."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    cache = (task_dir / "hf-datasets-cache").resolve()
    out: dict[str, dict[str, str]] = {}
    for split, path in eval_files.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name must be alphanumeric/underscore: {split!r}")
        path = Path(path).resolve()
        texts = read_texts(path)
        if not texts:
            raise ValueError(f"{path}: no texts")
        # lm-eval counts bytes/words of doc_to_target; write a normalised copy holding only the text field
        data = task_dir / f"{split}.ppl.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        names = {"ppl": f"{_TASK_PREFIX}_ppl_{split}"}
        (task_dir / f"{names['ppl']}.yaml").write_text(
            f"task: {names['ppl']}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {_yaml_str(str(data))}\n  cache_dir: {_yaml_str(str(cache))}\n"
            "output_type: loglikelihood_rolling\n"
            "test_split: test\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            "metric_list:\n"
            + "".join(f"  - metric: {m}\n    aggregation: {'bits_per_byte' if m == 'bits_per_byte' else 'weighted_perplexity'}\n"
                      "    higher_is_better: false\n" for m in PPL_METRICS) +
            "metadata:\n  version: 1.0\n",
            encoding="utf-8",
        )
        if probes:
            items = build_probes(texts, max_probes=max_probes, n_choices=n_choices, seed=seed)
            if items:
                pdata = task_dir / f"{split}.probe.jsonl"
                pdata.write_text("".join(json.dumps(p) + "\n" for p in items), encoding="utf-8")
                names["probe"] = f"{_TASK_PREFIX}_probe_{split}"
                (task_dir / f"{names['probe']}.yaml").write_text(_mc_task_yaml(names["probe"], pdata, cache), encoding="utf-8")
            else:
                log.warning("no cloze probe could be built from %s", path)
        out[split] = names
    return out


def benchmark_prompt(item: BenchmarkItem) -> str:
    """The context every choice is scored after (as " " + choice): lm-eval's zero-shot "Question: … Answer:" style, or
    the question text itself for sentence completion."""
    passage = f"{item.passage.strip()}\n" if item.passage else ""
    if item.prompt == "completion":
        return f"{passage}{item.question.strip()}"
    return f"{passage}Question: {item.question.strip()}\nAnswer:"


def _mc_task_yaml(name: str, data: Path, cache: Path) -> str:
    """A local lm-eval multiple_choice task over JSONL rows {"context", "choices", "label"}: acc and acc_norm."""
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {_yaml_str(str(data))}\n  cache_dir: {_yaml_str(str(cache))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def write_benchmark_tasks(benchmarks: Sequence[BenchmarkConfig], task_dir: Path) -> dict[str, str]:
    """Write each local benchmark's seeded subsample as JSONL (rows {"id", "context", "choices", "label"}) and an lm-eval
    multiple_choice task; returns {benchmark name: lm-eval task name} (lm-eval tasks of `task:` benchmarks as named)."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    cache = (task_dir / "hf-datasets-cache").resolve()
    names: dict[str, str] = {}
    for b in benchmarks:
        if b.task is not None:
            names[b.name] = b.task
            continue
        items = subsample(load_benchmark(b), b.limit, b.seed)
        data = (task_dir / f"bench_{b.name}.jsonl").resolve()
        data.write_text(
            "".join(json.dumps({"id": it.id, "context": benchmark_prompt(it), "choices": it.choices, "label": it.label}) + "\n" for it in items),
            encoding="utf-8",
        )
        names[b.name] = f"{_TASK_PREFIX}_bench_{b.name}"
        (task_dir / f"{names[b.name]}.yaml").write_text(_mc_task_yaml(names[b.name], data, cache), encoding="utf-8")
    return names


# ---------------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model,
    tokenizer,
    eval_files: dict[str, Path],
    workdir: Path,
    extra_tasks: Sequence[str] = (),
    limit: int | float | None = None,
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    probes: bool = True,
    max_probes: int = 200,
    n_choices: int = 4,
    seed: int = 0,
    backend: str = "auto",
    benchmarks: Sequence[BenchmarkConfig] = (),
) -> EvalResult:
    """Evaluate a loaded causal LM on local perplexity tasks and cloze probes built from `eval_files`
    ({split: jsonl}, e.g. {"domain": .../eval/domain.jsonl, "general": .../eval/general.jsonl}).

    backend: "lm-eval" (lm_eval.simple_evaluate on HFLM(pretrained=model)), "native" (dapt_core.metrics + built-in
    probe scorer) or "auto" (lm-eval when importable, else native). `extra_tasks` are lm-eval task names (lm-eval
    backend only; they must be available offline). `limit` caps documents per perplexity/probe/extra task.
    `benchmarks` are multiple-choice sets (each with its own seeded subsample), scored per item (`samples`)."""
    workdir = Path(workdir)
    model_max = getattr(model.config, "max_position_embeddings", None)
    if max_length is not None and model_max:
        max_length = min(max_length, model_max)  # never a window longer than the model's positions
    task_dir = workdir / "lm_eval_tasks"
    names = write_tasks(eval_files, task_dir, probes=probes, max_probes=max_probes, n_choices=n_choices, seed=seed)
    bench_tasks = write_benchmark_tasks(benchmarks, task_dir)
    notes: list[str] = []
    if backend == "auto":
        try:
            import lm_eval  # noqa: F401

            backend = "lm-eval"
        except ImportError as e:
            backend = "native"
            notes.append(f"lm-eval not importable ({e}); used dapt_core.metrics and the built-in probe scorer")
    if backend == "lm-eval":
        metrics, samples = _run_lm_eval(
            model, tokenizer, names, task_dir, extra_tasks, limit, batch_size, max_length, seed, bench_tasks, benchmarks
        )
    elif backend == "native":
        named = [b.name for b in benchmarks if b.task is not None]
        if extra_tasks or named:
            raise ValueError(f"extra_tasks and lm-eval task benchmarks ({named}) need the lm-eval backend")
        metrics = _run_native(model, tokenizer, task_dir, names, limit, batch_size, max_length)
        samples = {name: _native_benchmark(model, tokenizer, task_dir / f"bench_{name}.jsonl") for name in bench_tasks}
    else:
        raise ValueError(f"unknown backend {backend!r}")
    for name, smp in samples.items():
        n = len(smp.ids)
        metrics[f"bench/{name}/acc"] = sum(smp.acc) / n if n else float("nan")
        metrics[f"bench/{name}/acc_norm"] = sum(smp.acc_norm) / n if n else float("nan")
        metrics[f"bench/{name}/n"] = float(n)
    return EvalResult(metrics=metrics, backend=backend, notes=notes, samples=samples)


def _run_lm_eval(
    model, tokenizer, names, task_dir, extra_tasks, limit, batch_size, max_length, seed, bench_tasks, benchmarks
) -> tuple[dict[str, float], dict[str, BenchmarkSamples]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device,
        add_bos_token=False,  # text tokens as dapt_core.metrics sees them; the rolling prefix token supplies BOS/EOS
    )
    named = {b.name: b for b in benchmarks if b.task is not None}
    tm = TaskManager(include_path=str(task_dir), include_defaults=bool(extra_tasks) or bool(named))
    tasks = [n for d in names.values() for n in d.values()] + list(extra_tasks)
    seeds = dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    was_training = model.training
    import lm_eval.evaluator

    # lm-eval runs `git describe` in the working directory for its report's git_hash; outside a checkout that prints
    # "fatal: not a git repository" on stderr at every evaluation. dapt's results record their own code version.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, limit=limit, bootstrap_iters=0, log_samples=False, **seeds
        )
        # A second run for the benchmarks: they carry their own subsamples (`limit` is per run in lm-eval), and their
        # per-item results (log_samples) feed the paired test.
        bench_out = lm_eval.simple_evaluate(
            model=lm, tasks=list(bench_tasks.values()), task_manager=tm, samples=_named_subsamples(named, tm) or None,
            bootstrap_iters=0, log_samples=True, **seeds,
        ) if bench_tasks else None
    finally:
        model.train(was_training)
    results = out["results"]
    metrics: dict[str, float] = {}
    for split, d in names.items():
        for m in PPL_METRICS:
            metrics[f"{split}/{m}"] = float(results[d["ppl"]][f"{m},none"])
        if "probe" in d:
            for m in PROBE_METRICS:
                metrics[f"{split}/probe_{m}"] = float(results[d["probe"]][f"{m},none"])
            metrics[f"{split}/probe_n"] = float(out.get("n-samples", {}).get(d["probe"], {}).get("effective", float("nan")))
    for t in extra_tasks:
        for k, v in results.get(t, {}).items():
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias":
                metrics[f"{t}/{k.split(',')[0]}"] = float(v)
    samples: dict[str, BenchmarkSamples] = {}
    for name, task in bench_tasks.items():
        logged = sorted(bench_out["samples"][task], key=lambda x: x["doc_id"])
        if logged and not {"acc", "acc_norm"} <= set(logged[0]):
            raise ValueError(f"benchmark {name}: lm-eval task {task} reports no per-item acc / acc_norm (not multiple choice?)")
        samples[name] = BenchmarkSamples(
            ids=[int(x["doc"]["id"]) if name not in named else int(x["doc_id"]) for x in logged],
            acc=[int(x["acc"]) for x in logged], acc_norm=[int(x["acc_norm"]) for x in logged],
        )
    return metrics, samples


def _named_subsamples(named: dict[str, BenchmarkConfig], tm) -> dict[str, list[int]]:
    """Seeded doc indices of each lm-eval task benchmark with a `limit` (the same rule as local files)."""
    from lm_eval.tasks import get_task_dict

    out = {}
    for b in named.values():
        if b.limit is None:
            continue
        out[b.task] = subsample_indices(len(get_task_dict([b.task], tm)[b.task].eval_docs), b.limit, b.seed)
    return out


def _native_benchmark(model, tokenizer, data: Path) -> BenchmarkSamples:
    rows = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    acc, acc_norm = _score_choices(model, tokenizer, rows)
    return BenchmarkSamples(ids=[r["id"] for r in rows], acc=acc, acc_norm=acc_norm)


def _apply_limit(items: list, limit: int | float | None) -> list:
    if limit is None:
        return items
    n = int(math.ceil(len(items) * limit)) if isinstance(limit, float) and limit < 1 else int(limit)
    return items[:n]


def _run_native(model, tokenizer, task_dir, names, limit, batch_size, max_length) -> dict[str, float]:
    from dapt_core.metrics import nll_stats

    task_dir = Path(task_dir)
    metrics: dict[str, float] = {}
    ml = max_length or getattr(model.config, "max_position_embeddings", 1024) or 1024
    for split, d in names.items():
        texts = _apply_limit(read_texts(task_dir / f"{split}.ppl.jsonl"), limit)
        st = nll_stats(model, tokenizer, texts, max_length=ml, batch_size=batch_size)
        words = sum(len(t.split()) for t in texts)
        metrics[f"{split}/bits_per_byte"] = st.bits_per_byte
        metrics[f"{split}/byte_perplexity"] = math.exp(st.nll_nats / st.bytes) if st.bytes else float("nan")
        metrics[f"{split}/word_perplexity"] = math.exp(st.nll_nats / words) if words else float("nan")
        if "probe" in d:
            items = _apply_limit([json.loads(x) for x in (task_dir / f"{split}.probe.jsonl").read_text().splitlines()], limit)
            acc, acc_norm = score_probes(model, tokenizer, items)
            metrics[f"{split}/probe_acc"], metrics[f"{split}/probe_acc_norm"] = acc, acc_norm
            metrics[f"{split}/probe_n"] = float(len(items))
    return metrics


def score_probes(model, tokenizer, probes: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """(acc, acc_norm) of cloze probes (see `_score_choices`)."""
    acc, acc_norm = _score_choices(model, tokenizer, probes)
    return (sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)) if acc else (float("nan"), float("nan"))


def _score_choices(model, tokenizer, items: Iterable[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Per item 1/0 (acc, acc_norm) of {"context", "choices", "label"}: summed log-likelihood of " " + choice after
    the context (acc), and the same divided by the choice's UTF-8 bytes (acc_norm), as lm-eval's multiple_choice."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: list[int] = []
    hits_norm: list[int] = []
    try:
        with torch.no_grad():
            for p in items:
                ctx = tokenizer(p["context"], add_special_tokens=False)["input_ids"]
                scores = []
                for c in p["choices"]:
                    full = tokenizer(p["context"] + " " + c, add_special_tokens=False)["input_ids"]
                    # split where the context's tokens stop matching (byte-level BPE may merge across the border)
                    k = 0
                    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
                        k += 1
                    k = max(k, 1)
                    ids = torch.tensor([full], device=device)
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                    tgt = ids[0, 1:]
                    ll = logp[torch.arange(len(tgt)), tgt][k - 1 :].sum().item()
                    scores.append((ll, ll / len((" " + c).encode("utf-8"))))
                label = int(p["label"])
                hits.append(int(max(range(len(scores)), key=lambda i: scores[i][0]) == label))
                hits_norm.append(int(max(range(len(scores)), key=lambda i: scores[i][1]) == label))
    finally:
        model.train(was_training)
    return hits, hits_norm


# ------------------------------------------------------------------------------------------------------------ policy


@dataclass
class Decision:
    accepted: bool
    reasons: list[str]
    numbers: dict[str, float]  # incl. per general benchmark: "p_value bench/<name>", "drop_points bench/<name>", ...

    @property
    def p_values(self) -> dict[str, float]:
        """{benchmark name: exact McNemar p-value of its difference from the reference}."""
        return {k.split("/", 1)[1]: v for k, v in self.numbers.items() if k.startswith("p_value bench/")}


@dataclass
class ForgettingPolicy:
    """Reject a checkpoint when general perplexity rose more than `max_general_ppl_increase` (relative) over the
    reference (the original base),
    or a general benchmark lost more than `max_general_benchmark_drop` points (accuracy x 100, on the same items as
    the reference) with a drop significant at `alpha` (exact McNemar test on the discordant items), or any general
    probe lost more than `max_general_probe_drop` points.

    Perplexity is word perplexity by default: tokenizer-independent (base and extended-vocabulary models compare) and
    on the scale of the token perplexity the 15% rule of thumb is stated for (byte perplexity moves far less)."""

    max_general_ppl_increase: float = 0.15
    max_general_probe_drop: float = 3.0
    primary_metric: str = "domain/bits_per_byte"
    primary_higher_is_better: bool = False
    general_ppl_metric: str = "general/word_perplexity"
    general_probe_metrics: tuple[str, ...] = ("general/probe_acc",)
    general_benchmarks: tuple[str, ...] = ()
    max_general_benchmark_drop: float = 3.0
    alpha: float = 0.05
    benchmark_metric: str = "acc_norm"

    @classmethod
    def from_config(cls, cfg) -> ForgettingPolicy:
        """From an EvalConfig or a DaptConfig (its `eval` section). Probes are the general signal only when no
        general benchmark is configured, unless `general_probe_metrics` names them."""
        e = getattr(cfg, "eval", cfg)
        benchmarks = tuple(b.name for b in e.benchmarks if b.kind == "general")
        probes = e.general_probe_metrics if e.general_probe_metrics is not None else ([] if benchmarks else ["general/probe_acc"])
        return cls(
            max_general_ppl_increase=e.max_general_ppl_increase, max_general_probe_drop=e.max_general_probe_drop,
            primary_metric=e.primary_metric, primary_higher_is_better=e.primary_higher_is_better,
            general_ppl_metric=e.general_ppl_metric, general_probe_metrics=tuple(probes), general_benchmarks=benchmarks,
            max_general_benchmark_drop=e.max_general_benchmark_drop, alpha=e.alpha, benchmark_metric=e.benchmark_metric,
        )

    def judge(self, base: EvalResult, ckpt: EvalResult, step: int | None = None) -> Decision:
        reasons: list[str] = []
        numbers: dict[str, float] = {}
        b, c = base.metrics, ckpt.metrics
        pm = self.primary_metric
        if pm in b and pm in c:
            numbers.update({f"base {pm}": b[pm], pm: c[pm], f"delta {pm}": c[pm] - b[pm]})
        gm = self.general_ppl_metric
        if gm not in b or gm not in c:
            reasons.append(f"{gm} missing: cannot check general perplexity")
        else:
            inc = c[gm] / b[gm] - 1.0
            numbers.update({f"base {gm}": b[gm], gm: c[gm], "general_ppl_increase": inc})
            if not math.isfinite(inc) or inc > self.max_general_ppl_increase:
                reasons.append(
                    f"{gm} up {inc:+.1%} over the reference ({b[gm]:.4g} -> {c[gm]:.4g}), limit +{self.max_general_ppl_increase:.0%}:"
                    " roll back, lower the LR or raise the replay fraction"
                )
        for m in self.general_probe_metrics:
            if m not in b or m not in c:
                reasons.append(f"{m} missing: cannot check the general probe")
                continue
            drop = (b[m] - c[m]) * 100.0
            numbers.update({f"base {m}": b[m], m: c[m], f"drop_points {m}": drop})
            # One probe flipping is noise, not forgetting: with n probes it moves accuracy 100/n points, which is over
            # the 3-point limit below ~34 probes. A drop must exceed the limit AND one probe's worth.
            n = c.get(m.rsplit("/", 1)[0] + "/probe_n", float("nan"))
            one_probe = 100.0 / n if n and math.isfinite(n) else 0.0
            if not math.isfinite(drop) or drop > max(self.max_general_probe_drop, one_probe + 1e-9):
                reasons.append(
                    f"{m} down {drop:.1f} points ({b[m]:.3f} -> {c[m]:.3f}), limit {self.max_general_probe_drop:.1f}: diagnose before shipping"
                )
        for name in self.general_benchmarks:
            reasons += self._judge_benchmark(name, base, ckpt, numbers)
        d = Decision(accepted=not reasons, reasons=reasons, numbers=numbers)
        log.info(
            "checkpoint%s %s: %s %s", "" if step is None else f" step {step}", "ACCEPTED" if d.accepted else "REJECTED",
            "; ".join(reasons) or "within limits", json.dumps(numbers, sort_keys=True),
        )
        return d

    def _judge_benchmark(self, name: str, base: EvalResult, ckpt: EvalResult, numbers: dict[str, float]) -> list[str]:
        """Reasons (none or one) to reject on benchmark `name`; its numbers go into `numbers`."""
        if name not in base.samples or name not in ckpt.samples:
            which = "reference" if name not in base.samples else "checkpoint"
            return [f"benchmark {name}: no per-item results for the {which}: cannot test it against the reference"]
        m = self.benchmark_metric
        try:
            cmp = compare_paired(base.samples[name].correct(m), ckpt.samples[name].correct(m))
        except ValueError as e:
            return [f"benchmark {name}: {e}"]
        key = f"bench/{name}"
        numbers.update({
            f"base {key}/{m}": cmp.reference_acc, f"{key}/{m}": cmp.candidate_acc, f"drop_points {key}": cmp.drop_points,
            f"p_value {key}": cmp.p_value, f"n {key}": float(cmp.n),
            f"discordant {key}": float(cmp.only_reference + cmp.only_candidate),
        })
        if cmp.drop_points > self.max_general_benchmark_drop and cmp.p_value < self.alpha:
            return [
                f"benchmark {name} {m} down {cmp.drop_points:.1f} points ({cmp.reference_acc:.3f} -> {cmp.candidate_acc:.3f} on "
                f"{cmp.n} items, {cmp.only_reference} lost / {cmp.only_candidate} gained, exact McNemar p={cmp.p_value:.3g} < "
                f"{self.alpha:g}), limit {self.max_general_benchmark_drop:g}: roll back, lower the LR or raise the replay fraction"
            ]
        return []

    def choose_best(self, accepted: Sequence[tuple[int, EvalResult]]) -> int:
        """Step of the accepted checkpoint with the best primary (domain) metric; ties go to the earlier step."""
        if not accepted:
            raise ValueError("no accepted checkpoint to choose from")
        sign = -1.0 if self.primary_higher_is_better else 1.0
        step, _ = min(accepted, key=lambda sr: (sign * sr[1].metrics[self.primary_metric], sr[0]))
        log.info("best checkpoint: step %s (%s=%.6g)", step, self.primary_metric, dict(accepted)[step].metrics[self.primary_metric])
        return step


def choose_best(accepted: Sequence[tuple[int, EvalResult]], policy: ForgettingPolicy | None = None) -> int:
    return (policy or ForgettingPolicy()).choose_best(accepted)


@dataclass
class RollbackPlan:
    attempt: int  # index of the attempt this plan is for (0 = the original run)
    lr: float
    general_fraction: float


def rollback_plan(attempt: int, cfg) -> RollbackPlan | None:
    """Settings for the attempt after `attempt` (0 = the original run) failed the policy, or None when
    cfg.eval.max_attempts attempts are used up. LR halves per retry (floored at 1e-6, TrainConfig's minimum); the
    replay fraction doubles per retry, capped at cfg.eval.max_general_fraction (starting from
    cfg.eval.min_general_fraction when it was 0: never train without replay)."""
    e = cfg.eval
    nxt = attempt + 1
    if attempt < 0 or nxt >= e.max_attempts:
        return None
    lr = max(cfg.train.lr / 2**nxt, 1e-6)
    f0 = cfg.mix.general_fraction or e.min_general_fraction
    frac = min(f0 * 2**nxt, e.max_general_fraction)
    plan = RollbackPlan(attempt=nxt, lr=lr, general_fraction=frac)
    log.info("rollback: attempt %d with lr=%.3g general_fraction=%.3g", nxt, lr, frac)
    return plan


# ------------------------------------------------------------------------------------------------------------ report


def write_report(
    base: EvalResult,
    checkpoints: Sequence[tuple[int, EvalResult, Decision]],
    out_dir: Path,
    best_step: int | None = None,
    policy: ForgettingPolicy | None = None,
) -> dict[str, Path]:
    """Write eval_report.json, eval_report.md and eval_report.png (domain vs general bpb per checkpoint, the base as
    dashed reference lines, rejected checkpoints marked with a red x). Returns {"json", "md", "png"} paths."""
    policy = policy or ForgettingPolicy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"step": s, "accepted": d.accepted, "reasons": d.reasons, "numbers": d.numbers, "metrics": r.metrics, "backend": r.backend}
        for s, r, d in checkpoints
    ]
    doc = {"policy": asdict(policy), "base": base.model_dump(mode="json"), "checkpoints": rows, "best_step": best_step}
    paths = {"json": out_dir / "eval_report.json", "md": out_dir / "eval_report.md", "png": out_dir / "eval_report.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, sort_keys=True, default=float), encoding="utf-8")

    def f(m: dict, k: str, fmt: str = ".4f") -> str:
        v = m.get(k)
        return "n/a" if v is None else format(v, fmt)

    bench_cols = sorted({k for r in [base, *(r for _, r, _ in checkpoints)] for k in r.metrics if k.startswith("bench/") and k.endswith(f"/{policy.benchmark_metric}")})
    cols = ["domain/bits_per_byte", "general/bits_per_byte", policy.general_ppl_metric, *policy.general_probe_metrics, *bench_cols]
    cols = list(dict.fromkeys(cols))
    lines = [
        "# Forgetting evaluation",
        "",
        f"Policy: general perplexity ({policy.general_ppl_metric}) at most +{policy.max_general_ppl_increase:.0%} over the reference (the original base); "
        + (f"general probes ({', '.join(policy.general_probe_metrics)}) at most {policy.max_general_probe_drop:g} points down; " if policy.general_probe_metrics else "")
        + (f"general benchmarks ({', '.join(policy.general_benchmarks)}) rejected when {policy.benchmark_metric} is down more than "
           f"{policy.max_general_benchmark_drop:g} points AND the drop is significant (exact McNemar on the same items, p < {policy.alpha:g}); "
           if policy.general_benchmarks else "")
        + "best = "
        f"{'max' if policy.primary_higher_is_better else 'min'} {policy.primary_metric} among accepted.",
        "",
        "| checkpoint | " + " | ".join(cols) + " | decision |",
        "| --- | " + " | ".join("---" for _ in cols) + " | --- |",
        "| reference (original base) | " + " | ".join(f(base.metrics, c) for c in cols) + " | reference |",
    ]
    for s, r, d in checkpoints:
        verdict = "accepted" if d.accepted else "REJECTED: " + "; ".join(d.reasons)
        star = " (best)" if s == best_step else ""
        lines.append(f"| step {s}{star} | " + " | ".join(f(r.metrics, c) for c in cols) + f" | {verdict} |")
    lines += ["", f"Best checkpoint: {'step ' + str(best_step) if best_step is not None else 'none accepted'}", ""]
    lines += benchmark_section(base.metrics, [(f"step {s}", r.metrics, d.numbers) for s, r, d in checkpoints], policy)
    lines += ["![bpb](eval_report.png)", ""]
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    _plot(base, checkpoints, paths["png"], best_step)
    return paths


def benchmark_section(
    reference: dict[str, float], rows: Sequence[tuple[str, dict[str, float], dict[str, float] | None]], policy: ForgettingPolicy
) -> list[str]:
    """Markdown: each benchmark's accuracy with its 95% Wilson interval for the reference and each row (label,
    metrics, the decision's numbers or None), the gate's p-value, and the smallest drop the sample can detect."""
    from dapt_core.benchmarks import min_detectable_drop, wilson_interval

    m = policy.benchmark_metric
    names = sorted({k.split("/")[1] for r in [reference, *(x for _, x, _ in rows)] for k in r if k.startswith("bench/") and k.endswith("/n")})
    if not names:
        return []

    def cell(metrics: dict[str, float], name: str) -> str:
        acc, n = metrics.get(f"bench/{name}/{m}"), metrics.get(f"bench/{name}/n")
        if acc is None or not n:
            return "–"
        lo, hi = wilson_interval(round(acc * n), int(n))
        return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        f"### Benchmarks ({m}, 95% Wilson interval)", "",
        "| benchmark | gate | n | reference | " + " | ".join(label for label, _, _ in rows) + " | smallest detectable drop |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in rows) + " | --- |",
    ]
    for name in names:
        gated = name in policy.general_benchmarks
        n = int(reference.get(f"bench/{name}/n") or next((x.get(f"bench/{name}/n") for _, x, _ in rows if x.get(f"bench/{name}/n")), 0))
        cells = []
        discordant = None
        for _, metrics, numbers in rows:
            c = cell(metrics, name)
            p = (numbers or {}).get(f"p_value bench/{name}")
            if p is not None:
                c += f", p={p:.3g}"
                discordant = (numbers or {}).get(f"discordant bench/{name}", discordant)
            cells.append(c)
        acc = reference.get(f"bench/{name}/{m}", 0.5)
        rate = discordant / n if discordant is not None and n else 2 * acc * (1 - acc)
        mde = min_detectable_drop(n, rate, policy.alpha)
        lines.append(
            f"| {name} | {'general (gated)' if gated else 'reported'} | {n} | {cell(reference, name)} | " + " | ".join(cells)
            + f" | {mde * 100:.1f} points |"
        )
    lines += [
        "",
        f"Smallest detectable drop: (z_(1-α/2) + z_0.8) · sqrt(d / n) at α = {policy.alpha:g} and power 0.8, with d the share of "
        "items that flip between the reference and the last judged checkpoint (2·acc·(1−acc), the share for independent "
        f"answers, before any checkpoint). A gate limit of {policy.max_general_benchmark_drop:g} points below it cannot be "
        "told from noise at this sample size: raise the benchmark's `limit`.",
        "",
    ]
    return lines


def _plot(base: EvalResult, checkpoints, path: Path, best_step: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    steps = [s for s, _, _ in checkpoints]
    for split, color in (("domain", "tab:blue"), ("general", "tab:orange")):
        key = f"{split}/bits_per_byte"
        ys = [r.metrics.get(key, float("nan")) for _, r, _ in checkpoints]
        ax.plot(steps, ys, "o-", color=color, label=f"{split} bpb")
        if key in base.metrics:
            ax.axhline(base.metrics[key], color=color, linestyle="--", alpha=0.7, label=f"base {split} bpb")
        rej = [(s, y) for (s, _, d), y in zip(checkpoints, ys) if not d.accepted]
        if rej:
            ax.scatter([s for s, _ in rej], [y for _, y in rej], marker="x", s=120, color="red", zorder=5,
                       label="rejected" if split == "domain" else None)
        if best_step is not None and best_step in steps:
            ax.scatter([best_step], [ys[steps.index(best_step)]], marker="*", s=200, color="gold", edgecolor="k", zorder=6,
                       label="best" if split == "domain" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Domain vs general bits per byte per checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
