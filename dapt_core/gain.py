"""Did CPT pay off? A model is promoted only if it beats the ORIGINAL base model on the domain.

The forgetting policy (dapt_core.evaluate.ForgettingPolicy) says whether a checkpoint kept what the base knew; this
module says whether it learned what it was trained for. A checkpoint beats the original base on the domain when

* its primary domain metric (`eval.primary_metric`, domain bits per byte by default: tokenizer-independent, so a model
  with an extended vocabulary compares with the original) is better than the original base's, and
* no configured domain benchmark (`eval.benchmarks`, kind `domain`) is significantly worse than the original base's
  on the same items (exact McNemar test at `eval.alpha`): a few dozen items cannot show a gain, but they can show a
  loss, and a model that clearly lost domain knowledge did not beat the original.

A run whose accepted checkpoints all fall short ends "no gain": nothing is promoted, and the numbers say by how much
(`DomainGain`). The tokenizer extension's cost (extended-but-untrained base minus original on the same metric) and its
break-even point (the first checkpoint that beats the original) are reported with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from dapt_core.benchmarks import compare_paired
from dapt_core.config import EvalConfig
from dapt_core.evaluate import EvalResult
from dapt_core.manifest import CheckpointDecision, DomainGain


def trails_original(original: EvalResult, candidate: EvalResult, cfg: EvalConfig) -> tuple[list[str], dict[str, float]]:
    """Why `candidate` does not beat the original base on the domain (empty: it does), and the numbers of the domain
    benchmarks' paired tests (the same keys the forgetting policy uses for general ones, so the report shows both)."""
    reasons: list[str] = []
    numbers: dict[str, float] = {}
    m = cfg.primary_metric
    o, c = original.metrics.get(m), candidate.metrics.get(m)
    if o is None or c is None:
        reasons.append(
            f"{m} missing for the {'original base' if o is None else 'checkpoint'}: cannot tell a domain gain"
        )
    elif not cfg.primary_beats(c, o):
        reasons.append(f"{m} {c:.4f} does not beat the original base's {o:.4f} ({(c - o) / abs(o):+.1%})")
    metric = cfg.benchmark_metric
    for b in (b for b in cfg.benchmarks if b.kind == "domain"):
        if b.name not in original.samples or b.name not in candidate.samples:
            continue  # reported only: evaluate() records why a benchmark has no per-item results
        try:
            cmp = compare_paired(original.samples[b.name].correct(metric), candidate.samples[b.name].correct(metric))
        except ValueError as e:  # no item in common: the loss test cannot run, so the gain is not shown
            reasons.append(f"domain benchmark {b.name}: {e}")
            continue
        numbers.update(cmp.numbers(f"bench/{b.name}"))
        if cmp.drop_points > 0 and cmp.p_value < cfg.alpha:
            reasons.append(
                f"domain benchmark {b.name} {metric} down {cmp.drop_points:.1f} points ({cmp.reference_acc:.3f} -> "
                f"{cmp.candidate_acc:.3f}, exact McNemar p={cmp.p_value:.3g} < {cfg.alpha:g})"
            )
    return reasons, numbers


def domain_gain(
    cfg: EvalConfig,
    original: dict[str, float],
    decisions: Sequence[CheckpointDecision],
    promoted: CheckpointDecision | None,
    extended_base: dict[str, float] | None = None,
) -> DomainGain:
    """The domain verdict of a CPT run over `decisions` (every judged checkpoint, all attempts, oldest first):
    the extension's cost when `extended_base` (the extended-but-untrained model's metrics) is given, the break-even
    checkpoint, and why nothing was promoted when nothing was."""
    m = cfg.primary_metric
    o = original.get(m)
    e = (extended_base or {}).get(m)
    accepted = [d for d in decisions if d.accepted and m in d.metrics]
    best = min(accepted, key=lambda d: cfg.primary_key(d.metrics)) if accepted else None  # ties: the oldest
    even = next((d for d in decisions if o is not None and m in d.metrics and cfg.primary_beats(d.metrics[m], o)), None)
    if promoted is not None:
        verdict, reasons = "gain", []
    elif best is None:
        verdict, reasons = "nothing accepted", ["no checkpoint passed the forgetting policy"]
    else:
        verdict = "no gain"
        reasons = [f"attempt {best.attempt} step {best.step} (the best accepted): " + "; ".join(best.trails_original)]
    if promoted is None and e is not None and o is not None and cfg.primary_beats(o, e) and even is None:
        reasons.append(
            f"the tokenizer extension costs {e - o:+.4f} {m} before training and the budget did not pay it back: run "
            "CPT "
            "without it (tokenizer.on_no_gain: retry_without_extension, or tokenizer.enabled: false)"
        )
    return DomainGain(
        metric=m,
        original=o,
        extended_base=e,
        extension_cost=None if e is None or o is None else e - o,
        best_accepted=best.metrics[m] if best else None,
        promoted=promoted.metrics.get(m) if promoted else None,
        break_even_attempt=even.attempt if even else None,
        break_even_step=even.step if even else None,
        verdict=verdict,
        reasons=reasons,
    )
