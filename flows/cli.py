"""The `dapt` command line. Every command takes --json: its last stdout line is then one JSON object.

Human output (progress, tables) goes to stderr, so stdout stays machine-readable. Logs (Prefect's task and flow
logs, warnings, tracebacks) go to a log file per command, `$DAPT_LOG_DIR/<command>-<UTC time>-<pid>.log`
(default `~/.cache/dapt/logs`), not to the terminal (`dapt --verbose` shows them there too); a failure ends with
one `error:` line that names the log file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dapt.flows import interrupt
from dapt.tasks import progress
from dapt_core.config import ConfigError, DaptConfig, load_config
from dapt_core.faults import classify
from dapt_core.manifest import CptManifest, PrepareManifest, TrainingDataManifest
from dapt_core.report import gain_lines

# Prefect's temporary server gets 20 s to start by default; on a loaded 2-core machine it once needed more, and the
# command then failed with nothing wrong. The user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

app = typer.Typer(
    help="dapt: domain-adaptive continual pretraining without forgetting.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True)
log = logging.getLogger("dapt")
KEEP_LOGS = 100  # log files kept in the log folder; older ones are removed

ConfigArg = typer.Argument(..., exists=False, help="Path to the YAML config (see examples/config.yaml).")
JsonOpt = typer.Option(False, "--json", help="Print the stage manifest as one JSON object on the last stdout line.")


class _Invocation:
    """What the top-level options said for this run of `dapt` (set by `main`, read by `_user_errors`)."""

    command = "dapt"
    verbose = False


@app.callback()
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show Prefect's logs and tracebacks on the terminal."
    ),
) -> None:
    _Invocation.command, _Invocation.verbose = ctx.invoked_subcommand or "dapt", verbose


@contextmanager
def _user_errors(as_json: bool, terminal_logs: bool = False):
    """Run a command with its logs in a log file (and on the terminal with `terminal_logs` or --verbose), and end
    with a `log:` line naming that file, or, on a failure, with one `error:` line and the file.

    Expected failures (bad config or input, a corrupted artifact, an unreachable or refusing store, a full disk)
    exit with code 2, anything else with 1; with --json the last stdout line is {"error": ..., "log": ...}.
    Prefect wraps a failed task's exception in its flow's failure: the message comes from the root cause."""
    log_path, why_no_log = _new_log_file(_Invocation.command)
    with _logging_to(log_path, terminal_logs or _Invocation.verbose):
        try:
            yield
        except typer.Exit:
            raise
        except Exception as e:
            code, message = _describe(e)
            log.error("%s", message, exc_info=e)
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            console.print(f"details: {escape(str(log_path or why_no_log))}", highlight=False, soft_wrap=True)
            if as_json:
                sys.stdout.write(json.dumps({"error": message, "log": str(log_path) if log_path else None}) + "\n")
                sys.stdout.flush()
            raise typer.Exit(code) from None
        if log_path:  # on stderr, like the rest of the console: --json keeps stdout to its one JSON line
            console.print(f"[dim]log: {escape(str(log_path))}[/dim]", highlight=False, soft_wrap=True)


def _describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one-paragraph message) for a command's failure."""
    from dapt_core.store import IntegrityError

    store_error = classify(e)
    if store_error is not None:
        return 2, str(store_error)
    if isinstance(e, (ConfigError, FileNotFoundError, ValueError, IntegrityError, OSError)):
        return 2, str(e)
    return 1, f"unexpected {type(e).__name__}: {e} (the log file has the traceback)"


def _new_log_file(command: str) -> tuple[Path | None, str]:
    """A fresh log file in $DAPT_LOG_DIR (default ~/.cache/dapt/logs), the oldest beyond KEEP_LOGS removed;
    (None, why) when it cannot be created (a full or read-only disk must not hide the real error)."""
    folder = Path(os.environ.get("DAPT_LOG_DIR") or Path.home() / ".cache" / "dapt" / "logs").expanduser()
    path = folder / f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.touch()
        for old in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP_LOGS]:
            old.unlink(missing_ok=True)
    except OSError as e:
        return None, f"no log file ({e})"
    return path, ""


@contextmanager
def _logging_to(path: Path | None, verbose: bool) -> Iterator[None]:
    """Send Prefect's loggers, warnings and our own log to `path`; unless `verbose`, take Prefect's console
    handlers off the terminal meanwhile (a failing run would otherwise print a traceback per task and retry)."""
    import prefect  # noqa: F401  (configures Prefect's logging, which is then redirected)

    file_handler = logging.FileHandler(path, encoding="utf-8") if path else logging.NullHandler()
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(threadName)s %(name)s - %(message)s"))
    names = [None, *logging.root.manager.loggerDict]
    loggers = [
        logging.getLogger(n)
        for n in names
        if n is None or isinstance(logging.root.manager.loggerDict[n], logging.Logger)
    ]
    consoles = [
        (logger, h)
        for logger in loggers
        for h in logger.handlers
        if type(h).__module__.startswith("prefect.logging") and isinstance(h, logging.StreamHandler)
    ]
    extra = list({logger for logger, _ in consoles if not logger.propagate})  # prefect._internal, uvicorn: the file too
    removed = [] if verbose else consoles
    for logger, h in removed:
        logger.removeHandler(h)
    for logger in [logging.root, *extra]:
        logger.addHandler(file_handler)
    level, raise_exceptions = log.level, logging.raiseExceptions
    log.setLevel(logging.INFO)
    logging.raiseExceptions = False  # a full disk makes the log file fail: say nothing rather than a traceback
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logging.raiseExceptions = raise_exceptions
        log.setLevel(level)
        for logger in [logging.root, *extra]:
            logger.removeHandler(file_handler)
        for logger, h in removed:
            logger.addHandler(h)
        file_handler.close()


def _load(path: Path) -> DaptConfig:
    """The validated config, after checking that its store can be used with the configured credentials (an
    unreachable or refusing S3 store fails here, in seconds, rather than after Prefect has started)."""
    from dapt.tasks.credentials import use_store_credentials
    from dapt_core.store import open_store

    cfg = load_config(path)
    use_store_credentials(cfg)
    open_store(cfg.store).check_reachable()
    return cfg


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


def _stages(result: PrepareManifest | TrainingDataManifest) -> str:
    """Which stages did work and which came from earlier runs, in one line."""
    return f"computed: {', '.join(result.computed) or '-'}; from earlier runs: {', '.join(result.cached) or '-'}"


def _run_prepare(cfg: DaptConfig, refresh: bool):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from dapt.flows.prepare import prepare_flow

    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: refresh}), progress.bars(console):
        result = prepare_flow(cfg)
    _print_funnel(result.clean)
    console.print(
        f"{result.files_read} file(s) read, {result.files_reused} reused; {_stages(result)}; "
        f"stats: {result.clean.stats_md.uri}"
    )
    return result


def _print_funnel(cm) -> None:
    table = Table(title=f"Data funnel: {cm.input_docs:,} documents in, {cm.kept_docs:,} kept", title_justify="left")
    for col in ("source", "kind", "input", "kept", "dropped", "est. tokens kept"):
        table.add_column(col, justify="left" if col in ("source", "kind") else "right")
    for s in cm.sources:
        table.add_row(
            s.source,
            s.kind,
            f"{s.input_docs:,}",
            f"{s.kept_docs:,}",
            f"{sum(s.dropped.values()):,}",
            f"{s.kept_est_tokens:,}",
        )
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
    from dapt.flows.training_data import training_data_flow

    with progress.bars(console):
        result = training_data_flow(cfg)
    _print_funnel(result.prepare.clean)
    p, t = result.pack, result.tokenizer
    console.print(f"tokenizer: +{t.new_tokens} domain tokens (report: {t.report_md.uri})")
    console.print(
        f"packed {p.sequences:,} sequences of {p.seq_len} tokens in {len(p.train_shards)} shard(s); "
        f"general share {p.general_fraction_realised:.2%} (target {p.general_fraction_target:.2%})"
    )
    console.print(
        f"held-out eval sets: {p.eval_domain.uri if p.eval_domain else '-'}, "
        f"{p.eval_general.uri if p.eval_general else '-'}"
    )
    for w in p.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(_stages(result))
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
    console.print(
        f"domain tokens: {report.domain_tokens:,}   general tokens: "
        f"{report.general_tokens:,}   replay fraction: {report.general_fraction:.1%}"
    )
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
    """Training data (cached), base evaluation, then CPT with checkpoint-by-checkpoint forgetting checks and
    rollback."""
    with _user_errors(as_json), interrupt.stoppable_command():
        from dapt.flows.cpt import cpt_flow

        with progress.bars(console):
            result = cpt_flow(_load(config))
        _print_cpt(result)
        console.print(f"report: {result.report_md.uri}")
    _emit(result, as_json)


def _print_cpt(result: CptManifest) -> None:
    table = Table(title="CPT checkpoints (forgetting policy vs the original base)", title_justify="left")
    for col in ("attempt", "lr", "replay", "step", "domain bpb", "general word ppl", "decision"):
        table.add_column(col)
    base = result.reference_metrics
    table.add_row(
        "original base",
        "",
        "",
        "",
        f"{base.get('domain/bits_per_byte', float('nan')):.4f}",
        f"{base.get('general/word_perplexity', float('nan')):.4g}",
        "reference",
    )
    for a in result.attempts:
        for d in a.decisions:
            m = d.metrics
            table.add_row(
                str(a.attempt),
                f"{a.lr:.3g}",
                f"{a.general_fraction:.3g}",
                str(d.step),
                f"{m.get('domain/bits_per_byte', float('nan')):.4f}",
                f"{m.get('general/word_perplexity', float('nan')):.4g}",
                ("accepted" + (" (does not beat the original base on the domain)" if d.trails_original else ""))
                if d.accepted
                else "[red]REJECTED[/red]: " + escape("; ".join(d.reasons)),
            )
    console.print(table)
    lines = gain_lines(result.gain)  # ends with the outcome: promoted, or why not
    for line in lines:
        console.print(escape(line))
    if result.promoted:
        console.print(f"promoted: attempt {result.attempt}, step {result.best_step} -> {result.promoted.uri}")
    elif not lines:  # no original base to compare with: gain_lines said nothing
        verdict = result.gain.verdict if result.gain else "nothing accepted"
        console.print(
            f"[yellow]nothing promoted ({verdict}):[/yellow] "
            + escape("; ".join(result.gain.reasons if result.gain else []))
        )


def _print_benchmarks(cpt, sft, cfg: DaptConfig) -> None:
    """Each benchmark's accuracy ± the half-width of its 95% Wilson interval: the original base, the promoted
    checkpoint and the SFT model, with the gate's exact McNemar p-value against the base (general benchmarks, *)."""
    from dapt_core.benchmarks import wilson_interval

    if not cfg.eval.benchmarks:
        return
    m = cfg.eval.benchmark_metric
    columns = [("original base", cpt.reference_metrics, {})]
    if cpt.best is not None:
        columns.append((f"CPT step {cpt.best.step}", cpt.best.metrics, cpt.best.numbers))
    if sft is not None:
        columns.append(("SFT", sft.eval_metrics, sft.numbers))
    table = Table(
        title=f"Benchmarks ({m} ± 95% interval; * gated: p = exact McNemar vs the base)", title_justify="left"
    )
    for col in ("benchmark", "n", *(label for label, _, _ in columns)):
        table.add_column(col, justify="left" if col == "benchmark" else "right", no_wrap=True)
    for b in cfg.eval.benchmarks:
        cells = []
        for _, metrics, numbers in columns:
            acc, n = metrics.get(f"bench/{b.name}/{m}"), int(metrics.get(f"bench/{b.name}/n", 0))
            if acc is None or not n:
                cells.append("–")
                continue
            lo, hi = wilson_interval(round(acc * n), n)
            p = numbers.get(f"p_value bench/{b.name}")
            cells.append(f"{acc:.3f} ±{max(acc - lo, hi - acc):.2f}" + (f" p={p:.2g}" if p is not None else ""))
        n_items = int(cpt.reference_metrics.get(f"bench/{b.name}/n", 0))
        table.add_row(b.name + ("*" if b.kind == "general" else ""), str(n_items), *cells)
    console.print(table)


@app.command()
def run(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """The whole pipeline: data → tokenizer → packing → CPT + forgetting eval + rollback → SFT → report.

    Finished stages are cached in the store: after a failure, running this again recomputes only from the failed
    stage."""
    with _user_errors(as_json), interrupt.stoppable_command():
        result = _run_pipeline(_load(config))
    _emit(result, as_json)


def _run_pipeline(cfg: DaptConfig):
    from dapt.flows.dapt_pipeline import dapt_pipeline

    with progress.bars(console):
        result = dapt_pipeline(cfg)
    _print_funnel(result.data.prepare.clean)
    _print_cpt(result.cpt)
    _print_benchmarks(result.cpt, result.sft, cfg)
    if result.sft:
        s = result.sft
        console.print(
            f"SFT on {s.examples} pairs: held-out response loss "
            f"{s.response_before.get('sft/response_loss', float('nan')):.4f} -> "
            f"{s.response_after.get('sft/response_loss', float('nan')):.4f}; "
            + ("passes the forgetting policy" if s.accepted else "[red]rejected[/red]: " + "; ".join(s.reasons))
        )
    console.print(f"data stages {_stages(result.data)}")
    console.print(f"[bold]report:[/bold] {result.report_md.uri}")
    console.print(f"[bold]model:[/bold] {result.final_model.uri if result.final_model else 'none promoted'}")
    return result


@app.command()
def demo(
    workdir: Path = typer.Option(Path("dapt-demo"), help="Where the demo writes its config and artifact store."),
    config_only: bool = typer.Option(
        False, "--config-only", help="Write the demo's config (e.g. for `dapt serve`) and stop."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """The whole pipeline offline on bundled real medical text with SmolLM2-135M (about 15-20 min on 2 CPU cores)."""
    from dapt_core.demo import demo_config

    with _user_errors(as_json), interrupt.stoppable_command():
        config_path = demo_config(workdir.resolve())
        console.print(f"Demo config: {config_path}")
        if config_only:
            return
        result = _run_pipeline(_load(config_path))
    console.print(
        f"[bold]Done.[/bold]\n  report: {result.report_md.uri}\n  promoted CPT model: "
        f"{result.cpt.promoted.uri if result.cpt.promoted else 'none'}\n  SFT model: "
        f"{result.sft.model.uri if result.sft else 'none'}\n  config (edit and `dapt run` it): {config_path}"
    )
    _emit(result, as_json)


@app.command()
def verify(config: Path = ConfigArg, as_json: bool = JsonOpt) -> None:
    """Hash every artifact of the project's last runs, say which cached stages the next run recomputes, and find result
    records a run would refuse. Exit code 2 when anything is missing, damaged or untrusted."""
    with _user_errors(as_json):
        report = _run_verify(_load(config))
    _emit(report, as_json)
    if not report.ok:
        raise typer.Exit(2)


def _run_verify(cfg: DaptConfig):
    from dapt.tasks.caching import result_kind, verify_store
    from dapt_core import layout
    from dapt_core.manifest import PipelineManifest, RunState
    from dapt_core.store import open_store

    store = open_store(cfg.store)
    latest = {
        "prepare": PrepareManifest,
        "training-data": TrainingDataManifest,
        "cpt": CptManifest,
        "pipeline": PipelineManifest,
    }
    runs = {layout.latest_manifest_key(cfg.project, stage): model for stage, model in latest.items()}
    runs |= {
        key: RunState for key in store.list(layout.lineages_prefix(cfg.project)) if key.endswith("/last-success.json")
    }
    runs |= {key: CptManifest for key in store.list(layout.cpt_results_prefix(cfg.project))}
    report = verify_store(cfg.store, cfg.project, runs)
    action = {
        "stale": "the next run recomputes this stage",
        "damaged": "delete the damaged file(s); the next run then recomputes this stage",
        "untrusted": "not written by dapt, never loaded: inspect it, then delete it or recompute with --refresh",
    }
    intact = collections.Counter(result_kind(c.name) or c.name for c in report.checks if c.status == "ok")
    console.print(
        "ok: " + (", ".join(f"{name} ×{n}" for name, n in sorted(intact.items())) or "nothing"),
        soft_wrap=True,
        highlight=False,
    )
    for c in report.checks:
        if c.status != "ok":
            console.print(f"[red]{c.status}[/red]: {c.uri}: {action[c.status]}", soft_wrap=True, highlight=False)
            for problem in c.problems:
                console.print(f"  {problem}", soft_wrap=True, highlight=False)
    broken = sum(c.status != "ok" for c in report.checks)
    if not report.checks:
        console.print(f"nothing to verify: no run of project {cfg.project!r} in {report.store} yet", highlight=False)
    console.print(
        f"{len(report.checks)} manifest(s), {report.artifacts} artifact(s) in {report.store}: "
        + (f"[red]{broken} broken[/red]" if broken else "all intact"),
        soft_wrap=True,
        highlight=False,
    )
    return report


@app.command()
def serve(config: Path = ConfigArg) -> None:
    """Serve dapt-pipeline (on demand) and nightly-refresh (deploy.cron) on the Prefect server at PREFECT_API_URL.

    Blocks, running the deployments' flow runs, until interrupted; needs a real server (`prefect server start`).
    """
    from dapt.flows.serve import serve as serve_deployments

    with _user_errors(False, terminal_logs=True):  # a server's output is its log
        serve_deployments(_load(config), str(config))


@app.command()
def deploy(
    config: Path = ConfigArg,
    pool: str = typer.Option("cpu", help="Work pool of dapt-pipeline and nightly-refresh."),
    gpu_pool: str = typer.Option(
        "gpu", help="Work pool of dapt-cpt (the CPT stage; docker/start-worker.sh's default)."
    ),
) -> None:
    """Register dapt-pipeline, nightly-refresh and dapt-cpt on work pools of the Prefect server at PREFECT_API_URL.

    Names, tags, schedule and concurrency come from the config, as with `dapt serve`; workers run the flow runs
    (`prefect worker start --pool cpu`; on the GPU machine docker/start-worker.sh). Also saves a standard result
    storage block on the store that a worker may take as its default (for its other flows' persisted results)."""
    from dapt.flows.serve import deploy_to_pools
    from dapt.tasks.caching import worker_result_storage

    with _user_errors(False):
        cfg = _load(config)
        for line in deploy_to_pools(cfg, pool, gpu_pool, str(config)):
            console.print(f"deployed {line}")
        default = worker_result_storage(cfg.store, cfg.aws_credentials_block, f"dapt-flow-results-{cfg.project}")
        console.print(
            f"workers' default result storage (optional): PREFECT_DEFAULT_RESULT_STORAGE_BLOCK={default}",
            soft_wrap=True,
        )
        expected = f"dapt-cpt/{cfg.project}"
        if cfg.deploy.cpt_deployment != expected:
            console.print(
                "note: the pipeline runs CPT itself; set deploy.cpt_deployment: "
                f"{expected} to run it on pool {gpu_pool!r}"
            )


if __name__ == "__main__":
    app()
