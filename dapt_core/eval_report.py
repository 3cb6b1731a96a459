"""The forgetting report of one CPT attempt: eval_report.json, eval_report.md (a table per checkpoint, the benchmarks
with their intervals) and eval_report.png (domain vs general bits per byte per checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dapt_core.benchmarks import min_detectable_drop, wilson_interval
from dapt_core.evaluate import EvalResult
from dapt_core.forgetting import Decision, ForgettingPolicy


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
        {
            "step": s,
            "accepted": d.accepted,
            "reasons": d.reasons,
            "numbers": d.numbers,
            "metrics": r.metrics,
            "backend": r.backend,
        }
        for s, r, d in checkpoints
    ]
    doc = {
        "policy": policy.summary(),
        "base": base.model_dump(mode="json"),
        "checkpoints": rows,
        "best_step": best_step,
    }
    paths = {"json": out_dir / "eval_report.json", "md": out_dir / "eval_report.md", "png": out_dir / "eval_report.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, sort_keys=True, default=float), encoding="utf-8")

    def f(m: dict, k: str, fmt: str = ".4f") -> str:
        v = m.get(k)
        return "n/a" if v is None else format(v, fmt)

    bench_cols = sorted(
        {
            k
            for r in [base, *(r for _, r, _ in checkpoints)]
            for k in r.metrics
            if k.startswith("bench/") and k.endswith(f"/{policy.config.benchmark_metric}")
        }
    )
    cols = [
        "domain/bits_per_byte",
        "general/bits_per_byte",
        policy.config.general_ppl_metric,
        *policy.general_probe_metrics,
        *bench_cols,
    ]
    cols = list(dict.fromkeys(cols))
    lines = [
        "# Forgetting evaluation",
        "",
        _policy_line(policy),
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


def _policy_line(policy: ForgettingPolicy) -> str:
    """The forgetting policy in one sentence: the general perplexity, probe and benchmark limits, and the best rule."""
    return (
        f"Policy: general perplexity ({policy.config.general_ppl_metric}) at most "
        f"+{policy.config.max_general_ppl_increase:.0%} over the reference (the original base); "
        + (
            f"general probes ({', '.join(policy.general_probe_metrics)}) at most "
            f"{policy.config.max_general_probe_drop:g} points down; "
            if policy.general_probe_metrics
            else ""
        )
        + (
            f"general benchmarks ({', '.join(policy.general_benchmarks)}) rejected when "
            f"{policy.config.benchmark_metric} is down more than "
            f"{policy.config.max_general_benchmark_drop:g} points AND the drop is significant (exact McNemar on the "
            f"same items, p < {policy.config.alpha:g}); "
            if policy.general_benchmarks
            else ""
        )
        + "best = "
        f"{'max' if policy.config.primary_higher_is_better else 'min'} {policy.config.primary_metric} among accepted."
    )


def benchmark_section(
    reference: dict[str, float],
    rows: Sequence[tuple[str, dict[str, float], dict[str, float] | None]],
    policy: ForgettingPolicy,
) -> list[str]:
    """Markdown: each benchmark's accuracy with its 95% Wilson interval for the reference and each row (label,
    metrics, the decision's numbers or None), the gate's p-value, and the smallest drop the sample can detect."""
    m = policy.config.benchmark_metric
    names = sorted(
        {
            k.split("/")[1]
            for r in [reference, *(x for _, x, _ in rows)]
            for k in r
            if k.startswith("bench/") and k.endswith("/n")
        }
    )
    if not names:
        return []

    def cell(metrics: dict[str, float], name: str) -> str:
        acc, n = metrics.get(f"bench/{name}/{m}"), metrics.get(f"bench/{name}/n")
        if acc is None or not n:
            return "–"
        lo, hi = wilson_interval(round(acc * n), int(n))
        return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        f"### Benchmarks ({m}, 95% Wilson interval)",
        "",
        "| benchmark | gate | n | reference | "
        + " | ".join(label for label, _, _ in rows)
        + " | smallest detectable drop |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in rows) + " | --- |",
    ]
    for name in names:
        gated = name in policy.general_benchmarks
        n = int(
            reference.get(f"bench/{name}/n")
            or next((x.get(f"bench/{name}/n") for _, x, _ in rows if x.get(f"bench/{name}/n")), 0)
        )
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
        mde = min_detectable_drop(n, rate, policy.config.alpha)
        lines.append(
            f"| {name} | {'general (gated)' if gated else 'reported'} | {n} | {cell(reference, name)} | "
            + " | ".join(cells)
            + f" | {mde * 100:.1f} points |"
        )
    lines += [
        "",
        f"Smallest detectable drop: (z_(1-α/2) + z_0.8) · sqrt(d / n) at α = {policy.config.alpha:g} and power 0.8, "
        "with d the share of "
        "items that flip between the reference and the last judged checkpoint (2·acc·(1−acc), the share for "
        "independent "
        f"answers, before any checkpoint). A gate limit of {policy.config.max_general_benchmark_drop:g} points below "
        "it cannot be "
        "told from noise at this sample size: raise the benchmark's `limit`.",
        "",
    ]
    return lines


def _plot(
    base: EvalResult, checkpoints: Sequence[tuple[int, EvalResult, Decision]], path: Path, best_step: int | None
) -> None:
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
            ax.scatter(
                [s for s, _ in rej],
                [y for _, y in rej],
                marker="x",
                s=120,
                color="red",
                zorder=5,
                label="rejected" if split == "domain" else None,
            )
        if best_step is not None and best_step in steps:
            ax.scatter(
                [best_step],
                [ys[steps.index(best_step)]],
                marker="*",
                s=200,
                color="gold",
                edgecolor="k",
                zorder=6,
                label="best" if split == "domain" else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Domain vs general bits per byte per checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
