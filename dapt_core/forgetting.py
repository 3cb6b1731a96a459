"""The forgetting gate: accept or reject a checkpoint against the reference (the original base), pick the best
accepted one, and plan the next attempt after a rejection.

`ForgettingPolicy.judge` accepts a checkpoint unless general perplexity rose more than 15% over the reference, a
general benchmark lost more than 3 points with a drop significant at alpha (exact McNemar on the same items,
dapt_core/benchmarks.py), or a general probe lost more than 3 points (DAPT-FACTS); `choose_best` picks the accepted
checkpoint with the best domain metric; `rollback_plan` gives the next attempt's LR (halved) and replay fraction
(doubled, capped). Every threshold is an `EvalConfig` field: the policy reads them from the config it holds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dapt_core.benchmarks import compare_paired
from dapt_core.config import DaptConfig, EvalConfig
from dapt_core.evaluate import EvalResult

log = logging.getLogger("dapt.forgetting")


@dataclass
class Decision:
    accepted: bool
    reasons: list[str]
    numbers: dict[str, float]  # incl. per general benchmark: "p_value bench/<name>", "drop_points bench/<name>", ...

    @property
    def p_values(self) -> dict[str, float]:
        """{benchmark name: exact McNemar p-value of its difference from the reference}."""
        return {k.split("/", 1)[1]: v for k, v in self.numbers.items() if k.startswith("p_value bench/")}


@dataclass(frozen=True)
class ForgettingPolicy:
    """Reject a checkpoint when general perplexity rose more than `max_general_ppl_increase` (relative) over the
    reference (the original base), or a general benchmark lost more than `max_general_benchmark_drop` points
    (accuracy x 100, on the same items as the reference) with a drop significant at `alpha` (exact McNemar test on
    the discordant items), or any general probe lost more than `max_general_probe_drop` points.

    Perplexity is word perplexity by default: tokenizer-independent (base and extended-vocabulary models compare) and
    on the scale of the token perplexity the 15% rule of thumb is stated for (byte perplexity moves far less)."""

    config: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> ForgettingPolicy:
        return cls(config=cfg)

    @property
    def general_benchmarks(self) -> tuple[str, ...]:
        """Names of the benchmarks that gate (kind general); domain benchmarks are reported only."""
        return tuple(b.name for b in self.config.benchmarks if b.kind == "general")

    @property
    def general_probe_metrics(self) -> tuple[str, ...]:
        """Probes are the general signal only when no general benchmark is configured, unless the config names them."""
        named = self.config.general_probe_metrics
        if named is not None:
            return tuple(named)
        return () if self.general_benchmarks else ("general/probe_acc",)

    def summary(self) -> dict[str, Any]:
        """The settings the gate applied, for a report."""
        c = self.config
        return {
            "max_general_ppl_increase": c.max_general_ppl_increase,
            "max_general_probe_drop": c.max_general_probe_drop,
            "primary_metric": c.primary_metric,
            "primary_higher_is_better": c.primary_higher_is_better,
            "general_ppl_metric": c.general_ppl_metric,
            "general_probe_metrics": list(self.general_probe_metrics),
            "general_benchmarks": list(self.general_benchmarks),
            "max_general_benchmark_drop": c.max_general_benchmark_drop,
            "alpha": c.alpha,
            "benchmark_metric": c.benchmark_metric,
        }

    def judge(self, base: EvalResult, ckpt: EvalResult, step: int | None = None) -> Decision:
        numbers: dict[str, float] = {}
        pm = self.config.primary_metric
        if pm in base.metrics and pm in ckpt.metrics:
            numbers.update(
                {
                    f"base {pm}": base.metrics[pm],
                    pm: ckpt.metrics[pm],
                    f"delta {pm}": ckpt.metrics[pm] - base.metrics[pm],
                }
            )
        reasons = self._judge_perplexity(base.metrics, ckpt.metrics, numbers)
        for m in self.general_probe_metrics:
            reasons += self._judge_probe(m, base.metrics, ckpt.metrics, numbers)
        for name in self.general_benchmarks:
            reasons += self._judge_benchmark(name, base, ckpt, numbers)
        d = Decision(accepted=not reasons, reasons=reasons, numbers=numbers)
        log.info(
            "checkpoint%s %s: %s %s",
            "" if step is None else f" step {step}",
            "ACCEPTED" if d.accepted else "REJECTED",
            "; ".join(reasons) or "within limits",
            json.dumps(numbers, sort_keys=True),
        )
        return d

    def _judge_perplexity(self, b: dict[str, float], c: dict[str, float], numbers: dict[str, float]) -> list[str]:
        gm, limit = self.config.general_ppl_metric, self.config.max_general_ppl_increase
        if gm not in b or gm not in c:
            return [f"{gm} missing: cannot check general perplexity"]
        inc = c[gm] / b[gm] - 1.0
        numbers.update({f"base {gm}": b[gm], gm: c[gm], "general_ppl_increase": inc})
        if not math.isfinite(inc) or inc > limit:
            return [
                f"{gm} up {inc:+.1%} over the reference ({b[gm]:.4g} -> {c[gm]:.4g}), limit +{limit:.0%}:"
                " roll back, lower the LR or raise the replay fraction"
            ]
        return []

    def _judge_probe(self, m: str, b: dict[str, float], c: dict[str, float], numbers: dict[str, float]) -> list[str]:
        if m not in b or m not in c:
            return [f"{m} missing: cannot check the general probe"]
        limit = self.config.max_general_probe_drop
        drop = (b[m] - c[m]) * 100.0
        numbers.update({f"base {m}": b[m], m: c[m], f"drop_points {m}": drop})
        # One probe flipping is noise, not forgetting: with n probes it moves accuracy 100/n points, which is over
        # the 3-point limit below ~34 probes. A drop must exceed the limit AND one probe's worth.
        n = c.get(m.rsplit("/", 1)[0] + "/probe_n", float("nan"))
        one_probe = 100.0 / n if n and math.isfinite(n) else 0.0
        if not math.isfinite(drop) or drop > max(limit, one_probe + 1e-9):
            return [
                f"{m} down {drop:.1f} points ({b[m]:.3f} -> {c[m]:.3f}), limit {limit:.1f}: diagnose before shipping"
            ]
        return []

    def _judge_benchmark(self, name: str, base: EvalResult, ckpt: EvalResult, numbers: dict[str, float]) -> list[str]:
        """Reasons (none or one) to reject on benchmark `name`; its numbers go into `numbers`."""
        if name not in base.samples or name not in ckpt.samples:
            which = "reference" if name not in base.samples else "checkpoint"
            return [f"benchmark {name}: no per-item results for the {which}: cannot test it against the reference"]
        m, alpha, limit = self.config.benchmark_metric, self.config.alpha, self.config.max_general_benchmark_drop
        try:
            cmp = compare_paired(base.samples[name].correct(m), ckpt.samples[name].correct(m))
        except ValueError as e:
            return [f"benchmark {name}: {e}"]
        key = f"bench/{name}"
        numbers.update({f"base {key}/{m}": cmp.reference_acc, f"{key}/{m}": cmp.candidate_acc, **cmp.numbers(key)})
        if cmp.drop_points > limit and cmp.p_value < alpha:
            return [
                f"benchmark {name} {m} down {cmp.drop_points:.1f} points ({cmp.reference_acc:.3f} -> "
                f"{cmp.candidate_acc:.3f} on "
                f"{cmp.n} items, {cmp.only_reference} lost / {cmp.only_candidate} gained, exact McNemar "
                f"p={cmp.p_value:.3g} < "
                f"{alpha:g}), limit {limit:g}: roll back, lower the LR or raise the replay fraction"
            ]
        return []

    def choose_best(self, accepted: Sequence[tuple[int, EvalResult]]) -> int:
        """Step of the accepted checkpoint with the best primary (domain) metric; ties go to the earlier step."""
        if not accepted:
            raise ValueError("no accepted checkpoint to choose from")
        pm = self.config.primary_metric
        step, _ = min(accepted, key=lambda sr: (self.config.primary_key(sr[1].metrics), sr[0]))
        log.info("best checkpoint: step %s (%s=%.6g)", step, pm, dict(accepted)[step].metrics[pm])
        return step


@dataclass
class RollbackPlan:
    attempt: int  # index of the attempt this plan is for (0 = the original run)
    lr: float
    general_fraction: float


def rollback_plan(attempt: int, cfg: DaptConfig) -> RollbackPlan | None:
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
