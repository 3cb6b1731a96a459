"""Cached per-shard parts of the clean stage, so a refresh runs the per-document pass on new shards only.

The per-document pass (normalise, quality, decontamination, MinHash signatures and LSH band keys) is most of the
clean stage's work, and each shard's result depends only on that shard, the clean settings, the eval n-grams and the
code. Its three parts (docs, signatures, bands; `seq` numbered within the shard) are kept in the artifact store under
a key of exactly those inputs: a nightly refresh computes them for the shards of new or changed files and reuses the
stored signatures of everything seen before. The set work (exact groups, LSH buckets, verification, components,
decisions) then runs over all parts, so the result is the one a full run on the union gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from dapt_core import layout
from dapt_core.hashing import stable_hash
from dapt_core.manifest import ArtifactRef
from dapt_core.store import ArtifactStore

PART_NAMES = ("docs", "signatures", "bands")


@dataclass(frozen=True)
class ShardParts:
    """One shard's parts (Parquet files, `seq` numbered from 0 within the shard) and where the shard's documents sit
    in the corpus: global seq = first_seq + the part's seq, for `documents` rows."""

    docs: Path
    signatures: Path
    bands: Path
    first_seq: int
    documents: int

    @property
    def end_seq(self) -> int:
        """One past the global seq of the shard's last document."""
        return self.first_seq + self.documents


class PartCache(Protocol):
    def fetch(self, shard: Path, recipe: str) -> dict[str, Path] | None:
        """Local paths of the stored parts of `shard` made by `recipe`, or None when there are none (intact)."""
        ...

    def keep(self, shard: Path, recipe: str, files: dict[str, Path]) -> None:
        """Store the parts just computed for `shard`."""
        ...


class StoredParts(BaseModel):
    """The record of one shard's parts (written after them: a record means every part was stored)."""

    docs: ArtifactRef
    signatures: ArtifactRef
    bands: ArtifactRef


class StorePartCache:
    """Parts in the artifact store at clean/parts/<hash of shard content, recipe, code>/."""

    def __init__(self, store: ArtifactStore, shard_hashes: dict[Path, str], code_version: str):
        self.store = store
        self.shard_hashes = shard_hashes
        self.code_version = code_version

    def _prefix(self, shard: Path, recipe: str) -> str:
        return layout.clean_part_prefix(stable_hash(self.shard_hashes[shard], recipe, self.code_version))

    def fetch(self, shard: Path, recipe: str) -> dict[str, Path] | None:
        record = f"{self._prefix(shard, recipe)}/parts.json"
        if not self.store.exists(record):
            return None
        try:
            parts = StoredParts.model_validate_json(self.store.read_key(record))  # data only, as every manifest
        except ValueError:
            return None
        refs = {name: getattr(parts, name) for name in PART_NAMES}
        if any(self.store.check(ref) for ref in refs.values()):
            return None  # a part is missing or damaged: compute the shard again
        return {name: self.store.local_path(ref) for name, ref in refs.items()}

    def keep(self, shard: Path, recipe: str, files: dict[str, Path]) -> None:
        prefix = self._prefix(shard, recipe)
        refs = {name: self.store.put_file(files[name], f"{prefix}/{name}.parquet") for name in PART_NAMES}
        self.store.put_text(StoredParts(**refs).model_dump_json(), f"{prefix}/parts.json")
