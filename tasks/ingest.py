"""Prefect tasks of the ingest stage: discover the input files, then read them in batches (one task per batch).

Its own module, because the task module is part of the stage's code version: an edit to the clean task must not make
every user read their whole corpus again."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

import dapt_core.discovery as discovery
import dapt_core.ingest_batches as ingest_batches
from dapt.tasks.caching import check_result_record, refresh_requested
from dapt.tasks.retries import retry_if_worthwhile
from dapt_core import layout
from dapt_core.clean.decontam import require_complete_eval_sets
from dapt_core.config import DataConfig, IngestConfig, PrepareConfig
from dapt_core.engine import open_engine
from dapt_core.fingerprints import FingerprintMemo
from dapt_core.hashing import code_version, stable_hash
from dapt_core.input_files import InputFiles, input_rows
from dapt_core.manifest import IngestBatchManifest, InputFile, QuarantineRecord
from dapt_core.store import ArtifactStore, open_store

log = logging.getLogger("dapt.ingest")

# The task module itself is part of the code version: a custom cache key replaces Prefect's task-source hash.
INGEST_CODE = code_version(ingest_batches.run_batch, task_module=sys.modules[__name__])


def ingest_keys(batch: Sequence[InputFile], cfg: IngestConfig) -> list[str]:
    """Each file's cache key: a later batch holding the file with this key reuses its rows. The settings that shape a
    file's rows, hashed once; each file's fields as a JSON row (a model dump per file cost ~10 us, for every file a
    batch reads)."""
    settings = stable_hash(cfg.model_dump(exclude={"batch_bytes", "batch_files"}), INGEST_CODE)
    rows = (json.dumps(row) for row in input_rows(batch))
    return ["ingest-" + hashlib.sha256(f"{settings}\n{row}".encode()).hexdigest() for row in rows]


def ingest_batch_key(batch: Sequence[InputFile], cfg: IngestConfig) -> str:
    """A batch's cache key: every field of its files, as JSON rows (a model dump per file cost ~3 ms a batch, paid
    for every batch of every run: a refresh looks up each batch's key), hashed before it joins the settings (inside
    stable_hash's JSON the rows would be escaped once more: 0.5 us a file, and the key is made three times a run).
    The same key from the models a task is given and from the discovered columns (`InputFiles`) the flow plans on."""
    files = json.dumps(list(input_rows(batch)))
    return "ingest-batch-" + stable_hash(hashlib.sha256(files.encode()).hexdigest(), cfg, INGEST_CODE)


@task(name="discover-inputs", cache_policy=NO_CACHE)
def discover_task(
    data: DataConfig, store_uri: str | None = None, memo_key: str | None = None
) -> tuple[InputFiles, InputFiles, list[QuarantineRecord]]:
    """List and fingerprint every input file. Never cached: it is how new or changed files are seen. With a store
    and `memo_key`, a local file unchanged since its last hashing (size, mtime, inode) is not read again."""
    store = memo = None
    if store_uri and memo_key:
        if storing := _storing.get((store_uri, memo_key)):
            storing.join()  # the memo of a discovery just before, in this process (nightly-refresh, then its prepare)
        store = open_store(store_uri)
        memo = FingerprintMemo.from_parquet(store.read_key(memo_key)) if store.exists(memo_key) else FingerprintMemo()
    found = {kind: InputFiles.of([]) for kind in ("domain", "general", "eval")}
    refused: list[QuarantineRecord] = []
    for kind, sources in (("domain", data.domain), ("general", data.general), ("eval", data.eval)):
        for source in sources:
            files, bad = discovery.discover_inputs(source, kind, memo)
            found[kind] = found[kind] + files
            refused += bad
    if store and memo and memo.changed:
        _storing[(store_uri, memo_key)] = _store_in_background(store, memo, memo_key)
    require_complete_eval_sets(refused)
    inputs, evals = found["domain"] + found["general"], found["eval"]
    return inputs, evals, refused


# The memo writes this process started, by (store, key): a discovery reading a memo waits for the write of the last.
_storing: dict[tuple[str, str], threading.Thread] = {}


def _store_in_background(store: ArtifactStore, memo: FingerprintMemo, key: str) -> threading.Thread:
    """Store the fingerprint memo on another thread while the run goes on: serialising and storing it took 0.3 s of a
    refresh of 100,000 files (Parquet writing, file I/O and hashing release the GIL). The memo only saves time, so a
    failure costs the next run its hashing and is a warning; the thread is no daemon, so the process waits for it."""

    def store_memo() -> None:
        try:
            store.put_bytes(memo.to_parquet(), key)
        except Exception as e:
            log.warning("could not store the input fingerprints at %s (%s): the next run hashes every input", key, e)

    thread = threading.Thread(target=store_memo, name="store-input-fingerprints")
    thread.start()
    return thread


@task(
    name="ingest-batch",
    task_run_name="ingest {batch[0].source}: batch from {batch[0].uri}",
    cache_key_fn=lambda ctx, p: ingest_batch_key(p["batch"], p["cfg"]),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_worthwhile,
)
def ingest_batch_task(
    batch: list[InputFile],
    cfg: IngestConfig,
    store_uri: str,
    earlier: list[IngestBatchManifest],
    engine: PrepareConfig,
) -> IngestBatchManifest:
    """Read a batch of files into one Parquet shard (on `engine`); cached on the files' content hashes, so only
    batches with a new or changed file run, and in those only that file is read (`earlier`: the batches of the last
    run, whose unchanged files are copied; neither it nor the engine is part of the cache key)."""
    key = ingest_batch_key(batch, cfg)
    check_result_record(store_uri, key)
    job = ingest_batches.BatchJob(
        inputs=batch,
        keys=ingest_keys(batch, cfg),
        cfg=cfg,
        store_uri=store_uri,
        shard_key=layout.ingest_shard_key(batch[0].kind, batch[0].source, key),
        files_key=layout.ingest_files_key(batch[0].kind, batch[0].source, key),
        earlier=[] if refresh_requested() else earlier,  # --refresh reads every file
    )
    [out] = open_engine(engine).map(ingest_batches.run_batch, [job])
    return IngestBatchManifest(
        shard=out.shard,
        files=out.files,
        file_count=len(batch),
        first_uri=min(inp.uri for inp in batch),
        last_uri=max(inp.uri for inp in batch),
        docs=out.docs,
        quarantined=out.quarantined,
        code_version=INGEST_CODE,
    )
