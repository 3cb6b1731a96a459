"""Artifact store: a local directory by default, any S3-compatible endpoint via boto3 for real use.

Every write is atomic (a crashed write leaves no partial object visible: a temp file renamed into
place locally, a single PUT or completed multipart upload on S3) and returns an `ArtifactRef` with the
object's sha256, which every read verifies. Keys are checked before use (`check_key`): a key that is absolute or
has empty, '.' or '..' segments, a backslash or a NUL is refused with `UnsafeKeyError`, so no name from a config or a
manifest can address anything outside the store's root. Local files get the mode the umask allows (0666 & ~umask),
so a team's store directory shared through a group stays readable by the group. S3 endpoint and credentials come
from the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) unless the caller hands this
process `S3Credentials`
(`use_s3_credentials`; the flows resolve a Prefect AwsCredentials block into them), and are never logged; transient S3
errors are retried with exponential backoff within a time budget (dapt_core.faults), and every S3 failure is
raised as a StoreError naming the object and what to do.

Partial files carry their writer in their name (dapt_core/leftovers.py): those of a killed run are removed after the
next successful write of the same file, and everywhere under the store (local) or the download cache (S3) the first
time a process opens the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, SecretStr

from dapt_core import leftovers
from dapt_core.faults import RetryBudget, retry_seconds, s3_client_config, store_errors
from dapt_core.hashing import sha256_file
from dapt_core.manifest import ArtifactRef, DirRef, KeptCorpus

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client


class IntegrityError(RuntimeError):
    """An artifact's bytes no longer match the sha256 recorded when it was written."""


class UnsafeKeyError(ValueError):
    """A store key that could address something outside the store's root."""


def check_key(key: str) -> str:
    """`key` itself when it is a relative '/'-separated path of plain segments; else UnsafeKeyError naming it."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "it is empty"
    elif "\0" in key or "\\" in key:
        problem = "it contains a NUL or a backslash"
    elif key.startswith("/"):
        problem = "it is absolute"
    elif any(segment in ("", ".", "..") for segment in key.split("/")):
        problem = "it has an empty, '.' or '..' segment"
    if problem:
        raise UnsafeKeyError(
            f"store key {key!r} refused: {problem}. Keys are '/'-separated names under the store root; check the "
            "project and source names in the config (letters, digits, '_', '.', '-')."
        )
    return key


def _file_mode() -> int:
    """0666 minus the process umask: the mode `open()` would give a new file (mkstemp gives 0600)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # no procfs: read it by setting it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


class ArtifactStore(ABC):
    """Objects addressed by '/'-separated keys under one root."""

    root: str

    @abstractmethod
    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        """Copy a local file to `key` atomically."""

    def check_reachable(self) -> None:  # noqa: B027 (a local directory needs no check: it is made on first write)
        """Fail early, with a StoreError, when the store cannot be used."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def read_key(self, key: str) -> bytes:
        """Read an object by key, unverified: only for index files (such as a run's latest manifest) that no ref
        points to."""

    def put_bytes(self, data: bytes, key: str) -> ArtifactRef:
        with tempfile.TemporaryDirectory(prefix=f"{leftovers.TEMP_PREFIX}put-{leftovers.owner_tag()}-") as tmp:
            p = Path(tmp) / "blob"
            p.write_bytes(data)
            return self.put_file(p, key)

    def put_text(self, text: str, key: str) -> ArtifactRef:
        return self.put_bytes(text.encode("utf-8"), key)

    def put_dir(self, local_dir: str | Path, key: str) -> DirRef:
        """Upload every file under `local_dir` to `key/...`; the returned ref lists each file's sha256."""
        local_dir = Path(local_dir)
        files = {
            str(p.relative_to(local_dir)): self.put_file(p, f"{key}/{p.relative_to(local_dir).as_posix()}")
            for p in sorted(local_dir.rglob("*"))
            if p.is_file()
        }
        return DirRef(uri=self.uri(key), files=files)

    def key_of(self, uri: str) -> str:
        """The key of an object of this store from its uri; UnsafeKeyError for a uri outside the store. Refs come from
        manifests, and a manifest read from the store may only name the store's own objects."""
        root = self.root.rstrip("/") + "/"
        key = uri[len(root) :] if uri.startswith(root) else ""
        if not key or self.uri(check_key(key)) != uri:
            raise UnsafeKeyError(
                f"{uri!r} refused: not an object of the store {self.root}; a manifest names only its store's objects"
            )
        return key

    def checked_files(self, ref: DirRef) -> dict[str, ArtifactRef]:
        """The files of `ref` after checking that each one is `<ref's key>/<name>` in this store (UnsafeKeyError if
        not), so no name can place a file outside the directory."""
        key = self.key_of(ref.uri)
        for name, f in ref.files.items():
            if f.uri != self.uri(f"{key}/{check_key(name)}"):
                raise UnsafeKeyError(f"{f.uri!r} refused: listed as {name!r} of {ref.uri}, which is not where it lives")
        return ref.files

    def local_dir(self, ref: DirRef) -> Path:
        """A verified local directory holding the files of `ref` (in place locally, a cached copy for S3)."""
        for f in self.checked_files(ref).values():
            self.local_path(f)
        return Path(ref.uri)

    def local_path(self, ref: ArtifactRef) -> Path:
        """A verified local file holding the artifact (the file itself locally, a cached copy for S3)."""
        self.key_of(ref.uri)
        path = self._local_copy(ref)
        actual = sha256_file(path)
        if actual != ref.sha256 and self._drop_cached(path):
            path = self._local_copy(ref)  # a damaged cached copy: fetch once more
            actual = sha256_file(path)
        if actual != ref.sha256:
            raise IntegrityError(
                f"{ref.uri}: sha256 {actual[:12]}… does not match the manifest's {ref.sha256[:12]}…; "
                "the object was changed or corrupted after it was written. Delete it and re-run: the stage that wrote "
                "it runs again when its artifacts are missing (`dapt verify CONFIG` lists every damaged artifact)."
            )
        return path

    def local_parts(self, corpus: KeptCorpus | None) -> list[Path]:
        """Verified local files of a kept corpus's parts, in order; none for no corpus."""
        return [self.local_path(ref) for ref in corpus.parts] if corpus else []

    def check(self, ref: ArtifactRef, full: bool = False) -> str | None:
        """What is wrong with a stored artifact, or None. Existence and size cost one stat (one HEAD on S3); `full`
        also hashes every byte against the recorded sha256."""
        size = self._size(ref)
        if size is None:
            return f"{ref.uri}: missing"
        if size != ref.bytes:
            return f"{ref.uri}: {size} bytes, the manifest says {ref.bytes}"
        if full and (actual := self._sha256(ref)) != ref.sha256:
            return f"{ref.uri}: sha256 {actual[:12]}… does not match the manifest's {ref.sha256[:12]}…"
        return None

    def _size(self, ref: ArtifactRef) -> int | None:
        """The stored object's size in bytes; None when it does not exist."""
        path = Path(ref.uri)
        return path.stat().st_size if path.is_file() else None

    def _sha256(self, ref: ArtifactRef) -> str:
        return sha256_file(ref.uri)

    def _drop_cached(self, path: Path) -> bool:
        """Forget a local cached copy; False where `path` is the artifact itself."""
        return False

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        return self.local_path(ref).read_bytes()

    def read_text(self, ref: ArtifactRef) -> str:
        return self.read_bytes(ref).decode("utf-8")

    def _local_copy(self, ref: ArtifactRef) -> Path:
        return Path(ref.uri)

    def sweep_partials(self) -> list[Path]:
        """Remove the partial files killed runs left in this store's local files."""
        return []


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = str(Path(root).expanduser().resolve())

    def uri(self, key: str) -> str:
        path = Path(self.root) / check_key(key)
        # A symlink inside the store must not lead out of it either.
        if os.path.commonpath([self.root, os.path.realpath(path)]) != self.root:
            raise UnsafeKeyError(
                f"store key {key!r} refused: it resolves outside the store root {self.root} (a symlink)"
            )
        return str(path)

    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        dest = Path(self.uri(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=leftovers.partial_prefix(dest.name), suffix=".partial")
        try:
            os.fchmod(fd, _file_mode())
            with store_errors(str(dest)), os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        leftovers.sweep_partials(dest.parent, dest.name)
        return ArtifactRef(uri=str(dest), sha256=sha256_file(dest), bytes=dest.stat().st_size)

    def exists(self, key: str) -> bool:
        return Path(self.uri(key)).is_file()

    def sweep_partials(self) -> list[Path]:
        return leftovers.sweep_partials(Path(self.root), recursive=True)

    def read_key(self, key: str) -> bytes:
        return Path(self.uri(key)).read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        root = Path(self.root)
        base = Path(self.uri(prefix)) if prefix else root
        if not base.exists():
            return []
        files = [base] if base.is_file() else base.rglob("*")
        return sorted(str(p.relative_to(root)) for p in files if p.is_file() and not p.name.endswith(".partial"))


class S3Store(ArtifactStore):
    """s3://bucket/prefix; downloads are cached locally by content hash so a re-read costs no transfer."""

    def __init__(self, uri: str, cache_dir: str | Path | None = None):
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// uri: {uri}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{uri}: no bucket name; use s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client()
        self.cache_dir = Path(cache_dir or os.environ.get("DAPT_CACHE_DIR", Path.home() / ".cache" / "dapt" / "s3"))

    def __repr__(self) -> str:
        return f"S3Store({self.root!r})"  # endpoint and credentials stay out of logs

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _errors(self, uri: str):
        return store_errors(uri, self.client.meta.endpoint_url)

    def check_reachable(self) -> None:
        with self._errors(self.root):
            self.client.head_bucket(Bucket=self.bucket)

    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        digest = sha256_file(local_path)
        # upload_file switches to multipart for large files; either way the object appears only when complete.
        with self._errors(self.uri(key)):
            self.client.upload_file(
                str(local_path), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": digest}}
            )
        return ArtifactRef(uri=self.uri(key), sha256=digest, bytes=Path(local_path).stat().st_size)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(self.uri(key)):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def read_key(self, key: str) -> bytes:
        with self._errors(self.uri(key)):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        with self._errors(self.uri(prefix)):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(keys)

    def _local_copy(self, ref: ArtifactRef) -> Path:
        dest = self.cache_dir / ref.sha256[:2] / ref.sha256
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            # unique: tasks in threads may fetch the same object
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=leftovers.partial_prefix(dest.name), suffix=".partial")
            os.close(fd)
            try:
                self._fetch(ref, Path(tmp))
                os.replace(tmp, dest)
            finally:
                Path(tmp).unlink(missing_ok=True)
            leftovers.sweep_partials(dest.parent, dest.name)
        return dest

    def sweep_partials(self) -> list[Path]:
        return leftovers.sweep_partials(self.cache_dir, recursive=True) if self.cache_dir.is_dir() else []

    def _drop_cached(self, path: Path) -> bool:
        path.unlink(missing_ok=True)
        return True

    def local_dir(self, ref: DirRef) -> Path:
        dest = self.cache_dir / "dirs" / ref.sha256
        for name, f in self.checked_files(ref).items():
            target = dest / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(
                    dir=target.parent, prefix=leftovers.partial_prefix(target.name), suffix=".partial"
                )
                os.close(fd)
                try:
                    shutil.copyfile(self.local_path(f), tmp)
                    os.replace(tmp, target)  # a crash mid-copy never leaves a truncated file in place
                finally:
                    Path(tmp).unlink(missing_ok=True)
        return dest

    def _fetch(self, ref: ArtifactRef, dest: Path) -> None:
        bucket, _, key = ref.uri[len("s3://") :].partition("/")
        with self._errors(ref.uri):
            self.client.download_file(bucket, key, str(dest))

    def _size(self, ref: ArtifactRef) -> int | None:
        from botocore.exceptions import ClientError

        bucket, _, key = ref.uri[len("s3://") :].partition("/")
        try:
            return self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _sha256(self, ref: ArtifactRef) -> str:
        """The object's own bytes, streamed: a locally cached copy may be intact while the object is not."""
        bucket, _, key = ref.uri[len("s3://") :].partition("/")
        h = hashlib.sha256()
        for chunk in self.client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
            h.update(chunk)
        return h.hexdigest()


class S3Credentials(BaseModel):
    """S3 credentials handed to this process by its caller (the flows read them from a Prefect AwsCredentials block):
    they replace the AWS_* environment for every S3 client dapt creates. Unset fields fall back to that environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    region: str | None = None
    endpoint_url: str | None = None

    def client_arguments(self) -> dict[str, str]:
        """Keyword arguments of `boto3.client` for the fields that are set."""
        values = {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            "aws_session_token": self.session_token.get_secret_value() if self.session_token else None,
            "region_name": self.region,
            "endpoint_url": self.endpoint_url,
        }
        return {k: v for k, v in values.items() if v}

    def environment(self) -> dict[str, str]:
        """The same credentials as AWS_* variables, for subprocesses (torchrun ranks) that open the store themselves."""
        names = {
            "aws_access_key_id": "AWS_ACCESS_KEY_ID",
            "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
            "aws_session_token": "AWS_SESSION_TOKEN",
            "region_name": "AWS_DEFAULT_REGION",
            "endpoint_url": "AWS_ENDPOINT_URL",
        }
        return {names[k]: v for k, v in self.client_arguments().items()}


_credentials: S3Credentials | None = None


def use_s3_credentials(credentials: S3Credentials | None) -> None:
    """Every S3 client this process creates from now on (stores, s3:// inputs) uses `credentials`; None: the AWS
    environment again. Process-wide because stores are opened from a uri deep inside every stage."""
    global _credentials
    _credentials = credentials


def s3_environment() -> dict[str, str]:
    """The AWS_* variables a subprocess needs to reach S3 as this process does ({} when it uses the environment)."""
    return _credentials.environment() if _credentials else {}


def s3_client() -> S3Client:
    """An S3 client from the credentials given to `use_s3_credentials`, else the standard AWS environment
    (AWS_ENDPOINT_URL, credentials, region), retrying throttling, 5xx, timeouts and dropped connections with
    exponential backoff until the endpoint has failed for DAPT_STORE_RETRY_SECONDS (dapt_core.faults.RetryBudget)."""
    import boto3

    seconds = retry_seconds()
    arguments = _credentials.client_arguments() if _credentials else {}
    client = boto3.client("s3", config=s3_client_config(seconds), **arguments)
    RetryBudget(seconds).install(client)
    return client


_swept: set[str] = set()


def open_store(uri: str) -> ArtifactStore:
    """The store behind a config's `store:` value; the first open in a process removes killed runs' partial files."""
    store = S3Store(uri) if uri.startswith("s3://") else LocalStore(uri)
    if store.root not in _swept:
        _swept.add(store.root)
        store.sweep_partials()
    return store
