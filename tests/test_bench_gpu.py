"""bench/gpu.py imports and runs its whole code path on a CPU-only machine (`--cpu-smoke`: a tiny Llama, 3 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_gpu_bench_cpu_smoke_reports_every_figure():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--cpu-smoke"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("tiny single sdpa")]
    for figure in ("tokens/s", "MFU n/a", "peak mem n/a", "eval/train", "first-step loss", "vs CPU fp32"):
        assert figure in line, line
    assert line.split(" [")[0].endswith("PASS")  # fp32 on the CPU vs fp32 on the CPU: identical
