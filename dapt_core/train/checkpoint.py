"""Training checkpoints: written atomically, read back as data only.

out_dir/checkpoint-<step>/ holds `model.safetensors` (all weights for `full`, the trainable weights for `lora`; under
FSDP gathered from the shards on rank 0, so a checkpoint is always a consolidated model that evaluation and promotion
load), `config.json` (full: the directory loads with `from_pretrained`), the optimizer state, `scheduler.pt`, `rng.pt`
(python, numpy, torch, cuda) and `trainer_state.json` (step, data position, loss history), written last. The optimizer
state is `optimizer.pt` (DDP and one process: rank 0's copy) or `optimizer/` (FSDP: one shard per rank, written with
torch.distributed.checkpoint; each rank writes and reads only its own slice, so no process ever holds the whole
AdamW state).

Nothing from a checkpoint is ever unpickled: the .pt files hold plain data (tensors, numbers, lists, dicts) and are
read with `torch.load(weights_only=True)` (`load_state`); the sharded optimizer's metadata is read by an allow-list
unpickler that builds only torch.distributed.checkpoint's metadata classes (`SafeShardReader`). A checkpoint
downloaded from a shared store is therefore data, whoever wrote it. The directory is written under a temporary name
and renamed into place, so a checkpoint that exists is complete.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"  # step, data position, seed, history: written last, so its presence = complete
SHARDED_OPTIMIZER = "optimizer"  # directory of torch.distributed.checkpoint shards (FSDP)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[n] = p.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module, path: Path, method: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights a checkpoint keeps; `state` (FSDP: gathered from the shards) replaces reading `model`."""
    from safetensors.torch import save_file, save_model

    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif method == "lora":
        save_file(_trainable_state(model), str(path))
    else:
        save_model(model, str(path))  # drops tied duplicates (embed_tokens / lm_head), loads back with load_model


def load_weights(model: torch.nn.Module, path: Path, method: str) -> None:
    from safetensors.torch import load_file, load_model

    if method == "lora":
        state = load_file(str(path))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
    else:
        load_model(model, str(path), strict=True)


def read_trainer_state(checkpoint: Path) -> dict:
    """The trainer state `write_checkpoint` stored in `checkpoint` (the training loop's `Run.trainer_state`)."""
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def write_trainer_state(checkpoint: Path, state: dict) -> None:
    (checkpoint / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state.json), by step."""
    found = []
    for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (p / TRAINER_STATE).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def remove_partial(out_dir: Path) -> None:
    """Drop checkpoint directories a killed run left half-written."""
    for stale in out_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and floats only: resume reads it with torch.load(weights_only=True), so a
    checkpoint from the store is data and never unpickled (python's and numpy's own state objects would need pickle)."""
    version, mt, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _refusal(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{path}: refused to load: it holds more than plain data (tensors, numbers, lists, dicts) "
        f"({str(error).splitlines()[0][:200]}). It was changed after it was written or comes from an older dapt. "
        f"Delete {path.parent} to resume from the checkpoint before it, or start the run afresh."
    )


def load_state(path: Path, map_location: torch.device | str | None = None) -> Any:
    """A checkpoint's optimizer / scheduler / RNG state, read as plain data (weights_only=True: tensors, numbers,
    strings, lists, dicts); a file that needs anything else is refused, never unpickled."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def write_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    method: str,
    trainer_state: dict,
    weights: dict[str, torch.Tensor] | None = None,
    sharded_optimizer: bool = False,
) -> Path:
    """Write checkpoint-<step> (rank 0). With `sharded_optimizer` the ranks have already written their optimizer
    shards into `staging_dir(out_dir, step)`, which becomes the checkpoint."""
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = staging_dir(out_dir, step)
    if not sharded_optimizer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_weights(model, tmp / "model.safetensors", method, weights)
    if method == "full" and hasattr(model, "config"):
        model.config.save_pretrained(tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_trainer_state(tmp, trainer_state)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-run over an old checkpoint of the same step: replace it
        old = out_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


def staging_dir(out_dir: Path, step: int) -> Path:
    """Where checkpoint-<step> is assembled before the rename; the same name on every rank (sharded writes)."""
    return out_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"


# ---------------------------------------------------------------------------------- sharded optimizer (FSDP)
def save_sharded_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path, step: int, device: torch.device
) -> None:
    """Every rank writes its slice of the AdamW state into the staging directory (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tmp = staging_dir(out_dir, step)
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    visible = torch.tensor([int(tmp.is_dir())], device=device)
    torch.distributed.all_reduce(visible, op=torch.distributed.ReduceOp.MIN)
    if not visible.item():
        raise ValueError(
            f"train.strategy fsdp: {out_dir} is not on a filesystem every rank shares (the sharded optimizer state is "
            "assembled there): with train.nnodes > 1 run every node with the same WORKDIR on a shared volume "
            "(deployments/README.md, Several nodes), or use train.strategy ddp"
        )
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED_OPTIMIZER)))


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Read this rank's slice of the AdamW state back (metadata through the restricted unpickler)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    path = checkpoint / SHARDED_OPTIMIZER
    if not path.is_dir():
        raise ValueError(
            f"{checkpoint}: no {SHARDED_OPTIMIZER}/ shards: it was written by train.strategy ddp; resume it with ddp"
        )
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, storage_reader=SafeShardReader(str(path)))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _metadata_classes() -> list:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as meta

    names = [
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "Metadata",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    ]
    return [getattr(meta, n) for n in names if hasattr(meta, n)] + [fs._StorageInfo]


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what torch.distributed.checkpoint's metadata is made of (its dataclasses, torch.Size, dtypes,
    layouts, paths); any other global (os.system, a class with a payload in __reduce__...) is refused."""

    def find_class(self, module: str, name: str):
        allowed = {(c.__module__, c.__qualname__) for c in _metadata_classes()}
        allowed |= {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
        }
        if (module, name) in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


class SafeShardReader(FileSystemReader):
    """torch.distributed.checkpoint's reader with its `.metadata` (a pickle) read by an allow-list unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
        except pickle.UnpicklingError as e:
            raise _refusal(path, e) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
