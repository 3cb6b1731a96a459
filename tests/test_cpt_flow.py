"""The CPT flow on a tiny Llama, for real: training data (cached) → base eval → CPT attempts → rollback / promotion.

The base model is first trained a few dozen steps on general prose, so that it has something to forget: domain-only
training at the maximum LR then raises its general perplexity past the policy's limit (rollback), while a low LR
with 5% replay improves the domain and stays within the limits (promotion).
"""

from __future__ import annotations

import json

import pytest

from dapt.flows.cpt import cpt_flow
from dapt.flows.training_data import training_data_flow
from dapt_core.config import EvalConfig, MixConfig, TrainConfig, load_config
from dapt_core.evaluate import evaluate
from dapt_core.model import load_from_dir
from dapt_core.store import open_store
from tests.corpus import general_multiple_choice, write_config, write_corpus
from tests.tiny_model import pretrained_general_base

SEQ = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    dirs = write_corpus(root, n_domain=40, n_general=30)
    base = pretrained_general_base(root, SEQ)
    return root, dirs, base


def _config(
    root,
    dirs,
    base,
    name: str,
    *,
    lr: float,
    general_fraction: float,
    max_steps: int,
    save_every: int,
    max_attempts: int = 2,
    eval_extra: str = "",
    tokenizer: str = "min_frequency: 5, domain_vocab_size: 600",
):
    run = root / name
    run.mkdir()
    extra = f"""model: {{base: "{base}"}}
tokenizer: {{{tokenizer}}}
mix: {{general_fraction: {general_fraction}, seq_len: {SEQ}, heldout_fraction: 0.1}}
train: {{lr: {lr}, max_steps: {max_steps}, save_every: {save_every}, batch_size: 8, warmup_ratio: 0.1}}
eval: {{max_attempts: {max_attempts}, max_probes: 40, batch_size: 8{eval_extra}}}
"""
    return load_config(write_config(run, dirs, store=str(run / "store"), extra=extra))


def _print_attempts(result):
    for a in result.attempts:
        print(f"attempt {a.attempt} lr={a.lr:.3g} general_fraction={a.general_fraction:.3g} accepted={a.accepted}")
        for d in a.decisions:
            n = d.numbers
            print(
                f"  step {d.step}: {'ACCEPTED' if d.accepted else 'REJECTED'} "
                f"general_ppl_increase={n.get('general_ppl_increase', float('nan')):+.3f} "
                f"delta_domain_bpb={n.get('delta domain/bits_per_byte', float('nan')):+.4f} "
                f"probe_drop={n.get('drop_points general/probe_acc', float('nan')):.1f}"
            )


def test_high_lr_without_replay_is_rejected_and_rolled_back(prefect_harness, corpus):
    root, dirs, base = corpus
    cfg = _config(root, dirs, base, "high-lr", lr=1e-3, general_fraction=0.0, max_steps=30, save_every=10)
    result = cpt_flow(cfg)
    _print_attempts(result)

    first = result.attempts[0]
    assert first.attempt == 0 and first.lr == 1e-3 and first.general_fraction == 0.0
    rejected = [d for d in first.decisions if not d.accepted]
    assert rejected, "domain-only training at lr 1e-3 should push general perplexity past +15%"
    assert all(d.reasons for d in rejected)
    # Training stopped at the first rejected checkpoint: no compute spent forgetting further.
    assert first.stopped_at == rejected[0].step == first.decisions[-1].step < 30

    # Rolled back: attempt 1 with half the LR and replay doubled from eval.min_general_fraction (mix's was 0),
    # from the best accepted checkpoint of attempt 0, or from the start model when none was accepted.
    assert len(result.attempts) == 2
    second = result.attempts[1]
    assert second.lr == pytest.approx(5e-4)
    assert second.general_fraction == pytest.approx(2 * cfg.eval.min_general_fraction)
    assert second.start_model == (first.promoted or first.start_model)
    store = open_store(cfg.store)
    report = json.loads(store.read_text(result.report_json))
    chosen = result.attempts[result.attempt]
    assert [c["step"] for c in report["checkpoints"]] == [d.step for d in chosen.decisions]
    assert store.local_path(result.report_png).stat().st_size > 0
    if result.accepted:  # the promoted checkpoint is the best accepted one over all attempts
        accepted = [d for a in result.attempts for d in a.decisions if d.accepted]
        best = min(d.metrics["domain/bits_per_byte"] for d in accepted)
        assert result.best.metrics["domain/bits_per_byte"] == best


def test_default_lr_and_replay_are_accepted_and_improve_the_domain(prefect_harness, corpus, monkeypatch):
    root, dirs, base = corpus
    # Without tokenizer extension: checkpoints are judged against the original base, and on this tiny tokenizer the
    # extension alone (mean-initialised rows taking probability mass) costs the +15% the limit allows.
    cfg = _config(
        root,
        dirs,
        base,
        "low-lr",
        lr=TrainConfig().lr,
        general_fraction=MixConfig().general_fraction,
        max_steps=20,
        save_every=10,
        tokenizer="enabled: false",
    )
    result = cpt_flow(cfg)
    _print_attempts(result)

    assert result.accepted and result.attempt == 0 and len(result.attempts) == 1
    assert result.best_step in {d.step for d in result.decisions if d.accepted}
    store = open_store(cfg.store)

    # The promoted directory loads as a plain HF model, and it is better on the domain than the base.
    model, tokenizer = load_from_dir(store.local_dir(result.promoted))
    files = {"domain": store.local_path(training_data_flow(cfg).pack.eval_domain)}  # cached: nothing recomputed
    check = EvalConfig(max_probes=0, backend="native")
    promoted_bpb = evaluate(model, tokenizer, files, root / "low-lr" / "check", check).metrics["domain/bits_per_byte"]
    base_bpb = result.base_metrics["domain/bits_per_byte"]
    print(f"domain bpb: base {base_bpb:.4f} -> promoted {promoted_bpb:.4f}")
    assert promoted_bpb < base_bpb

    # A re-run is answered from the cache: no training, the same manifest.
    import dapt_core.train as train_mod

    calls = []
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert cpt_flow(cfg) == result and calls == []


def _general_benchmark(path) -> str:
    general_multiple_choice(path)
    return (
        f', benchmarks: [{{name: general_prose, kind: general, path: "{path}", prompt: completion, limit: 150}}], '
        "max_general_ppl_increase: 100.0"
    )


@pytest.fixture(scope="module")
def well_trained_base(tmp_path_factory):
    """A base that knows its general prose well (200 steps): a benchmark of it starts far above chance."""
    root = tmp_path_factory.mktemp("gate")
    return pretrained_general_base(root, SEQ, steps=200)


def test_benchmark_gate_rejects_aggressive_cpt_and_accepts_mild(prefect_harness, corpus, well_trained_base):
    """The acceptance check of the benchmark gate alone (the perplexity limit is out of reach): domain-only CPT at a
    high LR loses many items of a multiple-choice set built from the base's general text, significantly: rejected;
    CPT at the default LR with replay is accepted, its p-value reported with the decision. Without tokenizer
    extension, so that the gate sees what CPT did (the extension of this tiny tokenizer alone costs items)."""
    root, dirs, _ = corpus
    base = well_trained_base
    bench = _general_benchmark(root / "general-mc.jsonl")
    aggressive = cpt_flow(
        _config(
            root,
            dirs,
            base,
            "gate-aggressive",
            lr=1e-3,
            general_fraction=0.0,
            max_steps=30,
            save_every=30,
            max_attempts=1,
            eval_extra=bench,
            tokenizer="enabled: false",
        )
    )
    mild_cfg = _config(
        root,
        dirs,
        base,
        "gate-mild",
        lr=TrainConfig().lr,
        general_fraction=MixConfig().general_fraction,
        max_steps=10,
        save_every=10,
        max_attempts=1,
        eval_extra=bench,
        tokenizer="enabled: false",
    )
    mild = cpt_flow(mild_cfg)
    (a,), (m,) = aggressive.decisions, mild.decisions
    for name, d in (("aggressive", a), ("mild", m)):
        n = d.numbers
        print(
            f"{name}: acc_norm {n['base bench/general_prose/acc_norm']:.3f} -> "
            f"{n['bench/general_prose/acc_norm']:.3f}, drop {n['drop_points bench/general_prose']:.1f} "
            f"points, p={n['p_value bench/general_prose']:.3g}, general ppl {n['general_ppl_increase']:+.1%}"
        )
    assert not a.accepted and not aggressive.accepted
    assert len(a.reasons) == 1 and a.reasons[0].startswith("benchmark general_prose acc_norm down")
    assert a.numbers["drop_points bench/general_prose"] > 3.0 and a.numbers["p_value bench/general_prose"] < 0.05
    assert m.accepted and mild.accepted
    assert m.numbers["n bench/general_prose"] == 150 and 0 <= m.p_values()["general_prose"] <= 1
    # the reference is the original base, with its per-item results; the report shows the gate with its p-value
    assert mild.reference_metrics["bench/general_prose/n"] == 150
    report = open_store(mild_cfg.store).read_text(mild.report_md)
    assert (
        "### Benchmarks (acc_norm, 95% Wilson interval)" in report
        and "p=" in report
        and "smallest detectable drop" in report
    )


@pytest.fixture(scope="module")
def domain_literate_base(tmp_path_factory):
    """A base that already reads the domain well through its general-text tokenizer (trained on general prose and
    other domain documents): extending its vocabulary costs domain bits per byte before any training."""
    return pretrained_general_base(tmp_path_factory.mktemp("literate"), SEQ, steps=800, domain_docs=200)


def _no_gain_config(root, dirs, base, name: str, on_no_gain: str):
    """Many new tokens (every domain word seen twice), a few steps at a low LR: the extension's cost is not paid back.
    The perplexity limit is out of reach, so the domain rule alone decides."""
    return _config(
        root,
        dirs,
        base,
        name,
        lr=2e-5,
        general_fraction=0.05,
        max_steps=4,
        save_every=2,
        max_attempts=1,
        eval_extra=", max_general_ppl_increase: 100.0",
        tokenizer=f"min_frequency: 2, domain_vocab_size: 2000, max_new_tokens: 1000, on_no_gain: {on_no_gain}",
    )


def test_extension_that_cannot_pay_for_itself_ends_no_gain(prefect_harness, corpus, domain_literate_base):
    """Accepted checkpoints that trail the original base on the domain are never promoted: the run ends "no gain" with
    the numbers (the extension's cost, no break-even), and the CLI and the report say so."""
    from dapt.flows.cli import _print_cpt

    root, dirs, _ = corpus
    cfg = _no_gain_config(root, dirs, domain_literate_base, "no-gain", "report")
    result = cpt_flow(cfg)
    _print_attempts(result)
    gain = result.gain
    print(gain.model_dump_json())
    assert result.accepted and result.promoted is None and result.best_step is None
    assert gain.verdict == "no gain" and gain.promoted is None
    assert gain.extended_base > gain.original and gain.extension_cost == pytest.approx(
        gain.extended_base - gain.original
    )
    assert gain.best_accepted >= gain.original and gain.break_even_step is None
    assert all(
        d.trails_original and "does not beat the original base" in d.trails_original[0] for d in result.decisions
    )
    assert "no gain" in gain.reasons[0] or "does not beat" in gain.reasons[0]
    from rich.console import Console

    import dapt.flows.cli

    console = Console(record=True, width=200)
    dapt.flows.cli.console, saved = console, dapt.flows.cli.console
    try:
        _print_cpt(result)
    finally:
        dapt.flows.cli.console = saved
    printed = console.export_text()
    assert (
        printed.count("nothing promoted") == 1
        and "nothing promoted (no gain" in printed
        and "Tokenizer extension cost" in printed
        and f"{gain.original:.4f}" in printed
    )


def test_no_gain_retries_without_the_extension_and_never_promotes_a_worse_model(
    prefect_harness, corpus, domain_literate_base
):
    """tokenizer.on_no_gain retry_without_extension: packing and CPT run again with the base tokenizer, and that model,
    which beats the original base on the domain, is promoted; the result says which data it was trained on."""
    root, dirs, _ = corpus
    cfg = _no_gain_config(root, dirs, domain_literate_base, "no-gain-retry", "retry_without_extension")
    result = cpt_flow(cfg)
    _print_attempts(result)
    print(result.gain.model_dump_json())
    assert [a.without_extension for a in result.attempts] == [False, True]
    assert result.attempts[0].promoted is None  # the extended run: no gain
    assert result.without_extension is not None and result.without_extension.tokenizer.new_tokens == 0
    # Without the extension's cost, a few steps on the domain beat the original base: that model is promoted.
    assert result.promoted is not None and result.gain.verdict == "gain" and result.gain.promoted < result.gain.original
    assert result.best.metrics["domain/bits_per_byte"] < result.reference_metrics["domain/bits_per_byte"]


def test_rollback_in_the_flow_continues_from_the_best_accepted_checkpoint(prefect_harness, corpus, monkeypatch):
    """The flow's rollback, end to end: attempt 0 is accepted at step 4 and (told to be) rejected at step 8; attempt 1
    continues from attempt 0's step 4 at half the LR and twice the replay, judged at steps 8 and 12 (the same budget),
    and its best checkpoint, which beats the original base, is promoted."""
    from dapt_core.forgetting import Decision, ForgettingPolicy

    root, dirs, base = corpus
    cfg = _config(
        root,
        dirs,
        base,
        "continue",
        lr=TrainConfig().lr,
        general_fraction=0.05,
        max_steps=12,
        save_every=4,
        tokenizer="enabled: false",
    )
    real_judge, judged = ForgettingPolicy.judge, []

    def judge(self, reference, result, step=None):
        decision = real_judge(self, reference, result, step=step)
        judged.append(step)
        rejected = judged == [4, 8]  # attempt 0's second checkpoint only
        return Decision(not rejected, ["told to reject"] if rejected else [], decision.numbers)

    monkeypatch.setattr(ForgettingPolicy, "judge", judge)
    result = cpt_flow(cfg)
    _print_attempts(result)
    first, second = result.attempts
    assert [d.step for d in first.decisions] == [4, 8] and first.stopped_at == 8
    assert second.continued_from == "attempt 0 step 4" and second.start_model == first.start_model
    assert second.lr == pytest.approx(cfg.train.lr / 2) and second.general_fraction == pytest.approx(0.1)
    assert [d.step for d in second.decisions] == [8, 12]
    assert result.attempt == 1 and result.continuation.resume_step == 4 and result.continuation.total_steps == 12
    assert result.continuation.replay_sequences == round(result.continuation.unseen_sequences * 0.05 / 0.9)
    assert result.promoted is not None and result.gain.verdict == "gain"
