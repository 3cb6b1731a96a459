"""Cached per-shard parts of the clean stage, so a refresh runs the per-document pass on new shards only.

The per-document pass (normalise, quality, decontamination, MinHash signatures and LSH band keys) is most of the
clean stage's work, and each shard's result depends only on that shard, the clean settings, the eval n-grams and the
code. Its three parts (docs, signatures, bands; `seq` numbered within the shard) are kept in the artifact store under
a key of exactly those inputs: a nightly refresh computes them for the shards of new or changed files and reuses the
stored signatures of everything seen before. The dedup shuffle's map output of a shard is kept the same way (`dedup`),
keyed also on where the shard sits in the corpus, and so are a run's near-duplicate clusters, keyed on its shards' map
outputs: a refresh whose new shards come after the earlier ones pairs only the LSH buckets holding a new document. A
shard's part of the kept corpus is kept too, keyed on its parts and which of its documents were kept. The rest of the
set work (exact groups, components, decisions) runs over all parts, so the result is the one a full run on the union
gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from dapt_core import layout
from dapt_core.hashing import stable_hash
from dapt_core.manifest import ArtifactRef
from dapt_core.store import ArtifactStore, IntegrityError

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
    key: str | None = None
    """The parts' identity in the cache (shard content, clean recipe, code), or None when they are not cached."""

    @property
    def end_seq(self) -> int:
        """One past the global seq of the shard's last document."""
        return self.first_seq + self.documents


class PartCache(Protocol):
    """Files computed from one shard, kept by a key of everything they depend on."""

    def key(self, shard: Path, recipe: str) -> str:
        """The key of what `recipe` makes of `shard` (its content, not its path)."""
        ...

    def stored(self, key: str, names: tuple[str, ...]) -> dict[str, ArtifactRef] | None:
        """The files `names` stored under `key` when they are all there with their sizes (nothing read yet), or None."""
        ...

    def verified(self, files: dict[str, ArtifactRef]) -> dict[str, Path] | None:
        """Local paths of stored files whose bytes match their sha256, or None when one was damaged in place."""
        ...

    def fetch(self, key: str, names: tuple[str, ...]) -> dict[str, Path] | None:
        """Local paths of the files `names` stored under `key`, or None when they are not all there (intact)."""
        ...

    def keep(self, key: str, files: dict[str, Path]) -> dict[str, ArtifactRef]:
        """Store the files just computed under `key`; their stored artifacts."""
        ...


class StoredParts(BaseModel):
    """The record of the files kept under one key (written after them: a record means every file was stored)."""

    files: dict[str, ArtifactRef]


class StorePartCache:
    """Files in the artifact store at clean/parts/<key>/, keyed on the shard's content hash, the recipe and the code."""

    def __init__(self, store: ArtifactStore, shard_hashes: dict[Path, str], code_version: str):
        self.store = store
        self.shard_hashes = shard_hashes
        self.code_version = code_version

    def key(self, shard: Path, recipe: str) -> str:
        return stable_hash(self.shard_hashes[shard], recipe, self.code_version)

    def stored(self, key: str, names: tuple[str, ...]) -> dict[str, ArtifactRef] | None:
        prefix = layout.clean_part_prefix(key)
        record = f"{prefix}/parts.json"
        if not self.store.exists(record):
            return None
        try:
            parts = StoredParts.model_validate_json(self.store.read_key(record))  # data only, as every manifest
        except ValueError:
            return None
        own = {name: self.store.uri(f"{prefix}/{name}.parquet") for name in names}
        if {name: ref.uri for name, ref in parts.files.items()} != own:
            return None  # another layout, or a record naming other objects (never followed): compute the shard again
        if any(self.store.check(ref) for ref in parts.files.values()):
            return None  # a file missing or resized: compute the shard again
        return {name: parts.files[name] for name in names}

    def verified(self, files: dict[str, ArtifactRef]) -> dict[str, Path] | None:
        try:
            return {name: self.store.local_path(ref) for name, ref in files.items()}
        except IntegrityError:
            return None  # damaged in place, its size unchanged: computed again, the new files replace it

    def fetch(self, key: str, names: tuple[str, ...]) -> dict[str, Path] | None:
        files = self.stored(key, names)
        return self.verified(files) if files else None

    def keep(self, key: str, files: dict[str, Path]) -> dict[str, ArtifactRef]:
        prefix = layout.clean_part_prefix(key)
        refs = {name: self.store.put_file(path, f"{prefix}/{name}.parquet") for name, path in files.items()}
        self.store.put_text(StoredParts(files=refs).model_dump_json(), f"{prefix}/parts.json")
        return refs
