"""The Markdown summary of a tokenizer extension (dapt_core/tokenizer_ext.py `extend`): what was added, tokens
per word, round trips, bits per byte before training and the initial cost, from the extension's report dict."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dapt_core.manifest import ExtensionCost

if TYPE_CHECKING:
    from dapt_core.metrics import NLLStats


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(report: dict, top: int = 40) -> str:
    lines = ["## Tokenizer extension", ""]
    if not report.get("changed"):
        lines.append(f"Base tokenizer kept unchanged: {report.get('reason')}.")
        if report.get("rejected"):
            lines += [
                "",
                "Rejected domain tokens: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["rejected"].items())),
            ]
        return "\n".join(lines) + "\n"
    lines.append(
        f"Added {len(report['new_tokens'])} domain tokens ({report['added_vocab_entries']} vocabulary entries, "
        f"{len(report['intermediate_tokens'])} of them intermediate merge tokens) out of {report['candidates']} "
        "candidates; "
        f"estimated saving on the training corpus: {report['estimated_tokens_saved_on_train']:,} tokens."
    )
    tpw = report.get("tokens_per_word_heldout")
    if tpw:
        lines.append(
            f"Tokens per word on held-out domain text: {_fmt(tpw['before'], '.3f')} -> {_fmt(tpw['after'], '.3f')} "
            f"({tpw['reduction']:.1%} fewer)."
        )
    rt = report.get("roundtrip")
    if rt:
        lines.append(
            f"Round trip on {rt['texts']} held-out texts: {rt['same_as_base']} decode exactly as with the base "
            "tokenizer "
            f"({rt['exact_extended']} reproduce the input byte for byte; base: {rt['exact_base']})."
        )
    bpb = report.get("bits_per_byte_heldout")
    if bpb:
        lines += [
            "",
            f"Bits per byte on {bpb['eval_docs']} held-out domain docs ({bpb['eval_bytes']:,} bytes), before any "
            "training:",
            "",
            "| model | bits/byte |",
            "| --- | --- |",
            f"| base model, base tokenizer | {_fmt(bpb['base'])} |",
            f"| extended, mean-of-pieces init | {_fmt(bpb['mean_init'])} |",
            f"| extended, library default init | {_fmt(bpb['default_init'])} |",
        ]
        if bpb["init"] != "mean":
            lines.append(f"| extended, {bpb['init']} init (used) | {_fmt(bpb['extended'])} |")
        lines += ["", f"Of mean-of-pieces and library default, better: **{bpb['better_init'].replace('_', ' ')}**."]
    cost = report.get("initial_cost")
    if cost:
        lines.append(
            f"Initial cost of the extension ({cost['init']} init, before training): domain bpb "
            f"{_fmt(cost['domain_bpb_original'])} -> {_fmt(cost['domain_bpb_extended'])} "
            f"({cost['domain_bpb_extended'] / cost['domain_bpb_original'] - 1:+.1%})"
            + (
                f", general bpb {_fmt(cost['general_bpb_original'])} -> {_fmt(cost['general_bpb_extended'])} "
                f"({cost['general_bpb_extended'] / cost['general_bpb_original'] - 1:+.1%}) "
                f"on {cost['general_docs']} docs."
                if cost["general_bpb_original"]
                else "."
            )
        )
    emb = report.get("embedding") or {}
    if emb.get("repaired"):
        lines.append("Embedding guard repaired: " + "; ".join(emb["repaired"]) + ".")
    lines += ["", "| token | frequency | base pieces | saving |", "| --- | --- | --- | --- |"]
    for c in report["new_tokens"][:top]:
        pieces = " ".join(f"`{p}`" for p in c["pieces"])
        lines.append(f"| `{c['text']}` | {c['frequency']:,} | {pieces} | {c['saving']:,} |")
    if len(report["new_tokens"]) > top:
        lines.append(f"| ... {len(report['new_tokens']) - top} more | | | |")
    return "\n".join(lines) + "\n"


def bpb_report(
    init: str,
    docs: int,
    base: NLLStats,
    extended: NLLStats,
    mean: NLLStats,
    default: NLLStats,
    general_docs: int,
    base_general: NLLStats | None,
    extended_general: NLLStats | None,
) -> tuple[dict, ExtensionCost]:
    """The held-out domain bpb table of the report, and the extension's initial cost (general: when measured)."""
    bpb = {
        "eval_docs": docs,
        "eval_bytes": base.bytes,
        "base": base.bits_per_byte,
        "extended": extended.bits_per_byte,
        "init": init,
        "mean_init": mean.bits_per_byte,
        "default_init": default.bits_per_byte,
        "tokens_base": base.tokens,
        "tokens_extended": extended.tokens,
    }
    bpb["better_init"] = "mean_init" if bpb["mean_init"] < bpb["default_init"] else "default_init"
    cost = ExtensionCost(
        init=init,
        domain_docs=docs,
        domain_bpb_original=base.bits_per_byte,
        domain_bpb_extended=extended.bits_per_byte,
        general_docs=general_docs,
        general_bpb_original=base_general.bits_per_byte if base_general else None,
        general_bpb_extended=extended_general.bits_per_byte if extended_general else None,
    )
    return bpb, cost
