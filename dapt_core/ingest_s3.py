"""Ingest's S3 side: listing the input objects under a prefix, and fetching one at the version discovery saw."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from dapt_core.faults import store_errors
from dapt_core.manifest import InputFile, QuarantineRecord
from dapt_core.store import s3_client

Found = TypeVar("Found")

_CHUNK = 1 << 20


def s3_inputs(
    spec: str,
    make_input: Callable[..., Found],
    quarantine: Callable,
    fmt: Callable[[str], str | None],
    unsupported: Callable[[str], str],
) -> Iterator[Found | QuarantineRecord]:
    """Objects at s3://bucket/key or under s3://bucket/prefix/ (a prefix is a folder: 'a' does not match 'ab.txt'),
    each as `make_input(uri=..., fingerprint=..., bytes=...)`. `fmt` and `unsupported`: ingest's reader format of a
    name, and why a name has none."""

    bucket, _, prefix = spec[len("s3://") :].partition("/")
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    with store_errors(spec):
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                explicit = key == prefix
                if key.endswith("/") or not (explicit or key.startswith(folder)):
                    continue
                if not explicit and any(part.startswith(".") for part in key[len(folder) :].split("/")):
                    continue
                uri = f"s3://{bucket}/{key}"
                if fmt(key) is None:
                    yield quarantine(file=uri, reason="unsupported_format", detail=unsupported(key))
                else:
                    etag = obj["ETag"].strip('"')
                    yield make_input(uri=uri, fingerprint=f"etag:{etag}:{obj['Size']}", bytes=obj["Size"])


def download(inp: InputFile, dest_dir: Path) -> Path:
    """Fetch an S3 object, insisting on the ETag it had at discovery so the bytes match the cache key (a changed
    or deleted object is a StoreError, never a cached result for the old fingerprint)."""
    bucket, _, key = inp.uri[len("s3://") :].partition("/")
    etag = inp.fingerprint.split(":")[1]  # fingerprint is "etag:{ETag}:{size}"
    dest = dest_dir / key.rsplit("/", 1)[-1]  # keeps the suffix that selects the reader
    with store_errors(inp.uri):
        obj = s3_client().get_object(Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
        with open(dest, "wb") as out:
            shutil.copyfileobj(obj["Body"], out, _CHUNK)
    return dest
