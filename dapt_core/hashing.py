"""Content hashes: the keys of every cache and the checksums of every artifact."""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

_CHUNK = 1 << 20
PACKAGE_DIR = Path(__file__).resolve().parent  # dapt_core/: code versions follow imports within it


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(*parts: object) -> str:
    """sha256 of JSON-serialisable parts (pydantic models included), independent of dict order."""

    def plain(x: object) -> object:
        if isinstance(x, BaseModel):
            return x.model_dump(mode="json")
        if isinstance(x, (list, tuple)):
            return [plain(i) for i in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(*core: Callable, task_module: ModuleType | None = None) -> str:
    """Version of the code a cached task runs: a hash of the source of the modules of its `core` functions, of every
    dapt_core module they import (transitively; see `imported_sources`), and of the task module itself (its body and
    cache key).

    Prefect's TASK_SOURCE policy only hashes a task's own body, not the helpers it calls, so every cache key carries
    this explicit version; derived from the imports, it covers a helper module added later without anyone listing it.
    """
    files: set[Path] = set()
    for fn in core:
        files |= imported_sources(Path(sys.modules[fn.__module__].__file__))
    if task_module is not None:
        files.add(Path(task_module.__file__))
    return sources_hash(files, PACKAGE_DIR.parent)


def imported_sources(start: Path, package_dir: Path = PACKAGE_DIR) -> set[Path]:
    """`start` and every module of the package at `package_dir` that it imports, directly or through other modules of
    the package, read statically from the source (imports inside functions count: they run too). Importing a module
    runs its packages' `__init__.py`, so those count as well."""
    package = package_dir.name
    seen: set[Path] = set()
    todo = [start.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        module = _module_name(path, package_dir)
        for name in _imported_names(path, module):
            if name == package or name.startswith(package + "."):
                todo += [f for f in _files_of(name, package_dir) if f not in seen]
    return seen


def sources_hash(files: set[Path], relative_to: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(relative_to).as_posix().encode() if f.is_relative_to(relative_to) else f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _module_name(path: Path, package_dir: Path) -> str | None:
    """Dotted name of a file inside the package (None outside it)."""
    if not path.is_relative_to(package_dir):
        return None
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path, module: str | None) -> Iterator[str]:
    """Every dotted name an import statement of `path` may refer to as a module (`from a import b`: a and a.b)."""
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and module is not None:
                is_package = path.name == "__init__.py"
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _files_of(name: str, package_dir: Path) -> list[Path]:
    """The file of module `name` (inside the package) and the `__init__.py` of every package above it."""
    parts = name.split(".")[1:]
    files = [package_dir / "__init__.py"]
    for k in range(1, len(parts) + 1):
        stem = package_dir.joinpath(*parts[:k])
        files += [f for f in (stem / "__init__.py", stem.with_suffix(".py")) if f.is_file()]
    return [f.resolve() for f in files if f.is_file()]
