"""Leftovers of killed runs: `dapt-*` temp folders (checkpoint copies can be gigabytes) and `.partial` files.

Every temp folder and partial file dapt creates carries its owner in its name, `<pid>@<host>`. One is abandoned when
that process is gone (or the pid now belongs to a process started after the file was last touched), or, for a
different host's files (a store shared over NFS), when untouched for MAX_AGE_S. A concurrently running run's files
are never abandoned. Names without an owner tag (written by older versions, or not by dapt) are left alone.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil

log = logging.getLogger("dapt.leftovers")

MAX_AGE_S = 24 * 3600
TEMP_PREFIX = "dapt-"
_OWNER = re.compile(r"(\d+)@(\w+)")


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """`<pid>@<host>` of this process, as it appears in the names of its temp folders and partial files."""
    return f"{os.getpid()}@{_host()}"


def abandoned(path: Path) -> bool:
    """Whether `path` (named with an owner tag) was left behind by a process that no longer runs."""
    tags = list(_OWNER.finditer(path.name))
    if not tags:
        return False
    match = tags[-1]  # the owner tag comes after the name the partial file is for
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    if match.group(2) != _host():
        return time.time() - mtime > MAX_AGE_S
    try:
        started = psutil.Process(int(match.group(1))).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    return started > mtime + 1  # the pid was reused by a process younger than the file


def temp_dir(stage: str) -> tempfile.TemporaryDirectory:
    """A temp folder for `stage` named `dapt-<stage>-<pid>@<host>-…`, after removing abandoned ones."""
    sweep_temp_dirs()
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{stage}-{owner_tag()}-")


def sweep_temp_dirs() -> list[Path]:
    """Remove abandoned `dapt-*` folders under the temp dir (TMPDIR); returns what was removed."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        if path.is_dir() and not path.is_symlink() and abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temp folder(s) of killed runs: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def partial_prefix(name: str) -> str:
    """Prefix of a partial file written on the way to `name` (tempfile.mkstemp(prefix=..., suffix=".partial"))."""
    return f".{name}.{owner_tag()}."


def sweep_partials(directory: Path, name: str = "*", recursive: bool = False) -> list[Path]:
    """Remove abandoned `.partial` files on the way to `name` in `directory` (and below, when recursive)."""
    pattern = f".{name if name == '*' else glob.escape(name)}.*.partial"
    found = Path(directory).rglob(pattern) if recursive else Path(directory).glob(pattern)
    removed = []
    for path in found:
        if path.is_file() and abandoned(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
