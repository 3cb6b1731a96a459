"""Artifact store: a local directory by default, any S3-compatible endpoint via boto3 for real use.

Every write is atomic (a crashed write leaves no partial object visible: a temp file renamed into
place locally, a single PUT or completed multipart upload on S3) and returns an `ArtifactRef` with the
object's sha256, which every read verifies. S3 endpoint and credentials come from the standard AWS
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) and are never logged; transient S3
errors are retried with exponential backoff by botocore's "standard" retry mode.

Partial files carry their writer in their name (dapt_core/leftovers.py): those of a killed run are removed after the
next successful write of the same file, and everywhere under the store (local) or the download cache (S3) the first
time a process opens the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from dapt_core import leftovers
from dapt_core.hashing import sha256_file
from dapt_core.manifest import ArtifactRef, DirRef


class IntegrityError(RuntimeError):
    """An artifact's bytes no longer match the sha256 recorded when it was written."""


class ArtifactStore(ABC):
    """Objects addressed by '/'-separated keys under one root."""

    root: str

    @abstractmethod
    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        """Copy a local file to `key` atomically."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def read_key(self, key: str) -> bytes:
        """Read an object by key, unverified: only for index files (such as a run's latest manifest) that no ref points to."""

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

    def local_dir(self, ref: DirRef) -> Path:
        """A verified local directory holding the files of `ref` (in place locally, a cached copy for S3)."""
        for f in ref.files.values():
            self.local_path(f)
        return Path(ref.uri)

    def local_path(self, ref: ArtifactRef) -> Path:
        """A verified local file holding the artifact (the file itself locally, a cached copy for S3)."""
        path = self._local_copy(ref)
        actual = sha256_file(path)
        if actual != ref.sha256 and self._drop_cached(path):
            path = self._local_copy(ref)  # a damaged cached copy: fetch once more
            actual = sha256_file(path)
        if actual != ref.sha256:
            raise IntegrityError(
                f"{ref.uri}: sha256 {actual[:12]}… does not match the manifest's {ref.sha256[:12]}…; "
                "the object was changed or corrupted after it was written. Delete it and re-run the stage."
            )
        return path

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
        return str(Path(self.root) / key)

    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        dest = Path(self.uri(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=leftovers.partial_prefix(dest.name), suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
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
        base = root / prefix
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
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, local_path: str | Path, key: str) -> ArtifactRef:
        digest = sha256_file(local_path)
        # upload_file switches to multipart for large files; either way the object appears only when complete.
        self.client.upload_file(str(local_path), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": digest}})
        return ArtifactRef(uri=self.uri(key), sha256=digest, bytes=Path(local_path).stat().st_size)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_key(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
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
        for name, f in ref.files.items():
            target = dest / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=leftovers.partial_prefix(target.name), suffix=".partial")
                os.close(fd)
                try:
                    shutil.copyfile(self.local_path(f), tmp)
                    os.replace(tmp, target)  # a crash mid-copy never leaves a truncated file in place
                finally:
                    Path(tmp).unlink(missing_ok=True)
        return dest

    def _fetch(self, ref: ArtifactRef, dest: Path) -> None:
        bucket, _, key = ref.uri[len("s3://") :].partition("/")
        self.client.download_file(bucket, key, str(dest))


def s3_client():
    """An S3 client from the standard AWS environment (AWS_ENDPOINT_URL, credentials, region), retrying
    throttling, 5xx and dropped connections with exponential backoff (botocore "standard" mode)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}))


_swept: set[str] = set()


def open_store(uri: str) -> ArtifactStore:
    """The store behind a config's `store:` value; the first open in a process removes killed runs' partial files."""
    store = S3Store(uri) if uri.startswith("s3://") else LocalStore(uri)
    if store.root not in _swept:
        _swept.add(store.root)
        store.sweep_partials()
    return store
