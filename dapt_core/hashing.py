"""Content hashes: the keys of every cache and the checksums of every artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

_CHUNK = 1 << 20


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


def code_version(*modules: ModuleType) -> str:
    """Hash of the source files of `modules` (a package counts with all its .py files).

    Prefect's TASK_SOURCE policy only hashes a task's own body, not the helpers it calls, so every
    cache key carries this explicit version of the code that really does the work.
    """
    h = hashlib.sha256()
    for module in modules:
        root = Path(module.__file__)
        files = sorted(root.parent.rglob("*.py")) if root.name == "__init__.py" else [root]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
