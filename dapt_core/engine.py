"""Where the data stages' independent pieces of work run: in this process (`local`) or on a Ray cluster (`ray`).

A stage is written once, as a function applied to independent work items (a batch of input files, a shard of
documents, a partition of LSH band keys) whose results are small (manifests, counts) and whose data goes to files
that every node can reach (the artifact store, or a scratch folder on storage they share). `LocalEngine` applies it
in a loop; `RayEngine` runs each item as a Ray task, which Ray retries on another worker when a worker process or
node dies (`max_retries`), so both engines give the same results. Ray is imported only by `RayEngine`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from dapt_core.config import PrepareConfig

Item = TypeVar("Item")
Result = TypeVar("Result")


class Engine(Protocol):
    slots: int  # items that can run at once: what a stage sizes its parallel work by

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        """fn applied to every item, results in item order."""
        ...


# Items of every LocalEngine running at once in this process, at most one per core. Prefect runs each task in a thread
# of its own: 13 ingest batches of small files, all at once on 2 cores, took 1.4 s against 1.0 s two at a time, the
# threads slowing each other down on the GIL. One per core (not one in all) still overlaps the waits of S3 reads.
_CORES = threading.BoundedSemaphore(os.cpu_count() or 1)


class LocalEngine:
    """Every item in this process, in order (and at most one per core across the process's threads)."""

    slots = 1

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        results = []
        for item in items:
            with _CORES:
                results.append(fn(item))
        return results


class RayEngine:
    """Every item a Ray task (one CPU each) on the cluster at `address`, retried when its worker dies."""

    def __init__(self, address: str, max_retries: int):
        import ray

        if not ray.is_initialized():
            # Workers import dapt_core from their own environment (the image of a KubeRay cluster, or the same
            # Python as a `ray start` node); only the driver's PYTHONPATH is passed on, for a source checkout.
            env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        self._ray = ray
        self.max_retries = max_retries

    @functools.cached_property
    def slots(self) -> int:
        """The cluster's CPUs, asked once and only by a stage that sizes its work by them (the dedup shuffle)."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        remote = self._ray.remote(num_cpus=1, max_retries=self.max_retries)(_apply)
        return self._ray.get([remote.remote(fn, item) for item in items])


def _apply(fn: Callable[[Item], Result], item: Item) -> Result:
    """One Ray task: any callable (a function, a functools.partial) applied to one item."""
    return fn(item)


def open_engine(cfg: PrepareConfig) -> Engine:
    """The engine `prepare.engine` names; a Ray cluster's address comes from `prepare.ray_address` or RAY_ADDRESS."""
    if cfg.engine == "local":
        return LocalEngine()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError(
            "prepare.engine is 'ray' but no cluster address is set: set prepare.ray_address (e.g. 'ray://head:10001' "
            "or '127.0.0.1:6379') or the RAY_ADDRESS environment variable, or use prepare.engine: local."
        )
    return RayEngine(address, cfg.ray_max_retries)
