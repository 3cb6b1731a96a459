"""Where task results live, so that a retry or a fresh worker finds finished stages.

Results (small JSON manifests) are persisted in the dapt artifact store itself, through the same
atomic writes as every artifact: a retry, a re-run of `dapt prepare`, or a nightly run on another
worker that points at the same store (local directory or s3://) reuses every finished task.
Cache keys are content hashes computed by each task module, never run ids.
"""

from __future__ import annotations

from prefect.filesystems import WritableFileSystem

from dapt_core.hashing import stable_hash
from dapt_core.store import ArtifactStore, open_store

RESULTS_PREFIX = "prefect-results"


class StoreResultStorage(WritableFileSystem):
    """Prefect result storage backed by the dapt artifact store (local or S3, atomic writes)."""

    _block_type_name = "dapt artifact store"
    _block_type_slug = "dapt-artifact-store"

    store_uri: str

    def _store(self) -> ArtifactStore:
        return open_store(self.store_uri)

    # Prefect calls these with `_sync=True` from sync code and awaits the `a`-prefixed twins from async code.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        return self._store().read_key(f"{RESULTS_PREFIX}/{path}")

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        return self._store().put_bytes(content, f"{RESULTS_PREFIX}/{path}").uri

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def result_storage_for(store_uri: str) -> StoreResultStorage:
    """The storage block for `store_uri`, saved server-side (Prefect requires it) under a name derived from the uri."""
    block = StoreResultStorage(store_uri=store_uri)
    block.save(f"dapt-results-{stable_hash(store_uri)[:12]}", overwrite=True)
    return block


def was_cached(future) -> bool:
    """True when a finished task run was answered from the cache rather than computed."""
    return future.state.name == "Cached"
