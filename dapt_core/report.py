"""The final report of a pipeline run: base → CPT → SFT side by side, the data funnel, every CPT decision.

Writes report.md, report.json and two PNG plots (funnel.png: documents kept / dropped per reason and kind;
checkpoints.png: domain and general metrics per checkpoint over all CPT attempts, the base as reference).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from dapt_core.eval_report import benchmark_section
from dapt_core.forgetting import ForgettingPolicy
from dapt_core.manifest import CleanManifest, CptManifest, DomainGain, PackManifest, SftManifest, TokenizerManifest

HEADLINE = [
    ("domain/bits_per_byte", "domain bits/byte", "lower"),
    ("general/bits_per_byte", "general bits/byte", "lower"),
    ("domain/word_perplexity", "domain word ppl", "lower"),
    ("general/word_perplexity", "general word ppl", "lower"),
    ("domain/probe_acc", "domain probe acc", "higher"),
    ("general/probe_acc", "general probe acc", "higher"),
]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def _delta(base: float | None, new: float | None) -> str:
    if base is None or new is None or base == 0:
        return "–"
    return f"{(new - base) / abs(base):+.1%}"


def gain_lines(gain: DomainGain | None) -> list[str]:
    """The domain verdict in sentences: what the tokenizer extension cost, when training paid it back (break-even),
    then the outcome (`gain_outcome`)."""
    outcome = gain_outcome(gain)
    return _gain_details(gain) + ([outcome] if outcome else [])


def gain_outcome(gain: DomainGain | None) -> str | None:
    """The gain over the original base, or why nothing was promoted ("no gain"); None without an original base."""
    if gain is None or gain.original is None:
        return None
    o = gain.original
    if gain.verdict == "gain":
        return f"Domain gain: promoted {gain.promoted:.4f} vs original base {o:.4f} ({_delta(o, gain.promoted)})."
    best = (
        f"; best accepted {gain.best_accepted:.4f} ({_delta(o, gain.best_accepted)})"
        if gain.best_accepted is not None
        else ""
    )
    return f"No gain: nothing promoted ({gain.verdict}{best} vs original base {o:.4f}): " + "; ".join(gain.reasons)


def _gain_details(gain: DomainGain | None) -> list[str]:
    """The extension's cost and the break-even checkpoint."""
    if gain is None or gain.original is None:
        return []
    m, o = gain.metric, gain.original
    lines = []
    if gain.extension_cost is not None:
        lines.append(
            f"Tokenizer extension cost: {m} {o:.4f} (original base) -> {gain.extended_base:.4f} (extended, before "
            f"training): {gain.extension_cost:+.4f} ({_delta(o, gain.extended_base)})."
        )
    if gain.break_even_step is not None:
        lines.append(
            f"Break-even: attempt {gain.break_even_attempt}, step {gain.break_even_step} is the first checkpoint "
            f"whose {m} beats the original base."
        )
    else:
        lines.append(f"Break-even: no checkpoint's {m} beats the original base's {o:.4f} within the training budget.")
    return lines


def inline_images(markdown: str, images: dict[str, Path]) -> str:
    """The report with its plots embedded as data URIs, for viewers that cannot fetch a store file (the Prefect UI
    renders markdown artifacts in the browser, which reaches neither a worker's disk nor a private bucket)."""
    for name, path in images.items():
        encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        markdown = markdown.replace(f"]({name}.png)", f"](data:image/png;base64,{encoded})")
    return markdown


def write_pipeline_report(
    out_dir: Path,
    *,
    project: str,
    clean: CleanManifest,
    tokenizer: TokenizerManifest,
    pack: PackManifest,
    cpt: CptManifest,
    sft: SftManifest | None,
    original_base: dict[str, float] | None = None,
    policy: ForgettingPolicy | None = None,
) -> dict[str, Path]:
    """`original_base`: metrics of the configured base model before tokenizer extension, the reference of the
    forgetting policy (default: cpt.reference_metrics); cpt.base_metrics are those of the extended model CPT starts
    from, reported. `policy` says which benchmarks the gate tests and at which alpha."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = policy or ForgettingPolicy()
    original = original_base or cpt.reference_metrics
    best = cpt.best.metrics if cpt.best else None
    paths = {
        "md": out_dir / "report.md",
        "json": out_dir / "report.json",
        "funnel": out_dir / "funnel.png",
        "checkpoints": out_dir / "checkpoints.png",
    }
    verdict = _verdict(cpt, original)
    # A run that promoted nothing has the gain's outcome as its headline (_verdict): the bullets do not repeat it.
    bullets = gain_lines(cpt.gain) if cpt.best is not None else _gain_details(cpt.gain)
    lines = [f"# dapt report: {project}", "", verdict, ""] + [f"- {line}" for line in bullets] + [""]
    lines += [f"> Warning: {w}" for w in cpt.warnings] + ([""] if cpt.warnings else [])
    lines += _comparison_lines(original, cpt, sft, policy)
    lines += _funnel_lines(clean) + _training_data_lines(tokenizer, pack) + _attempt_lines(cpt)
    lines += ["", f"Promoted model: `{cpt.promoted.uri if cpt.promoted else 'none'}`"]
    if sft:
        lines.append(f"SFT model: `{sft.model.uri}`")
    paths["md"].write_text("\n".join(lines) + "\n", encoding="utf-8")

    doc = {
        "project": project,
        "verdict": verdict,
        "original_base": original or None,
        "base": cpt.base_metrics,
        "reference": "original_base",
        "cpt_promoted": best,
        "sft": sft.eval_metrics if sft else None,
        "sft_response": {"before": sft.response_before, "after": sft.response_after} if sft else None,
        "funnel": {"input_docs": clean.input_docs, "kept_docs": clean.kept_docs, "dropped": clean.dropped},
        "attempts": [a.model_dump(mode="json") for a in cpt.attempts],
        "gain": cpt.gain.model_dump(mode="json") if cpt.gain else None,
        "warnings": cpt.warnings,
        "promoted": cpt.promoted.uri if cpt.promoted else None,
    }
    paths["json"].write_text(json.dumps(doc, indent=2, sort_keys=True, default=float), encoding="utf-8")
    _plot_funnel(clean, paths["funnel"])
    _plot_checkpoints(cpt, paths["checkpoints"])
    return paths


def _verdict(cpt: CptManifest, original: dict[str, float]) -> str:
    key, base = "domain/bits_per_byte", cpt.base_metrics
    best = cpt.best.metrics if cpt.best else {}
    if key in best and key in base:
        verdict = (
            f"Domain bits per byte on held-out text: base {base[key]:.4f} → promoted {best[key]:.4f} "
            f"({_delta(base[key], best[key])}); attempt {cpt.attempt}, step {cpt.best_step}."
        )
        if key in original:
            verdict += (
                f" The base before tokenizer extension: {original[key]:.4f} "
                f"({_delta(original[key], best[key])} after CPT)."
            )
    elif cpt.best is None and (outcome := gain_outcome(cpt.gain)):
        verdict = outcome
    elif cpt.gain is not None and cpt.gain.verdict == "no gain":  # the original base lacks the primary metric
        verdict = (
            "No gain: checkpoints passed the forgetting policy but none beats the original base on the domain; "
            "nothing promoted."
        )
    else:
        verdict = "No CPT checkpoint passed the forgetting policy: nothing promoted (see the decisions below)."
    if cpt.without_extension is not None:
        verdict += (
            " The extended tokenizer gave no gain, so packing and CPT ran again with the base tokenizer "
            "(tokenizer.on_no_gain: retry_without_extension); the numbers are that run's."
        )
    return verdict


def _comparison_lines(
    original: dict[str, float], cpt: CptManifest, sft: SftManifest | None, policy: ForgettingPolicy
) -> list[str]:
    """Original → extended base → CPT → SFT: bits per byte, perplexity, probes, benchmarks with intervals and
    p-values."""
    base, best = cpt.base_metrics, (cpt.best.metrics if cpt.best else {})
    after_sft = sft.eval_metrics if sft else {}
    lines = [
        "## Base → CPT → SFT",
        "",
        "Original: the configured base model before tokenizer extension, the reference of the forgetting policy "
        "(bits per byte, word perplexity and benchmark accuracy do not depend on the tokenizer): every checkpoint "
        "and the SFT model "
        "are compared with it. Base: the base model with the extended tokenizer, its new rows initialised as "
        "`tokenizer.init` says, before any training (the extension's cost is original → base).",
        "",
        "| metric | original | base | CPT (promoted) | Δ vs original | SFT | Δ vs original |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    metric = policy.config.benchmark_metric
    bench_keys = sorted(
        {k for m in (original, base, best) for k in m if k.startswith("bench/") and k.endswith(f"/{metric}")}
    )
    for k, label, better in HEADLINE + [(k, f"{k.split('/')[1]} {metric}", "higher") for k in bench_keys]:
        o, b, c, s = original.get(k), base.get(k), best.get(k), after_sft.get(k)
        if o is b is c is s is None:
            continue
        lines.append(
            f"| {label} ({better} is better) | {_fmt(o)} | {_fmt(b)} | {_fmt(c)} | {_delta(o, c)} | {_fmt(s)} | "
            f"{_delta(o, s)} |"
        )
    if sft:
        for k in sorted(set(sft.response_before) | set(sft.response_after)):
            lines.append(
                f"| {k} (held-out instructions) | | – | {_fmt(sft.response_before.get(k))} | | "
                f"{_fmt(sft.response_after.get(k))} | |"
            )
        lines += [
            "",
            f"SFT: {sft.examples} instruction pairs, {sft.heldout_examples} held out; "
            + (
                "passes the forgetting policy."
                if sft.accepted
                else "REJECTED by the forgetting policy: " + "; ".join(sft.reasons)
            ),
        ]
    rows = [("base", base, None), ("CPT (promoted)", best, cpt.best.numbers if cpt.best else None)]
    rows += [("SFT", after_sft, sft.numbers)] if sft else []
    return [*lines, "", *benchmark_section(original, rows, policy), "![checkpoints](checkpoints.png)", ""]


def _funnel_lines(clean: CleanManifest) -> list[str]:
    lines = [
        "## Data funnel",
        "",
        f"{clean.input_docs:,} documents in, {clean.kept_docs:,} kept.",
        "",
        "| source | kind | input | kept | dropped |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in clean.sources:
        lines.append(f"| {s.source} | {s.kind} | {s.input_docs:,} | {s.kept_docs:,} | {sum(s.dropped.values()):,} |")
    lines += ["", "| dropped because | documents |", "| --- | --- |"]
    lines += [f"| {r} | {n:,} |" for r, n in sorted(clean.dropped.items(), key=lambda kv: -kv[1])]
    return [*lines, "", "![funnel](funnel.png)", ""]


def _training_data_lines(tokenizer: TokenizerManifest, pack: PackManifest) -> list[str]:
    lines = [
        "## Training data",
        "",
        f"Tokenizer: +{tokenizer.new_tokens} domain tokens. Packed {pack.sequences:,} sequences of "
        f"{pack.seq_len} tokens; general replay {pack.general_fraction_realised:.2%} of tokens (attempt 0).",
        "",
    ]
    if pack.refresh is not None:
        r = pack.refresh
        lines += [
            f"Refresh: {r.new_documents:,} new domain documents ({r.new_tokens:,} tokens) and {r.replayed_documents:,} "
            f"earlier ones replayed ({r.replayed_tokens:,} tokens); held-out split fixed by the lineage.",
            "",
        ]
    return lines


def _attempt_lines(cpt: CptManifest) -> list[str]:
    """Every attempt (its settings, where it started or continued from) and every checkpoint's decision with the
    benchmark gate's p-values."""
    lines = ["## CPT attempts and decisions", ""]
    for a in cpt.attempts:
        origin = f"continuing from {a.continued_from}" if a.continued_from else f"from `{a.start_model}`"
        lines.append(
            f"- attempt {a.attempt}{' (base tokenizer)' if a.without_extension else ''}: lr {a.lr:.3g}, replay "
            f"{a.general_fraction:.3g}, "
            f"{origin}; "
            + (f"stopped at step {a.stopped_at}" if a.stopped_at is not None else "ran to the end")
            + (f"; best accepted step {a.best_step}" if a.best_step is not None else "; nothing promoted")
        )
        for d in a.decisions:
            p_values = ", ".join(f"{name} p={v:.3g}" for name, v in sorted(d.p_values().items()))
            if d.accepted:
                verdict = "accepted" + (" (does not beat the original base on the domain)" if d.trails_original else "")
            else:
                verdict = "REJECTED — " + "; ".join(d.reasons)
            lines.append(f"  - step {d.step}: {verdict}" + (f" (benchmark gate: {p_values})" if p_values else ""))
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_funnel(clean: CleanManifest, path: Path) -> None:
    """One horizontal bar per kind: kept documents (green), then one segment per drop reason (one colour each)."""
    plt = _pyplot()
    kinds = sorted({s.kind for s in clean.sources})
    reasons = sorted({r for s in clean.sources for r in s.dropped}, key=lambda r: -clean.dropped.get(r, 0))
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:gray",
        "tab:olive",
        "tab:cyan",
    ]
    colours = {r: palette[j % len(palette)] for j, r in enumerate(reasons)}  # green is "kept" only
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.6 * len(kinds)), dpi=100)
    for i, kind in enumerate(kinds):
        srcs = [s for s in clean.sources if s.kind == kind]
        left = sum(s.kept_docs for s in srcs)
        ax.barh(i, left, color="tab:green", label="kept" if i == 0 else None)
        for r in reasons:
            n = sum(s.dropped.get(r, 0) for s in srcs)
            if n:
                ax.barh(i, n, left=left, color=colours[r])
                left += n
    for r in reasons:  # one legend entry per reason, whichever kinds it occurs in
        ax.barh(0, 0, color=colours[r], label=f"dropped: {r} ({clean.dropped.get(r, 0):,})")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("documents")
    ax.xaxis.set_major_locator(plt.MaxNLocator(6, integer=True))
    ax.set_title(f"Data funnel: {clean.input_docs:,} documents in, {clean.kept_docs:,} kept")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _plot_checkpoints(cpt: CptManifest, path: Path) -> None:
    """Left: bits per byte (domain, general); right: general word perplexity. One x position per checkpoint of every
    attempt; the original base (the policy's reference) dashed, the extended base dotted; rejected checkpoints red x;
    the promoted one a star."""
    plt = _pyplot()
    points = [(a.attempt, d) for a in cpt.attempts for d in a.decisions]
    labels = [f"a{att}:{d.step}" for att, d in points]
    xs = list(range(len(points)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    panels = (
        (left, ("domain/bits_per_byte", "general/bits_per_byte"), "bits per byte"),
        (right, ("general/word_perplexity",), "general word perplexity"),
    )
    for ax, keys, ylabel in panels:
        for key, color in zip(keys, ("tab:blue", "tab:orange")):
            ys = [d.metrics.get(key, float("nan")) for _, d in points]
            ax.plot(xs, ys, "o-", color=color, label=key)
            if key in cpt.reference_metrics:
                ax.axhline(
                    cpt.reference_metrics[key], color=color, linestyle="--", alpha=0.7, label=f"original base {key}"
                )
            if key in cpt.base_metrics:
                ax.axhline(cpt.base_metrics[key], color=color, linestyle=":", alpha=0.7, label=f"extended base {key}")
            rejected = [(x, y) for x, y, (_, d) in zip(xs, ys, points) if not d.accepted]
            if rejected:
                ax.scatter(*zip(*rejected), marker="x", s=110, color="red", zorder=5)
            best = [
                (x, y)
                for x, y, (att, d) in zip(xs, ys, points)
                if att == cpt.attempt and d.step == cpt.best_step and cpt.promoted
            ]
            if best:
                ax.scatter(*zip(*best), marker="*", s=220, color="gold", edgecolor="k", zorder=6)
        ax.set_xticks(xs, labels, rotation=45, fontsize=7)
        ax.set_xlabel("attempt:step (red x: rejected, star: promoted)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Forgetting evaluation per checkpoint")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
