"""Artifact store: atomic writes, sha256 verified on read, S3 against a real HTTP endpoint, retries."""

from __future__ import annotations

import errno
import http.client
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from dapt_core.faults import StoreError
from dapt_core.hashing import sha256_file
from dapt_core.layout import latest_manifest_key
from dapt_core.manifest import ArtifactRef, DirRef
from dapt_core.store import IntegrityError, LocalStore, S3Store, UnsafeKeyError, open_store

UNSAFE_KEYS = [
    "../x",
    "a/../../x",
    "/etc/passwd",
    "a//b",
    "./a",
    "a/.",
    "a\\..\\b",
    "a\0b",
    latest_manifest_key("../../x", "prepare"),
]


def test_local_roundtrip_and_listing(tmp_path):
    store = LocalStore(tmp_path / "store")
    ref = store.put_text("hello", "a/b/c.txt")
    assert ref.bytes == 5 and len(ref.sha256) == 64
    assert store.read_text(ref) == "hello"
    assert store.exists("a/b/c.txt") and not store.exists("a/b/missing")
    store.put_text("x", "a/d.txt")
    assert store.list("a") == ["a/b/c.txt", "a/d.txt"]
    assert store.read_key("a/d.txt") == b"x"


def test_local_crashed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    old = store.put_text("old version", "obj.txt")

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", crash)
    with pytest.raises(StoreError, match=f"{tmp_path / 'store' / 'obj.txt'}: no space left on device. Free space") as e:
        store.put_text("new version", "obj.txt")
    assert e.value.kind == "disk_full"
    monkeypatch.undo()
    assert store.read_text(old) == "old version"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["obj.txt"]  # no .partial left behind


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_local_store_refuses_keys_outside_its_root(tmp_path, key):
    root = tmp_path / "team" / "store"
    store = LocalStore(root)
    for op in (
        lambda: store.put_text("pwned", key),
        lambda: store.exists(key),
        lambda: store.read_key(key),
        lambda: store.list(key),
    ):
        with pytest.raises(UnsafeKeyError, match="refused") as err:
            op()
        assert repr(key) in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written anywhere
    with pytest.raises(UnsafeKeyError, match="empty"):
        store.put_text("pwned", "")


def test_local_store_refuses_a_symlink_out_of_its_root(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_text("ok", "runs/keep.txt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store" / "runs" / "link").symlink_to(outside)
    with pytest.raises(UnsafeKeyError, match="outside the store root"):
        store.put_text("pwned", "runs/link/x.txt")
    assert list(outside.iterdir()) == []


def test_refs_outside_the_store_are_refused(tmp_path):
    """A manifest read from the store names objects by uri: one naming any other file (with its right hash) is
    refused."""
    store = LocalStore(tmp_path / "store")
    secret = tmp_path / "home" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("private")
    outside = ArtifactRef(uri=str(secret), sha256=sha256_file(secret), bytes=7)
    with pytest.raises(UnsafeKeyError, match="not an object of the store"):
        store.local_path(outside)
    ref = store.put_dir(_dir(tmp_path / "m", {"model.safetensors": b"w"}), "models/m")
    renamed = DirRef(uri=ref.uri, files={"../../../home/secret.txt": ref.files["model.safetensors"]})
    with pytest.raises(UnsafeKeyError, match="refused"):
        store.local_dir(renamed)
    with pytest.raises(ValueError, match="String should match pattern"):  # a sha256 also names cached copies
        ArtifactRef(uri=store.uri("x"), sha256="../../x", bytes=1)


def _dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_local_store_files_follow_the_umask(tmp_path):
    """mkstemp creates 0600 files; a store shared by a team's group must get what the umask allows."""
    store = LocalStore(tmp_path / "store")
    old = os.umask(0o002)
    try:
        shared = Path(store.put_text("x", "a/shared.txt").uri)
        os.umask(0o077)
        private = Path(store.put_text("x", "a/private.txt").uri)
    finally:
        os.umask(old)
    assert shared.stat().st_mode & 0o777 == 0o664
    assert private.stat().st_mode & 0o777 == 0o600


def test_local_read_detects_tampering(tmp_path):
    store = LocalStore(tmp_path / "store")
    ref = store.put_text("the original", "obj.txt")
    Path(ref.uri).write_text("tampered")
    with pytest.raises(IntegrityError, match="does not match"):
        store.read_text(ref)


def test_open_store_picks_backend(tmp_path, s3_endpoint):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.uri("k") == "s3://bucket/some/prefix/k"
    assert "testing" not in repr(s3) and s3_endpoint not in repr(s3)


def test_s3_roundtrip_verify_and_cache(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/runs", cache_dir=tmp_path / "cache")
    src = tmp_path / "big.bin"
    src.write_bytes(b"0123456789" * 1_000_000)  # 10 MB: exercises multipart upload
    ref = store.put_file(src, "data/big.bin")
    assert ref.uri == f"s3://{s3_bucket}/runs/data/big.bin" and ref.bytes == 10_000_000
    assert store.exists("data/big.bin") and store.list("data") == ["data/big.bin"]
    assert store.local_path(ref).read_bytes() == src.read_bytes()

    # A damaged cached copy is fetched again rather than failing forever.
    cached = store.local_path(ref)
    cached.write_bytes(b"bit rot")
    assert store.local_path(ref).read_bytes() == src.read_bytes()

    # The object is replaced behind our back: a fresh cache re-downloads and the sha256 check catches it.
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="runs/data/big.bin", Body=b"corrupted")
    fresh = S3Store(f"s3://{s3_bucket}/runs", cache_dir=tmp_path / "cache2")
    with pytest.raises(IntegrityError):
        fresh.local_path(ref)


def test_s3_store_refuses_unsafe_keys(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/runs", cache_dir=tmp_path / "cache")
    for key in UNSAFE_KEYS:
        for op in (
            lambda k: store.put_text("pwned", k),
            store.exists,
            store.read_key,
            store.list,
        ):
            with pytest.raises(UnsafeKeyError, match="refused"):
                op(key)
    with pytest.raises(UnsafeKeyError, match="empty"):
        store.put_text("pwned", "")
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)


def test_s3_refs_outside_the_store_are_refused_and_write_nothing_outside_the_cache(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/runs", cache_dir=tmp_path / "home" / ".cache" / "dapt")
    ref = store.put_dir(_dir(tmp_path / "m", {"model.safetensors": b"w"}), "models/m")
    other_bucket = ArtifactRef(
        uri="s3://elsewhere/runs/models/m/model.safetensors", sha256=ref.files["model.safetensors"].sha256, bytes=1
    )
    with pytest.raises(UnsafeKeyError, match="not an object of the store"):
        store.local_path(other_bucket)
    # A file name that would place the download at ~/.bashrc instead of inside the cached directory.
    escaping = DirRef(uri=ref.uri, files={"../../../../.bashrc": ref.files["model.safetensors"]})
    with pytest.raises(UnsafeKeyError, match="refused"):
        store.local_dir(escaping)
    assert not (tmp_path / "home" / ".bashrc").exists()
    assert (store.local_dir(ref) / "model.safetensors").read_bytes() == b"w"


class _FlakyProxy(BaseHTTPRequestHandler):
    """Answers the first `failures` requests with `status` `code` (503 SlowDown), then forwards to the real endpoint."""

    failures = 0
    status, code = 503, "SlowDown"
    seen = 0
    upstream = ""

    def _handle(self):
        cls = type(self)
        cls.seen += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if cls.seen <= cls.failures:
            msg = f"<Error><Code>{cls.code}</Code><Message>Refused by the test proxy.</Message></Error>".encode()
            self.send_response(cls.status)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        host, port = cls.upstream.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


def test_s3_transient_errors_are_retried(s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    _FlakyProxy.failures, _FlakyProxy.seen, _FlakyProxy.upstream = 3, 0, s3_endpoint
    _FlakyProxy.status, _FlakyProxy.code = 503, "SlowDown"
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        store = S3Store(f"s3://{s3_bucket}/retry", cache_dir=tmp_path / "cache")
        ref = store.put_text("survives throttling", "obj.txt")
        assert store.read_text(ref) == "survives throttling"
        assert _FlakyProxy.seen > _FlakyProxy.failures  # the 503s were answered by retrying, not by failing
    finally:
        proxy.shutdown()


def test_s3_throttling_beyond_the_budget_is_one_store_error(s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    _FlakyProxy.failures, _FlakyProxy.seen, _FlakyProxy.upstream = 10**9, 0, s3_endpoint
    _FlakyProxy.status, _FlakyProxy.code = 503, "SlowDown"
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("DAPT_STORE_RETRY_SECONDS", "2")
        store = S3Store(f"s3://{s3_bucket}/throttled", cache_dir=tmp_path / "cache")
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"s3://{s3_bucket}/throttled/obj.txt: {endpoint} kept throttling") as e:
            store.put_text("never stored", "obj.txt")
        assert e.value.kind == "throttled" and "DAPT_STORE_RETRY_SECONDS=2" in str(e.value)
        assert time.monotonic() - started < 2 + 2  # the budget, plus at most one backoff cut short
        assert _FlakyProxy.seen >= 2  # it did retry, with backoff, before giving up
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        assert not S3Store(f"s3://{s3_bucket}/throttled").exists("obj.txt")
    finally:
        proxy.shutdown()


@pytest.mark.parametrize(
    ("status", "code", "kind", "says"),
    [
        (403, "AccessDenied", "access_denied", "access denied by"),
        (403, "InvalidAccessKeyId", "credentials", "rejected the S3 credentials"),
        (404, "NoSuchBucket", "no_bucket", "does not exist on"),
    ],
)
def test_s3_final_errors_are_not_retried(s3_bucket, s3_endpoint, monkeypatch, tmp_path, status, code, kind, says):
    _FlakyProxy.failures, _FlakyProxy.seen, _FlakyProxy.upstream = 10**9, 0, s3_endpoint
    _FlakyProxy.status, _FlakyProxy.code = status, code
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        store = S3Store(f"s3://{s3_bucket}/final", cache_dir=tmp_path / "cache")
        with pytest.raises(StoreError) as e:
            store.put_text("never stored", "obj.txt")
        message = str(e.value)
        assert e.value.kind == kind and message.startswith(f"s3://{s3_bucket}/final/obj.txt: ")
        assert says in message and endpoint in message
        assert _FlakyProxy.seen == 1  # one request: retrying cannot help
    finally:
        proxy.shutdown()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_directories_roundtrip(backend, tmp_path, request):
    if backend == "s3":
        store = S3Store(f"s3://{request.getfixturevalue('s3_bucket')}/dirs", cache_dir=tmp_path / "cache")
    else:
        store = LocalStore(tmp_path / "store")
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    ref = store.put_dir(src, "models/m1")
    assert sorted(ref.files) == ["config.json", "sub/weights.bin"]
    local = store.local_dir(ref)
    assert (local / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert ref.sha256 == store.put_dir(src, "models/m2").sha256  # content hash, not location


def test_dead_endpoint_is_given_up_on_once_per_outage(monkeypatch, tmp_path):
    """The budget is the outage's, not each request's: once spent, later requests fail after one attempt."""
    from tests.local_services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("DAPT_STORE_RETRY_SECONDS", "1.5")
    store = S3Store("s3://bucket/outage", cache_dir=tmp_path / "cache")
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"s3://bucket/outage/a.txt: cannot reach the S3 endpoint {dead}") as e:
        store.put_text("a", "a.txt")
    first = time.monotonic() - started
    assert e.value.kind == "unreachable" and 0.5 < first < 1.5 + 1.5
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach"):
        store.exists("b.txt")
    assert time.monotonic() - started < 1.0  # one attempt; retrying would spend the 1.5 s budget again (0.66 s seen
    # for the one attempt on a loaded 2-core machine, so the bound is not tighter)
