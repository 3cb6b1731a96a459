"""Local services the tests and benchmarks start for real: a free TCP port, and a two-node Ray cluster on 127.0.0.1
(a head node and a second node joining it) whose teardown kills that cluster only (`ray stop` would stop every
Ray cluster of this user on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(
    node_limits: list[str], start_timeout_s: float, stop_timeout_s: float = 30, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """A head node and a second node joining it, each with `node_limits` (`ray start` options), for the `with` block;
    yields the cluster's address. Its files sit in a fresh short temp dir (Ray's socket paths must stay under 107
    bytes), removed with the cluster, which is stopped even when a start fails half way."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
    try:
        yield _start_ray_cluster(temp_dir, node_limits, env, start_timeout_s)
    finally:
        _stop_ray_cluster(temp_dir, stop_timeout_s)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_ray_cluster(temp_dir: str, node_limits: list[str], env: dict[str, str], timeout_s: float) -> str:
    port = free_port()
    local = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", *node_limits]
    head = [
        str(RAY),
        "start",
        "--head",
        "--port",
        str(port),
        "--temp-dir",
        temp_dir,
        "--include-dashboard=false",
        "--ray-client-server-port",
        str(free_port()),
        *local,
    ]
    second = [str(RAY), "start", "--address", f"127.0.0.1:{port}", *local]
    for command in (head, second):
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=timeout_s)
    return f"127.0.0.1:{port}"


def _stop_ray_cluster(temp_dir: str, timeout_s: float) -> None:
    """Kill the processes of the cluster whose command lines name `temp_dir`, and their children."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in me and any(temp_dir in a for a in (p.info["cmdline"] or [])):
            try:
                procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(list(procs.values()), timeout=timeout_s)
