"""The `dapt` command line. Every command takes --json: its last stdout line is then one JSON object.

Human output (progress, tables) goes to stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dapt_core.config import ConfigError, DaptConfig, load_config
from flows import interrupt, progress

app = typer.Typer(help="dapt: domain-adaptive continual pretraining without forgetting.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

ConfigArg = typer.Argument(..., exists=False, help="Path to the YAML config (see examples/config.yaml).")
JsonOpt = typer.Option(False, "--json", help="Print the stage manifest as one JSON object on the last stdout line.")


@contextmanager
def _user_errors(as_json: bool):
    """Bad input (a missing path, an unreadable eval set, a bad model setting, a corrupted artifact) ends with one
    `error:` line and exit code 2 instead of a traceback; with --json the last stdout line is {"error": ...}."""
    from dapt_core.store import IntegrityError

    try:
        yield
    except (ConfigError, FileNotFoundError, ValueError, IntegrityError, OSError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        if as_json:
            sys.stdout.write(json.dumps({"error": str(e)}) + "\n")
        raise typer.Exit(2) from None


def _load(path: Path) -> DaptConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def _emit(obj, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj.model_dump(mode="json"), separators=(",", ":")) + "\n")
        sys.stdout.flush()


@app.command()
def prepare(
    config: Path = ConfigArg,
    as_json: bool = JsonOpt,
    refresh: bool = typer.Option(False, "--refresh", help="Ignore cached results and recompute every stage."),
) -> None:
    """Ingest, clean, filter, deduplicate and decontaminate the corpora; write per-source stats."""
    with _user_errors(as_json), interrupt.stoppable_command():
        result = _run_prepare(_load(config), refresh)
    _emit(result, as_json)


def _run_prepare(cfg: DaptConfig, refresh: bool):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.prepare import prepare_flow

    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: refresh}), progress.bars(console):
        result = prepare_flow(cfg)
    _print_funnel(result.clean)
    console.print(f"computed {len(result.computed)} task(s), {len(result.cached)} from cache; stats: {result.clean.stats_md.uri}")
    return result


def _print_funnel(cm) -> None:
    table = Table(title=f"Data funnel: {cm.input_docs:,} documents in, {cm.kept_docs:,} kept", title_justify="left")
    for col in ("source", "kind", "input", "kept", "dropped", "est. tokens kept"):
        table.add_column(col, justify="left" if col in ("source", "kind") else "right")
    for s in cm.sources:
        table.add_row(s.source, s.kind, f"{s.input_docs:,}", f"{s.kept_docs:,}", f"{sum(s.dropped.values()):,}", f"{s.kept_est_tokens:,}")
    console.print(table)
    reasons = Table(title="Dropped, by reason", title_justify="left")
    reasons.add_column("reason")
    reasons.add_column("docs", justify="right")
    for reason, n in sorted(cm.dropped.items(), key=lambda kv: -kv[1]):
        reasons.add_row(reason, f"{n:,}")
    console.print(reasons)


@app.command()
def pack(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """Prepare the data (cached), extend the tokenizer, and pack the mixed domain + replay training corpus."""
    with _user_errors(as_json), interrupt.stoppable_command():
        result = _run_training_data(_load(config))
    _emit(result, as_json)


def _run_training_data(cfg: DaptConfig):
    from flows.training_data import training_data_flow

    with progress.bars(console):
        result = training_data_flow(cfg)
    _print_funnel(result.prepare.clean)
    p, t = result.pack, result.tokenizer
    console.print(f"tokenizer: +{t.new_tokens} domain tokens (report: {t.report_md.uri})")
    console.print(
        f"packed {p.sequences:,} sequences of {p.seq_len} tokens in {len(p.train_shards)} shard(s); "
        f"general share {p.general_fraction_realised:.2%} (target {p.general_fraction_target:.2%})"
    )
    console.print(f"held-out eval sets: {p.eval_domain.uri if p.eval_domain else '-'}, {p.eval_general.uri if p.eval_general else '-'}")
    console.print(f"computed {len(result.computed)} task(s), {len(result.cached)} from cache")
    return result


@app.command()
def plan(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """Count domain/general tokens, warn against the rules of thumb, and estimate GPU-hours."""
    with _user_errors(as_json), interrupt.stoppable_command():
        report = _run_plan(_load(config))
    _emit(report, as_json)


def _run_plan(cfg: DaptConfig):
    from dapt_core import plan as planning

    texts = planning.corpus_texts(cfg)
    report = planning.build_plan(cfg, texts.domain, texts.general, texts.counted_on)
    console.print(f"Counted on the {report.counted_on} with the {report.token_counter}.")
    console.print(f"domain tokens: {report.domain_tokens:,}   general tokens: {report.general_tokens:,}   replay fraction: {report.general_fraction:.1%}")
    if report.compute:
        c = report.compute
        console.print(f"[bold]~{c.gpu_hours:.3g} GPU-hours[/bold] on {c.gpu} ({c.flops:.3g} FLOPs). Assumptions:")
        for a in c.assumptions:
            console.print(f"  - {a}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return report


@app.command()
def cpt(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """Training data (cached), base evaluation, then CPT with checkpoint-by-checkpoint forgetting checks and rollback."""
    with _user_errors(as_json), interrupt.stoppable_command():
        from flows.cpt import cpt_flow

        with progress.bars(console):
            result = cpt_flow(_load(config))
        _print_cpt(result)
        console.print(f"report: {result.report_md.uri}")
    _emit(result, as_json)


def _print_cpt(result) -> None:
    table = Table(title="CPT checkpoints (forgetting policy vs the base)", title_justify="left")
    for col in ("attempt", "lr", "replay", "step", "domain bpb", "general word ppl", "decision"):
        table.add_column(col)
    base = result.base_metrics
    table.add_row("base", "", "", "", f"{base.get('domain/bits_per_byte', float('nan')):.4f}", f"{base.get('general/word_perplexity', float('nan')):.4g}", "reference")
    for a in result.attempts:
        for d in a["decisions"]:
            m = d["metrics"]
            table.add_row(
                str(a["attempt"]), f"{a['lr']:.3g}", f"{a['general_fraction']:.3g}", str(d["step"]),
                f"{m.get('domain/bits_per_byte', float('nan')):.4f}", f"{m.get('general/word_perplexity', float('nan')):.4g}",
                "accepted" if d["accepted"] else "[red]REJECTED[/red]: " + "; ".join(d["reasons"]),
            )
    console.print(table)
    if result.promoted:
        console.print(f"promoted: attempt {result.attempt}, step {result.best_step} -> {result.promoted.uri}")
    else:
        console.print("[yellow]nothing promoted:[/yellow] no checkpoint passed the forgetting policy (see the report)")


@app.command()
def run(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """The whole pipeline: data → tokenizer → packing → CPT + forgetting eval + rollback → SFT → report.

    Finished stages are cached in the store: after a failure, running this again recomputes only from the failed stage."""
    with _user_errors(as_json), interrupt.stoppable_command():
        result = _run_pipeline(_load(config))
    _emit(result, as_json)


def _run_pipeline(cfg: DaptConfig):
    from flows.dapt_pipeline import dapt_pipeline

    with progress.bars(console):
        result = dapt_pipeline(cfg)
    _print_funnel(result.data.prepare.clean)
    _print_cpt(result.cpt)
    if result.sft:
        s = result.sft
        console.print(
            f"SFT on {s.examples} pairs: held-out response loss {s.response_before.get('sft/response_loss', float('nan')):.4f} -> "
            f"{s.response_after.get('sft/response_loss', float('nan')):.4f}; "
            + ("passes the forgetting policy" if s.accepted else "[red]rejected[/red]: " + "; ".join(s.reasons))
        )
    console.print(f"computed {len(result.data.computed)} data task(s), {len(result.data.cached)} from cache")
    console.print(f"[bold]report:[/bold] {result.report_md.uri}")
    console.print(f"[bold]model:[/bold] {result.final_model.uri if result.final_model else 'none promoted'}")
    return result


@app.command()
def demo(
    workdir: Path = typer.Option(Path("dapt-demo"), help="Where the demo writes its config and artifact store."),
    as_json: bool = JsonOpt,
) -> None:
    """The whole pipeline offline on bundled real medical text with SmolLM2-135M (about 15-20 min on 2 CPU cores)."""
    from dapt_core.demo import demo_config

    with _user_errors(as_json), interrupt.stoppable_command():
        config_path = demo_config(workdir.resolve())
        console.print(f"Demo config: {config_path}")
        result = _run_pipeline(_load(config_path))
    console.print(
        f"[bold]Done.[/bold]\n  report: {result.report_md.uri}\n  promoted CPT model: "
        f"{result.cpt.promoted.uri if result.cpt.promoted else 'none'}\n"
        f"  SFT model: {result.sft.model.uri if result.sft else 'none'}\n  config (edit and `dapt run` it): {config_path}"
    )
    _emit(result, as_json)


@app.command()
def serve(config: Path = ConfigArg) -> None:
    """Serve dapt-pipeline (on demand) and nightly-refresh (deploy.cron) on the Prefect server at PREFECT_API_URL.

    Blocks, running the deployments' flow runs, until interrupted; needs a real server (`prefect server start`).
    """
    from flows.serve import serve as serve_deployments

    with _user_errors(False):
        serve_deployments(_load(config), str(config))


if __name__ == "__main__":
    app()
