"""The installed import packages are dapt_core, dapt.flows and dapt.tasks: a user's Prefect project with its own
`flows/` or `tasks/` package keeps importing its own, and a non-editable install carries every package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _listed_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_library_package_is_listed_for_installation():
    """pyproject lists packages by name (the Prefect layers are mapped into dapt.*): a new subpackage of dapt_core
    that is not listed would be missing from a non-editable install."""
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dapt_core").rglob("__init__.py")} | {
        "dapt.flows",
        "dapt.tasks",
    }
    assert _listed_packages() == on_disk


@pytest.mark.integration
def test_non_editable_install_does_not_shadow_a_users_flows_and_tasks(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    [wheel] = wheels.glob("dapt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith(("flows/", "tasks/")) for n in names), "top-level flows/tasks would shadow a user's"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    project = tmp_path / "user-project"  # a Prefect project with its own flows/ and tasks/ packages
    for pkg in ("flows", "tasks"):
        (project / pkg).mkdir(parents=True)
        (project / pkg / "__init__.py").write_text(f"OWNER = 'user {pkg}'\n")
    code = (
        "import flows, tasks, dapt.flows.cli, dapt.tasks.cpt, dapt_core.cpt; "
        "assert flows.OWNER == 'user flows' and tasks.OWNER == 'user tasks'; "
        f"assert dapt.flows.cli.__file__.startswith({str(site)!r}), dapt.flows.cli.__file__; "
        "print('ok')"
    )
    # The installed copy only: the repository is not on the path (cwd is the user's project, no PYTHONPATH).
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
