"""Where task results live, so that a retry or a fresh worker finds finished stages, and why reading them is safe.

Results (small JSON manifests) are persisted in the dapt artifact store itself, through the same
atomic writes as every artifact: a retry, a re-run of `dapt prepare`, or a nightly run on another
worker that points at the same store (local directory or s3://) reuses every finished task.
Cache keys are content hashes computed by each task module, never run ids.

The store is shared by every worker of a team, so a result record is data, never code. A Prefect record names its
own serializer (pickle included) and JSON decoder (which imports any class a `__class__` field names). dapt reads a
record as plain JSON, accepts it only as the JSON of the manifest class its stage returns (`RESULT_TYPES`, chosen by
the record's key, not by the record) and hands Prefect that validated manifest, re-encoded for `ManifestSerializer`.
Anything else is refused with `UntrustedResultRecord`; with DAPT_STORE_KEY set, so is a record not signed with it.
A reused manifest whose artifacts are missing or changed in size is not reused: the stage runs again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import typing
from typing import Any, Literal

from prefect.filesystems import WritableFileSystem
from prefect.serializers import JSONSerializer, Serializer
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from dapt_core.config import ConfigError
from dapt_core.evaluate import EvalResult
from dapt_core.hashing import stable_hash
from dapt_core.layout import RESULTS_PREFIX, result_record_key
from dapt_core.manifest import (
    ArtifactRef,
    CleanManifest,
    CptManifest,
    IngestBatchManifest,
    IngestManifest,
    PackManifest,
    SftManifest,
    TokenizerManifest,
    artifacts,
)
from dapt_core.store import ArtifactStore, open_store

# What the result record of each cached task may hold, by the stage name its cache key starts with ("ingest-<sha256>").
RESULT_TYPES: dict[str, Any] = {
    "ingest": IngestManifest,
    "ingest-batch": IngestBatchManifest,
    "clean": CleanManifest,
    "tokenizer": TokenizerManifest,
    "pack": PackManifest,
    "base-eval": EvalResult,
    "original-eval": EvalResult,
    "cpt": CptManifest,
    "sft": SftManifest,
}
_ADAPTERS = {kind: TypeAdapter(t) for kind, t in RESULT_TYPES.items()}
# The fields of Prefect's JSON serializer that change how a record is decoded, as dapt's tasks write them.
_JSON_DECODING = {
    k: v for k, v in JSONSerializer().model_dump().items() if k in ("jsonlib", "object_decoder", "loads_kwargs")
}
# Optional: a secret shared by the workers of a team; records are then signed, and unsigned ones refused.
STORE_KEY_ENV = "DAPT_STORE_KEY"
MAC_FIELD = "dapt_hmac"
_KEY = re.compile(r"(?P<kind>[a-z][a-z-]*)-[0-9a-f]{64}")


def _mac(secret: str, key: str, record: dict) -> str:
    """HMAC-SHA256 of a record and the key it is stored under (a signed record moved to another key is refused)."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret.encode(), f"{key}\0{canonical}".encode(), hashlib.sha256).hexdigest()


def sign_record(key: str, content: bytes) -> bytes:
    """The record as written to the store: signed when STORE_KEY_ENV is set, so that workers sharing that key refuse
    any record written without it."""
    secret = os.environ.get(STORE_KEY_ENV)
    if not secret:
        return content
    record = json.loads(content)
    record[MAC_FIELD] = _mac(secret, key, record)
    return json.dumps(record).encode()


class UntrustedResultRecord(ValueError):
    """A result record in the store that dapt did not write: another serializer, decoder or class, not JSON, or not
    signed with DAPT_STORE_KEY when that is set."""


class StaleResultRecord(RuntimeError):
    """A cached manifest whose artifacts are missing or changed: Prefect takes it for a cache miss."""


def result_kind(key: str) -> str | None:
    """The stage whose cache key `key` is, or None."""
    m = _KEY.fullmatch(key)
    return m["kind"] if m and m["kind"] in RESULT_TYPES else None


def decode_record(key: str, content: bytes, uri: str) -> Any:
    """The manifest a result record holds, read as plain JSON and validated as the class of the record's stage.

    Nothing in the record chooses a serializer, a decoder or a class; anything dapt's tasks would not have written
    raises UntrustedResultRecord naming the record and what to do.
    """

    def refuse(why: str) -> UntrustedResultRecord:
        return UntrustedResultRecord(
            f"untrusted result record {uri}: {why}. dapt reads only JSON records of its own manifests, so it did not "
            "load it. Check who can write to the store; then delete the record, or recompute it with "
            "`dapt prepare --refresh` (for any command: PREFECT_TASKS_REFRESH_CACHE=true)."
        )

    kind = result_kind(key)
    if kind is None:
        raise refuse("its name is not the cache key of a dapt stage")
    try:
        record = json.loads(content)  # no object hook: JSON values only
    except ValueError:
        raise refuse("it is not JSON") from None
    secret = os.environ.get(STORE_KEY_ENV)
    if secret and isinstance(record, dict):
        mac = record.pop(MAC_FIELD, None)
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(secret, key, record)):
            raise refuse(
                f"it is not signed with the key in {STORE_KEY_ENV} (records written without that key never are)"
            )
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    if not isinstance(serializer, dict) or serializer.get("type") != "json":
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise refuse(f"its serializer is {named!r}, not 'json'")
    for field, expected in _JSON_DECODING.items():
        if serializer.get(field) != expected:
            raise refuse(f"its JSON serializer sets {field}={serializer.get(field)!r}")
    result = record.get("result")
    try:
        value = json.loads(result) if isinstance(result, str) else None
    except ValueError:
        value = None
    if value is None:
        raise refuse("its result is not JSON text")
    model = RESULT_TYPES[kind]
    if isinstance(model, type) and issubclass(model, BaseModel):
        qualified = f"{model.__module__}.{model.__qualname__}"
        if not (isinstance(value, dict) and set(value) == {"__class__", "data"} and value["__class__"] == qualified):
            named = value.get("__class__") if isinstance(value, dict) else type(value).__name__
            raise refuse(f"a {kind} result must be a {model.__name__}, this one is {named!r}")
        value = value["data"]
    try:
        return _ADAPTERS[kind].validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise refuse(f"it is not a valid {kind} result ({where}: {first['msg']})") from None


class ManifestSerializer(Serializer):
    """How Prefect decodes a record once `StoreResultStorage.read_path` validated it: `{"kind": stage, "data": json}`,
    written by read_path itself. Records in the store are never decoded with it (they must say 'json'). No fields:
    the Prefect server keeps a serializer's type only."""

    type: Literal["dapt-manifest"] = Field(default="dapt-manifest", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        kind = next(k for k, t in RESULT_TYPES.items() if isinstance(obj, typing.get_origin(t) or t))
        return _encode(kind, obj)

    def loads(self, blob: bytes) -> Any:
        payload = json.loads(blob)
        return _ADAPTERS[payload["kind"]].validate_python(payload["data"])


def _encode(kind: str, value: Any) -> bytes:
    # The stdlib's JSON, as Prefect's serializer writes it: pydantic's own would turn NaN metrics into null.
    return json.dumps({"kind": kind, "data": _ADAPTERS[kind].dump_python(value, mode="json")}).encode()


def _stale(store: ArtifactStore, value: Any) -> list[str]:
    """Problems of the artifacts a cached manifest hands on: existence and size, one stat (S3: one HEAD) each."""
    return [problem for ref in artifacts(value) if (problem := store.check(ref))]


def _stored_result(store: ArtifactStore, key: str) -> tuple[Any, list[str]]:
    """The manifest of the result record of cache key `key` (validated as data: `decode_record`, which raises for an
    untrusted record) and the problems of the artifacts it hands on (none: it can be reused)."""
    path = result_record_key(key)
    value = decode_record(key, store.read_key(path), store.uri(path))
    return value, _stale(store, value)


def _log() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class StoreResultStorage(WritableFileSystem):
    """Prefect result storage backed by the dapt artifact store (local or S3, atomic writes). dapt's flows set it on
    each cached task; it is never a worker's default (it reads dapt's stage records only, and only processes that
    import dapt know its block type): `worker_result_storage` makes the standard block for that."""

    _block_type_name = "dapt artifact store"
    _block_type_slug = "dapt-artifact-store"

    store_uri: str

    def _store(self) -> ArtifactStore:
        return open_store(self.store_uri)

    # Prefect calls these with `_sync=True` from sync code and awaits the `a`-prefixed twins from async code.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """The record at `path`, validated and re-encoded; raises for an untrusted record or a stale one (Prefect takes
        both for a cache miss: the cached task body refuses the untrusted one, see `check_result_record`)."""
        store, key = self._store(), result_record_key(path)
        value, problems = _stored_result(store, path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            _log().warning("cached result %s is not reused (%s%s): running the stage again", path, problems[0], more)
            raise StaleResultRecord(f"{store.uri(key)}: {problems[0]}{more}")
        result = _encode(result_kind(path), value).decode()
        return json.dumps(
            {"metadata": {"storage_key": path, "serializer": ManifestSerializer().model_dump()}, "result": result}
        ).encode()

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        return self._store().put_bytes(sign_record(path, content), result_record_key(path)).uri

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def result_storage_for(store_uri: str) -> StoreResultStorage:
    """The storage block for `store_uri`, saved server-side (Prefect requires it) under a name derived from the uri.
    Loaded when the server has it as it should be: one API call, where saving it again cost ~0.1 s of every flow run."""
    name = f"dapt-results-{stable_hash(store_uri)[:12]}"
    try:
        saved = StoreResultStorage.load(name)
        if saved.store_uri == store_uri:
            return saved
    except (ValueError, RuntimeError):  # not saved yet, or saved by a dapt whose block had other fields (Prefect
        pass  # raises RuntimeError when a stored block fails validation): saved anew below
    block = StoreResultStorage(store_uri=store_uri)
    block.save(name, overwrite=True)
    return block


FLOW_RESULTS_PREFIX = "prefect-flow-results"


def worker_result_storage(store_uri: str, aws_credentials_block: str | None, name: str) -> str:
    """Save, as `name`, a standard Prefect storage block on the store's `prefect-flow-results/` folder (LocalFileSystem,
    or prefect-aws's S3Bucket with the config's AwsCredentials block for an s3:// store) and return the value for a
    worker's PREFECT_DEFAULT_RESULT_STORAGE_BLOCK ('<block type>/<name>').

    A standard block type loads in every flow run of the worker, dapt's or not (dapt's own type would fail there with
    UnknownBlockType). dapt's flows do not persist their return values and set their tasks' storage themselves, so
    this default holds other flows' results only, and no dapt run reads a record from it."""
    if not store_uri.startswith("s3://"):
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=str(open_store(store_uri).uri(FLOW_RESULTS_PREFIX)))
    else:
        try:
            from prefect_aws import AwsCredentials, S3Bucket
        except ImportError:
            raise ConfigError(
                f"store: {store_uri} is on S3, and a worker's default result storage there is prefect-aws's S3Bucket "
                "block: install it with `pip install 'dapt[aws]'`"
            ) from None
        bucket, _, prefix = store_uri[len("s3://") :].partition("/")
        credentials = AwsCredentials.load(aws_credentials_block) if aws_credentials_block else AwsCredentials()
        folder = f"{prefix.strip('/')}/{FLOW_RESULTS_PREFIX}".lstrip("/")
        block = S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials)
    block.save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"


def refresh_requested() -> bool:
    """The user asked to recompute cached stages (`dapt prepare --refresh`, PREFECT_TASKS_REFRESH_CACHE)."""
    from prefect.context import TaskRunContext
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    ctx = TaskRunContext.get()
    if ctx is not None and ctx.task.refresh_cache is not None:
        return ctx.task.refresh_cache
    return bool(PREFECT_TASKS_REFRESH_CACHE.value())


def eval_set_hashes(pack: PackManifest) -> list[str | None]:
    """The content of the held-out eval files, for the cache key of every stage that evaluates on them."""
    return [r.sha256 if r else None for r in (pack.eval_domain, pack.eval_general)]


def check_result_record(store_uri: str, key: str) -> None:
    """First call of every cached task body, which runs only on a cache miss. Prefect takes a record it cannot read for
    a miss, so an untrusted record would silently be recomputed and overwritten: refuse it instead (before any work),
    unless the user asked to recompute."""
    if refresh_requested():
        return
    store, path = open_store(store_uri), result_record_key(key)
    if store.exists(path):
        decode_record(key, store.read_key(path), store.uri(path))


def finished_result(store: ArtifactStore, key: str) -> Any | None:
    """The manifest a cached task run would answer with for `key` (a record dapt wrote, its artifacts in place), or None
    when the task must run: no record, a stale one, an untrusted one (the task run refuses it loudly, see
    `check_result_record`), or a refresh asked for. A flow with many finished tasks of one stage (ingest batches) skips
    their task runs with it: a cached task run costs ~15 ms of Prefect bookkeeping, and a refresh of a large corpus
    would pay it for every batch it does not run."""
    if refresh_requested() or not store.exists(result_record_key(key)):
        return None
    try:
        value, problems = _stored_result(store, key)
    except UntrustedResultRecord:
        return None
    return None if problems else value


class ManifestCheck(BaseModel):
    """One stage result (or run manifest of the project) and the state of every artifact it refers to."""

    name: str = Field(description="Cache key of a stage result, or store key of a run manifest.")
    uri: str
    status: Literal["ok", "stale", "damaged", "untrusted"] = Field(
        description="stale: an artifact is missing or resized (the next run recomputes the stage); damaged: an "
        "artifact has its size but another sha256 (delete it, then the next "
        "run recomputes the stage); untrusted: not a record dapt wrote."
    )
    artifacts: int
    problems: list[str] = Field(default_factory=list)


class VerifyReport(BaseModel):
    """What `dapt verify` found: the project's last-run manifests, the stage results that share their artifacts, and
    any result record of the store that dapt would refuse."""

    store: str
    project: str
    ok: bool
    artifacts: int = Field(description="Distinct artifacts checked (every byte hashed unless missing or resized).")
    checks: list[ManifestCheck]
    not_results: list[str] = Field(
        default_factory=list,
        description="Entries under prefect-results/ that are not stage results (Prefect stores failed runs' exceptions "
        "there); dapt never reads them.",
    )


def verify_store(store_uri: str, project: str, run_manifests: dict[str, type[BaseModel]]) -> VerifyReport:
    """Hash every artifact of the project's last-run manifests (`run_manifests`: store key -> class); report the stage
    results those artifacts come from, and every result record of the store that a run would refuse. Results of older
    code versions or other projects are not hashed: no run of this project reads them."""
    store = open_store(store_uri)
    verdicts: dict[
        str, tuple[str, str] | None
    ] = {}  # uri -> (status, problem); an artifact shared by manifests is hashed once

    def verdict(ref: ArtifactRef) -> tuple[str, str] | None:
        if ref.uri not in verdicts:
            if problem := store.check(ref):
                verdicts[ref.uri] = ("stale", problem)
            else:
                problem = store.check(ref, full=True)
                verdicts[ref.uri] = ("damaged", problem) if problem else None
        return verdicts[ref.uri]

    def check(name: str, uri: str, refs: list[ArtifactRef]) -> ManifestCheck:
        found = [v for ref in refs if (v := verdict(ref))]
        status = "stale" if any(s == "stale" for s, _ in found) else "damaged" if found else "ok"
        return ManifestCheck(name=name, uri=uri, status=status, artifacts=len(refs), problems=[p for _, p in found])

    def untrusted(name: str, uri: str, problem: str) -> ManifestCheck:
        return ManifestCheck(name=name, uri=uri, status="untrusted", artifacts=0, problems=[problem])

    checks: list[ManifestCheck] = []
    for key, model in run_manifests.items():
        if store.exists(key):
            try:
                refs = list(artifacts(model.model_validate_json(store.read_key(key))))
            except ValidationError as e:
                checks.append(
                    untrusted(key, store.uri(key), f"not a valid {model.__name__} ({e.error_count()} problem(s))")
                )
                continue
            checks.append(check(key, store.uri(key), refs))
    last_run = set(verdicts)
    not_results: list[str] = []
    for key in store.list(RESULTS_PREFIX):
        name, uri = key[len(RESULTS_PREFIX) + 1 :], store.uri(key)
        if result_kind(name) is None:
            not_results.append(name)
            continue
        try:
            refs = list(artifacts(decode_record(name, store.read_key(key), uri)))
        except UntrustedResultRecord as e:
            checks.append(untrusted(name, uri, str(e)))
            continue
        if any(ref.uri in last_run for ref in refs):
            checks.append(check(name, uri, refs))
    ok = all(c.status == "ok" for c in checks)
    return VerifyReport(
        store=store.root, project=project, ok=ok, artifacts=len(verdicts), checks=checks, not_results=not_results
    )


def was_cached(future) -> bool:
    """True when a finished task run was answered from the cache rather than computed."""
    return future.state.name == "Cached"
