"""Discovery: a source's paths -> fingerprinted input files (`InputFiles`, by uri), and the files it refuses.

Kept apart from ingest (which reads the files) so that how files are found is not part of ingest's code version: a
change here does not re-ingest a corpus. A refresh walks every file of the corpus to find the few new ones, so the
walk is os.scandir on string paths, and an unchanged file keeps its fingerprint without being read
(`fingerprints.FingerprintMemo`).
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Callable, Iterator
from functools import partial
from itertools import takewhile
from pathlib import Path
from typing import NamedTuple

from dapt_core import ingest_s3
from dapt_core.config import SourceConfig
from dapt_core.fingerprints import FingerprintMemo
from dapt_core.hashing import sha256_file
from dapt_core.ingest import file_format, unsupported_detail
from dapt_core.input_files import InputFiles
from dapt_core.manifest import Kind, QuarantineRecord


class _Found(NamedTuple):
    """A file found and fingerprinted: a row of `InputFiles` (a model per file cost more than the walk)."""

    uri: str
    fingerprint: str
    bytes: int


def discover_inputs(
    source: SourceConfig, kind: Kind, memo: FingerprintMemo | None = None
) -> tuple[InputFiles, list[QuarantineRecord]]:
    """Expand a source's paths into fingerprinted input files (sorted by uri) and the files that cannot be ingested.

    A path matching nothing is a config mistake and raises FileNotFoundError before any work starts. Hidden files and
    folders met while expanding a directory or glob are skipped; a file named explicitly is taken as named. With a
    `memo`, a local file unchanged since it was last hashed keeps its fingerprint (dapt_core/fingerprints.py).
    """
    quarantine = partial(QuarantineRecord, source=source.name, kind=kind, position="file")
    inputs: dict[str, _Found] = {}
    refused: dict[str, QuarantineRecord] = {}
    for spec in source.paths:
        found = (
            ingest_s3.s3_inputs(spec, _Found, quarantine, file_format, unsupported_detail)
            if spec.startswith("s3://")
            else _local_inputs(spec, quarantine, memo)
        )
        matched = False
        for item in found:
            matched = True
            if isinstance(item, _Found):
                inputs[item.uri] = item
            else:
                refused[item.file] = item
        if not matched:
            raise FileNotFoundError(
                f"{spec}: matches no input files (source {source.name!r}, {kind} data). "
                "Fix or remove this path in the config; relative paths are resolved against the config file's folder."
            )
    files = InputFiles.of_source(inputs.values(), source.name, kind, source.text_field)
    return files, sorted(refused.values(), key=lambda q: q.file)


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _local_inputs(spec: str, quarantine: Callable, memo: FingerprintMemo | None) -> Iterator[_Found | QuarantineRecord]:
    """Files under a local path or glob. The input root of a glob is its fixed leading folder, of a directory itself."""
    if _is_glob(spec):
        root = Path(*takewhile(lambda part: not _is_glob(part), Path(spec).parts))
        matches = [(Path(m), root) for m in sorted(glob.glob(spec, recursive=True))]
    elif os.path.lexists(spec):
        path = Path(spec)
        matches = [(path, path if path.is_dir() else None)]  # an explicitly named file is trusted, link or not
    else:
        matches = []
    for path, root in matches:
        if root is not None and not _inside(path, root):
            yield _outside_root(path, root, quarantine)
        elif path.is_dir():
            yield from _walk(path, root, quarantine, memo)
        else:
            yield _local_file(path, quarantine, memo)


def _walk(
    top: Path, root: Path, quarantine: Callable, memo: FingerprintMemo | None
) -> Iterator[_Found | QuarantineRecord]:
    """Every file under `top` (in no particular order: discovery sorts). A refresh walks the whole corpus to find the
    few new files, so this is os.scandir on string paths: a folder entry says whether it is a file, a folder or a
    link without a system call, and its stat is the one lstat a file needs."""
    folders = [os.path.abspath(top)]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as e:
            yield quarantine(file=folder, reason="unreadable", detail=f"cannot list folder: {e}; check its permissions")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif not entry.is_symlink():
                # Not a link, in a folder walked through its real path inside the root: inside the root too, so
                # no realpath (two per file cost more than the file's sha256 on a folder of small notes).
                yield _local_file(entry.path, quarantine, memo, entry)
            elif not _inside(Path(entry.path), root):
                yield _outside_root(Path(entry.path), root, quarantine)
            elif not entry.is_dir():  # a linked folder inside the root is walked through its real path
                yield _local_file(entry.path, quarantine, memo)


def _outside_root(path: Path, root: Path, quarantine: Callable) -> QuarantineRecord:
    return quarantine(
        file=os.path.abspath(path),
        reason="symlink_outside_root",
        detail=f"links to {os.path.realpath(path)}, outside the input root {os.path.abspath(root)}; not read. "
        "Copy the target into the input folder or name it explicitly in the config.",
    )


def _local_file(
    path: str | Path,
    quarantine: Callable,
    memo: FingerprintMemo | None,
    entry: os.DirEntry | None = None,
) -> _Found | QuarantineRecord:
    """`entry`: the walk's folder entry of a file that is not a link; its path is absolute and normalised already (no
    abspath, no name parsing for each of a corpus's files) and it stats the file without following links."""
    uri, name = (entry.path, entry.name) if entry is not None else (os.path.abspath(path), os.path.basename(path))
    if file_format(name) is None:
        return quarantine(file=uri, reason="unsupported_format", detail=unsupported_detail(name))
    try:
        st = entry.stat(follow_symlinks=False) if entry is not None else os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return quarantine(file=uri, reason="unreadable", detail="not a regular file (device, FIFO or socket)")
        fingerprint = memo.fingerprint(uri, st, lambda: sha256_file(path)) if memo else sha256_file(path)
        return _Found(uri, fingerprint, st.st_size)
    except OSError as e:
        return quarantine(file=uri, reason="unreadable", detail=f"{e}; check the file exists and its permissions")
