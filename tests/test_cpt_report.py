"""The CPT verdict as a user reads it, fast and without training: the domain gain rule (dapt_core/gain.py), the pipeline
report's base → CPT → SFT table with benchmark intervals and the gate's p-values, "no gain", and a self-replay run's
warnings (flows/cpt.py `judgement_warnings`)."""

from __future__ import annotations

import pytest

from dapt.flows.cpt import judgement_warnings
from dapt_core.benchmarks import wilson_interval
from dapt_core.config import BenchmarkConfig, EvalConfig
from dapt_core.evaluate import BenchmarkSamples, EvalResult
from dapt_core.forgetting import ForgettingPolicy
from dapt_core.gain import domain_gain, trails_original
from dapt_core.manifest import (
    ArtifactRef,
    AttemptSummary,
    CheckpointDecision,
    CleanManifest,
    CptManifest,
    DirRef,
    PackManifest,
    SftManifest,
    TokenizerManifest,
)
from dapt_core.pack import SELF_REPLAY_EVAL_WARNING
from dapt_core.report import write_pipeline_report

BPB = "domain/bits_per_byte"


def _ref(name: str) -> ArtifactRef:
    return ArtifactRef(uri=f"/store/{name}", sha256="0" * 64, bytes=1)


def _pack(warnings: list[str] = ()) -> PackManifest:
    return PackManifest(
        train_shards=[_ref("train")],
        seq_len=64,
        sequences=10,
        tokens={"domain": 640},
        general_fraction_target=0.05,
        general_fraction_realised=0.05,
        warnings=list(warnings),
        report_json=_ref("pack.json"),
        code_version="test",
    )


def _decision(
    step: int, bpb: float, accepted: bool = True, trails: list[str] = (), attempt: int = 0
) -> CheckpointDecision:
    return CheckpointDecision(
        attempt=attempt,
        step=step,
        accepted=accepted,
        reasons=[] if accepted else ["general ppl +20%"],
        numbers={"p_value bench/piqa": 0.375, "discordant bench/piqa": 12.0},
        backend="native",
        checkpoint=f"/store/c{step}",
        metrics={BPB: bpb, "general/bits_per_byte": 1.0, "bench/piqa/acc_norm": 0.6, "bench/piqa/n": 150.0},
        trails_original=list(trails),
    )


def _samples(right: list[int]) -> BenchmarkSamples:
    return BenchmarkSamples(ids=list(range(len(right))), acc=right, acc_norm=right)


def test_a_checkpoint_beats_the_original_only_with_lower_domain_bpb_and_no_significant_domain_benchmark_loss():
    cfg = EvalConfig(benchmarks=[BenchmarkConfig(name="medmcqa", kind="domain", path="/nowhere.jsonl")])
    original = EvalResult(metrics={BPB: 0.90}, samples={"medmcqa": _samples([1] * 40)})
    better = EvalResult(metrics={BPB: 0.85}, samples={"medmcqa": _samples([1] * 39 + [0])})
    assert trails_original(original, better, cfg)[0] == []  # one item lost out of 40: not a significant loss
    worse_bpb = EvalResult(metrics={BPB: 0.93}, samples=better.samples)
    [reason], _ = trails_original(original, worse_bpb, cfg)
    assert "0.9300 does not beat the original base's 0.9000 (+3.3%)" in reason
    lost = EvalResult(metrics={BPB: 0.85}, samples={"medmcqa": _samples([1] * 25 + [0] * 15)})
    [reason], numbers = trails_original(original, lost, cfg)
    assert (
        reason.startswith("domain benchmark medmcqa acc_norm down 37.5 points")
        and numbers["p_value bench/medmcqa"] < 0.05
    )


def test_a_domain_benchmark_with_no_item_in_common_is_a_reason_not_an_exception():
    cfg = EvalConfig(benchmarks=[BenchmarkConfig(name="medmcqa", kind="domain", path="/nowhere.jsonl")])
    original = EvalResult(metrics={BPB: 0.90}, samples={"medmcqa": _samples([1] * 10)})
    elsewhere = BenchmarkSamples(ids=list(range(100, 110)), acc=[1] * 10, acc_norm=[1] * 10)
    candidate = EvalResult(metrics={BPB: 0.85}, samples={"medmcqa": elsewhere})
    [reason], numbers = trails_original(original, candidate, cfg)
    assert reason.startswith("domain benchmark medmcqa: no item in common") and numbers == {}


def test_domain_gain_reports_the_extension_cost_the_break_even_step_and_no_gain():
    cfg = EvalConfig()
    decisions = [_decision(4, 0.95, trails=["no"]), _decision(8, 0.88), _decision(12, 0.87, accepted=False)]
    gain = domain_gain(cfg, {BPB: 0.90}, decisions, decisions[1], extended_base={BPB: 1.05})
    assert gain.verdict == "gain" and gain.extension_cost == pytest.approx(0.15) and gain.break_even_step == 8
    assert gain.promoted == 0.88 and gain.best_accepted == 0.88
    trailing = [_decision(4, 0.97, trails=["domain/bits_per_byte 0.9700 does not beat the original base's 0.9000"])]
    gain = domain_gain(cfg, {BPB: 0.90}, trailing, None, extended_base={BPB: 1.05})
    assert gain.verdict == "no gain" and gain.break_even_step is None and gain.best_accepted == 0.97
    assert (
        gain.reasons[0]
        == "attempt 0 step 4 (the best accepted): domain/bits_per_byte 0.9700 does not beat the original base's 0.9000"
    )
    assert gain.reasons[1].startswith(
        "the tokenizer extension costs +0.1500 domain/bits_per_byte before training and the budget did not pay"
    )
    assert "tokenizer.on_no_gain: retry_without_extension" in gain.reasons[1]
    assert domain_gain(cfg, {BPB: 0.90}, [_decision(4, 0.8, accepted=False)], None).verdict == "nothing accepted"


def test_every_best_checkpoint_choice_follows_the_primary_metrics_direction_and_ties_go_to_the_earlier():
    from dapt_core.continuation import better_rollback_point

    decisions = [_decision(4, 0.95), _decision(8, 0.97), _decision(12, 0.97)]
    results = [(d.step, EvalResult(metrics=d.metrics)) for d in decisions]
    cpt = _cpt(decisions, None)
    start = DirRef(uri="/store/ext", files={})
    for cfg, step in [(EvalConfig(), 4), (EvalConfig(primary_higher_is_better=True), 8)]:
        assert ForgettingPolicy.from_config(cfg).choose_best(results) == step
        assert better_rollback_point(None, cpt, start, cfg).decision.step == step
        assert domain_gain(cfg, {BPB: 0.99}, decisions, None).reasons[0].startswith(f"attempt 0 step {step} ")


def _report(tmp_path, cpt: CptManifest, sft: SftManifest | None = None) -> str:
    clean = CleanManifest(
        decisions=_ref("d"),
        stats_json=_ref("s.json"),
        stats_md=_ref("s.md"),
        input_docs=10,
        kept_docs=9,
        dropped={"duplicate": 1},
        sources=[],
        code_version="test",
    )
    tokenizer = TokenizerManifest(
        model=DirRef(uri="/store/ext", files={}),
        base_fingerprint="f",
        new_tokens=3,
        report_json=_ref("t.json"),
        report_md=_ref("t.md"),
        code_version="test",
    )
    paths = write_pipeline_report(
        tmp_path,
        project="demo",
        clean=clean,
        tokenizer=tokenizer,
        pack=_pack(),
        cpt=cpt,
        sft=sft,
        policy=ForgettingPolicy.from_config(
            EvalConfig(benchmarks=[BenchmarkConfig(name="piqa", kind="general", path="/nowhere.jsonl")])
        ),
    )
    return paths["md"].read_text()


def _cpt(decisions: list[CheckpointDecision], promoted_step: int | None, warnings: list[str] = ()) -> CptManifest:
    promoted = next((d for d in decisions if d.step == promoted_step), None)
    original = {BPB: 0.9568, "general/bits_per_byte": 1.017, "bench/piqa/acc_norm": 0.587, "bench/piqa/n": 150.0}
    return CptManifest(
        accepted=any(d.accepted for d in decisions),
        promoted=DirRef(uri="/store/promoted", files={}) if promoted else None,
        best_step=promoted_step,
        decisions=decisions,
        reference_metrics=original,
        base_metrics={BPB: 0.9797, "general/bits_per_byte": 1.017, "bench/piqa/acc_norm": 0.587, "bench/piqa/n": 150.0},
        report_json=_ref("r.json"),
        report_md=_ref("r.md"),
        report_png=_ref("r.png"),
        attempt=0,
        lr=2e-5,
        general_fraction=0.05,
        attempts=[
            AttemptSummary(
                attempt=0,
                lr=2e-5,
                general_fraction=0.05,
                accepted=True,
                best_step=promoted_step,
                start_model="/store/ext",
                decisions=decisions,
                report_md="/store/r.md",
            )
        ],
        gain=domain_gain(EvalConfig(), original, decisions, promoted, extended_base={BPB: 0.9797}),
        warnings=list(warnings),
        code_version="test",
    )


def test_report_shows_base_cpt_sft_bpb_benchmark_intervals_and_the_gates_p_values(tmp_path):
    decisions = [_decision(6, 0.93), _decision(12, 0.9166)]
    sft = SftManifest(
        model=DirRef(uri="/store/sft", files={}),
        examples=100,
        heldout_examples=10,
        response_before={},
        response_after={},
        eval_metrics={BPB: 0.9185, "general/bits_per_byte": 1.0, "bench/piqa/acc_norm": 0.62, "bench/piqa/n": 150.0},
        accepted=True,
        numbers={"p_value bench/piqa": 0.125, "discordant bench/piqa": 10.0},
        code_version="test",
    )
    report = _report(tmp_path, _cpt(decisions, 12), sft)
    print(report)
    row = next(line for line in report.splitlines() if line.startswith("| domain bits/byte"))
    assert [c.strip() for c in row.split("|")[2:7]] == ["0.9568", "0.9797", "0.9166", "-4.2%", "0.9185"]
    assert any(line.startswith("| general bits/byte") and "1.017" in line for line in report.splitlines())
    lo, hi = wilson_interval(round(0.587 * 150), 150)
    assert f"0.587 [{lo:.3f}, {hi:.3f}]" in report and "p=0.375" in report and "p=0.125" in report
    assert "step 12: accepted (benchmark gate: piqa p=0.375)" in report
    assert "Tokenizer extension cost: domain/bits_per_byte 0.9568 (original base) -> 0.9797" in report
    assert (
        "Break-even: attempt 0, step 6" in report
        and "Domain gain: promoted 0.9166 vs original base 0.9568 (-4.2%)" in report
    )


def test_report_of_a_no_gain_run_says_so_with_the_numbers(tmp_path):
    trails = ["domain/bits_per_byte 0.9700 does not beat the original base's 0.9568 (+1.4%)"]
    report = _report(tmp_path, _cpt([_decision(6, 0.97, trails=trails)], None))
    headline = report.splitlines()[2]
    assert headline.startswith(
        "No gain: nothing promoted (no gain; best accepted 0.9700 (+1.4%) vs original base 0.9568)"
    )
    assert "does not beat the original base's 0.9568" in headline
    assert report.count("No gain") == 1  # the headline says it; the gain bullets do not repeat it
    assert "Break-even: no checkpoint's domain/bits_per_byte beats" in report
    assert "step 6: accepted (does not beat the original base on the domain)" in report
    assert "Promoted model: `none`" in report


def test_cli_says_nothing_promoted_once(monkeypatch):
    from rich.console import Console

    import dapt.flows.cli

    console = Console(record=True, width=300)
    monkeypatch.setattr(dapt.flows.cli, "console", console)
    trails = ["domain/bits_per_byte 0.9700 does not beat the original base's 0.9568 (+1.4%)"]
    dapt.flows.cli._print_cpt(_cpt([_decision(6, 0.97, trails=trails)], None))
    printed = console.export_text()
    assert printed.count("nothing promoted") == 1 and "nothing promoted (no gain; best accepted 0.9700" in printed


def test_self_replay_run_is_judged_on_general_benchmarks_and_warns_its_held_out_text_is_the_models_own(tmp_path):
    self_replay = _pack([SELF_REPLAY_EVAL_WARNING])
    no_bench = EvalConfig()
    warnings = judgement_warnings(self_replay, no_bench)
    assert warnings[0] == SELF_REPLAY_EVAL_WARNING and "without a general benchmark" in warnings[1]
    suite = EvalConfig(benchmarks=[BenchmarkConfig(name="piqa", kind="general", path="/nowhere.jsonl")])
    assert judgement_warnings(self_replay, suite) == [SELF_REPLAY_EVAL_WARNING]
    policy = ForgettingPolicy.from_config(suite)  # the gate's general signal is the benchmark, not the probes
    assert policy.general_benchmarks == ("piqa",) and policy.general_probe_metrics == ()
    assert judgement_warnings(_pack(), no_bench) == []
    report = _report(tmp_path, _cpt([_decision(6, 0.93)], 6, warnings=warnings))
    assert f"> Warning: {SELF_REPLAY_EVAL_WARNING}" in report
