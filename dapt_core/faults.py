"""Expected failures of the store, the network and the disk, as one typed error that says what to do.

botocore, urllib3 and the OS report a dead endpoint, missing credentials or a full disk in a dozen exception
types whose messages name neither the object nor the remedy. `classify` maps them (anywhere in an exception's
chain) to a `StoreError` naming the endpoint, bucket or path; `store_errors` does so around store calls where the
uri is known. The CLI turns a StoreError into its one `error:` line; task retries skip it (see `worth_retrying`).

S3 requests are retried with botocore's standard conditions and backoff, but bounded by time rather than by a
count: `RetryBudget` gives up once an endpoint has failed for DAPT_STORE_RETRY_SECONDS in a row (default 120).
The outage clock is shared by every request to that endpoint in the process, so a run whose store goes away
ends about one budget after the outage began, however many requests were in flight or still to come.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from botocore.config import Config
    from botocore.endpoint import Endpoint

RETRY_SECONDS_ENV = "DAPT_STORE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0

Kind = Literal[
    "credentials",
    "access_denied",
    "no_bucket",
    "vanished",
    "changed",
    "unreachable",
    "throttled",
    "server_error",
    "disk_full",
    "refused",
]


class StoreError(RuntimeError):
    """An expected failure of the store, an input or the disk; the message names where and what to do."""

    def __init__(self, message: str, kind: Kind):
        super().__init__(message)
        self.kind = kind


def retry_seconds() -> float:
    """The retry budget from DAPT_STORE_RETRY_SECONDS (seconds an endpoint may keep failing before dapt gives up)."""
    raw = os.environ.get(RETRY_SECONDS_ENV)
    if raw is None:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{RETRY_SECONDS_ENV}={raw!r}: expected a number of seconds > 0")
    return value


class RetryBudget:
    """botocore's standard retry conditions and backoff, stopped by time: an endpoint that keeps failing for
    `seconds` (connection refused, timeouts, throttling, 5xx) is given up on, and from then on every request to it
    gives up after its first failed attempt, until one gets an answer."""

    _outages: dict[str, tuple[float, float]] = {}  # endpoint -> (first, last) failure of its current outage
    _lock = threading.Lock()

    def __init__(self, seconds: float):
        from botocore.retries.standard import (
            ExponentialBackoff,
            RetryEventAdapter,
            StandardRetryConditions,
            ThrottlingErrorDetector,
        )

        self.seconds = seconds
        self._adapter = RetryEventAdapter()
        self._conditions = StandardRetryConditions(max_attempts=1_000_000)  # time, not a count, ends the retries
        self._backoff = ExponentialBackoff(
            max_backoff=min(20.0, max(1.0, seconds / 4)), throttling_detector=ThrottlingErrorDetector(self._adapter)
        )

    def install(self, client: BaseClient) -> None:
        """Replace the client's standard retry handler (same conditions and backoff) with this time-bounded one."""
        events = client.meta.events
        events.register("before-call.s3", self._started)
        events.unregister("needs-retry.s3", unique_id="retry-config-s3")
        events.register("needs-retry.s3", self._needs_retry, unique_id="retry-config-s3")

    @staticmethod
    def _started(context: dict, **kwargs) -> None:
        context["dapt_started"] = time.monotonic()

    def _needs_retry(self, endpoint: Endpoint, request_dict: dict, **kwargs) -> float | bool:
        ctx = self._adapter.create_retry_context(request_dict=request_dict, **kwargs)
        host = endpoint.host
        now = time.monotonic()
        if not self._conditions.is_retryable(ctx):
            if ctx.http_response is not None and ctx.http_response.status_code < 500:
                with self._lock:
                    self._outages.pop(host, None)  # an answer: the endpoint is up (the error, if any, is final)
            return False
        started = request_dict["context"].get("dapt_started", now)
        with self._lock:
            first, last = self._outages.get(host, (started, now))
            if now - last > self.seconds:  # an old outage that ended unnoticed: this is a new one
                first = started
            first = min(first, started)
            self._outages[host] = (first, now)
        delay = self._backoff.delay_amount(ctx)
        return False if now + delay - first > self.seconds else delay


def s3_client_config(seconds: float) -> Config:
    """botocore settings for a budget of `seconds`: timeouts short enough that a stalled endpoint is noticed
    (and retried) within it."""
    from botocore.config import Config

    return Config(
        retries={"mode": "standard", "max_attempts": 1_000_000},
        connect_timeout=min(10.0, max(1.0, seconds / 4)),
        read_timeout=min(60.0, max(1.0, seconds / 3)),
    )


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _bucket(where: str) -> str:
    return where[len("s3://") :].split("/", 1)[0] if where.startswith("s3://") else where


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


_REJECTED = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "ProvisionedThroughputExceededException",
}


def classify(exc: BaseException, where: str | None = None, endpoint: str | None = None) -> StoreError | None:
    """The StoreError for `exc` or the first classifiable exception in its chain; None for anything else.

    `where` is the uri being read or written and `endpoint` the S3 endpoint, when the caller knows them."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, StoreError):
            return link
        found = _classify_one(link, where, endpoint or _endpoint())
        if found is not None:
            return found
        link = link.__cause__ or link.__context__
    return None


def _classify_one(exc: BaseException, where: str | None, endpoint: str) -> StoreError | None:
    import botocore.exceptions as bx

    at = f"{where}: " if where else ""
    bucket = _bucket(where) if where else "the bucket"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return StoreError(
            f"{at}no usable S3 credentials for {endpoint} ({exc}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE), or name a Prefect AwsCredentials block in the config's aws_credentials_block, and "
            "re-run.",
            "credentials",
        )
    if isinstance(exc, bx.ClientError):
        return _classify_client_error(exc, at, bucket, endpoint)
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
        budget = f"{RETRY_SECONDS_ENV}={retry_seconds():g}"
        return StoreError(
            f"{at}cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}); gave up after the retry budget "
            f"({budget}). Check AWS_ENDPOINT_URL and that the server is up, then re-run: finished stages are cached.",
            "unreachable",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        path = exc.filename or where
        return StoreError(
            f"{f'{path}: ' if path else ''}no space left on device. Free space, or point TMPDIR, DAPT_CACHE_DIR or the "
            "store at a larger disk, then re-run: finished stages are cached.",
            "disk_full",
        )
    if "No space left on device" in str(exc):  # DuckDB and pyarrow report ENOSPC in their own exception types
        return StoreError(
            f"{at}no space left on device ({type(exc).__name__}). Free space, or point TMPDIR (and "
            "clean.duckdb_memory_limit spills) at a larger disk, then re-run: finished stages are cached.",
            "disk_full",
        )
    return None


def _classify_client_error(exc: BaseException, at: str, bucket: str, endpoint: str) -> StoreError:
    code, status = _error_code(exc)
    operation = getattr(exc, "operation_name", "") or ""
    if code in _REJECTED:
        return StoreError(
            f"{at}{endpoint} rejected the S3 credentials ({code}). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or the keys of the config's aws_credentials_block (or refresh the session token) and re-run.",
            "credentials",
        )
    if code in _DENIED or status == 403:
        return StoreError(
            f"{at}access denied by {endpoint} ({code or status}). Give these credentials read and write access to "
            f"bucket {bucket!r} (s3:ListBucket, s3:GetObject, s3:PutObject), or use another store.",
            "access_denied",
        )
    if code == "NoSuchBucket" or (operation == "HeadBucket" and status == 404):
        return StoreError(
            f"{at}bucket {bucket!r} does not exist on {endpoint}. Create it, or fix `store:` or the s3:// input path "
            "in the config.",
            "no_bucket",
        )
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return StoreError(
            f"{at}the object is gone from {endpoint} (deleted after it was discovered or written). Re-run: inputs are "
            "discovered afresh; a deleted artifact of a cached stage needs that stage recomputed (`--refresh`).",
            "vanished",
        )
    if code in ("PreconditionFailed", "412") or status == 412:
        return StoreError(
            f"{at}changed since it was discovered; re-run so the new version is fingerprinted.", "changed"
        )
    if code in _THROTTLED or status in (429, 503):
        return StoreError(
            f"{at}{endpoint} kept throttling requests ({code or status}) for longer than the retry budget "
            f"({RETRY_SECONDS_ENV}={retry_seconds():g}). Raise the budget or lower the parallelism, then re-run.",
            "throttled",
        )
    if status >= 500:
        return StoreError(
            f"{at}{endpoint} kept failing ({code or status}) for longer than the retry budget "
            f"({RETRY_SECONDS_ENV}={retry_seconds():g}). Check the S3 service, then re-run: finished stages are "
            "cached.",
            "server_error",
        )
    return StoreError(f"{at}{endpoint} refused the request: {exc}", "refused")


@contextmanager
def store_errors(where: str, endpoint: str | None = None) -> Iterator[None]:
    """Raise a StoreError naming `where` (a uri or local path) for any S3, network or disk failure inside the block."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        found = classify(e, where, endpoint)
        if found is None:
            raise
        raise found from e


def worth_retrying(exc: BaseException) -> bool:
    """Whether running a task again can help: not after a StoreError (retried within its budget already, or it can
    never succeed: credentials, a missing bucket, a changed input), nor after bad input or corrupted data."""
    from dapt_core.store import IntegrityError

    if classify(exc) is not None:
        return False
    return not isinstance(exc, (ValueError, IntegrityError, FileNotFoundError, PermissionError, NotADirectoryError))
