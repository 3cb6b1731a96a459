"""Held-out text and local benchmarks as lm-eval *local* tasks: YAML and JSONL written into a work directory and
loaded with `TaskManager(include_path=...)`; nothing is fetched from a hub.

* `dapt_ppl_<split>`: `loglikelihood_rolling` over each document (word_perplexity, byte_perplexity, bits_per_byte).
* `dapt_probe_<split>`: cloze knowledge probes (dapt_core/probes.py), `multiple_choice` with `acc` / `acc_norm`.
* `dapt_bench_<name>`: each local benchmark (dapt_core/benchmarks.py) as `multiple_choice` on its seeded subsample.

The data files are given as `data_files: {test: <abs path>}` so the split is `test` (a bare string would name it
`train`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from dapt_core.benchmarks import BenchmarkItem, load_benchmark, subsample
from dapt_core.config import BenchmarkConfig
from dapt_core.probes import build_probes

log = logging.getLogger("dapt.eval_tasks")

PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
_TASK_PREFIX = "dapt"


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The non-empty `text_field` strings of a JSONL file (held-out documents)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                t = json.loads(line).get(text_field)
                if isinstance(t, str) and t.strip():
                    texts.append(t)
    return texts


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def write_tasks(
    eval_files: dict[str, Path],
    task_dir: Path,
    probes: bool = True,
    max_probes: int = 200,
    n_choices: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, str]]:
    """Write lm-eval task YAMLs (and probe JSONL) for each split into `task_dir`.

    Returns {split: {"ppl": task_name, "probe": task_name}} ("probe" absent when no probe could be built)."""
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
            + "".join(
                f"  - metric: {m}\n    aggregation: "
                f"{'bits_per_byte' if m == 'bits_per_byte' else 'weighted_perplexity'}\n"
                "    higher_is_better: false\n"
                for m in PPL_METRICS
            )
            + "metadata:\n  version: 1.0\n",
            encoding="utf-8",
        )
        if probes:
            items = build_probes(texts, max_probes=max_probes, n_choices=n_choices, seed=seed)
            if items:
                pdata = task_dir / f"{split}.probe.jsonl"
                pdata.write_text("".join(json.dumps(p) + "\n" for p in items), encoding="utf-8")
                names["probe"] = f"{_TASK_PREFIX}_probe_{split}"
                (task_dir / f"{names['probe']}.yaml").write_text(
                    _mc_task_yaml(names["probe"], pdata, cache), encoding="utf-8"
                )
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
    """Write each local benchmark's seeded subsample as JSONL (rows {"id", "context", "choices", "label"}) and an
    lm-eval multiple_choice task; returns {benchmark name: lm-eval task name} (lm-eval tasks of `task:` benchmarks as
    named)."""
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
            "".join(
                json.dumps({"id": it.id, "context": benchmark_prompt(it), "choices": it.choices, "label": it.label})
                + "\n"
                for it in items
            ),
            encoding="utf-8",
        )
        names[b.name] = f"{_TASK_PREFIX}_bench_{b.name}"
        (task_dir / f"{names[b.name]}.yaml").write_text(_mc_task_yaml(names[b.name], data, cache), encoding="utf-8")
    return names
