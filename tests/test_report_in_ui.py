"""The report artifact's plots render in the Prefect UI, checked in a real browser (headless Chromium).

Slow (a Prefect server with its UI, a browser): `pytest -m slow tests/test_report_in_ui.py`. Needs `chromium` on PATH
(Debian: `apt-get install chromium`); skipped without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dapt_core.report import inline_images
from tests.local_services import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)"),
]


def _chromium(*args: str) -> str:
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def test_report_plots_render_in_the_prefect_ui(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import ArtifactCreate

    plot = tmp_path / "funnel.png"
    plt.figure(figsize=(4, 3))
    plt.bar(["kept", "dropped"], [30, 12], color="tab:red")
    plt.savefig(plot)
    markdown = inline_images("# dapt report: ui\n\n![funnel](funnel.png)\n", {"funnel": plot})

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=f"{url}/api"
    )
    with open(tmp_path / "server.log", "wb") as log:  # the server keeps its own copy of the handle
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)

        async def create() -> str:
            async with PrefectClient(f"{url}/api") as client:
                return str(
                    (await client.create_artifact(ArtifactCreate(key="dapt-report", type="markdown", data=markdown))).id
                )

        page = f"{url}/artifacts/artifact/{asyncio.run(create())}"
        dom = _chromium("--dump-dom", page)
        assert "dapt report: ui" in dom, (tmp_path / "server.log").read_text()[-2000:]
        assert 'src="data:image/png;base64,' in dom  # the UI's markdown renderer kept the embedded plot
        shot = tmp_path / "artifact.png"
        _chromium("--window-size=1200,900", f"--screenshot={shot}", page)
        assert shot.stat().st_size > 10_000 and Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
