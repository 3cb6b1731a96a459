"""Where this process stands in a torchrun launch, and how the model is spread over the ranks.

* `ddp`: every rank holds the whole model and AdamW state; gradients are all-reduced once per optimizer step.
* `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, then on the root: parameters,
  gradients and AdamW state are sharded over the ranks (a rank holds 1/world of the ~16 bytes per parameter), each
  layer's weights are all-gathered just for its forward and backward. On CUDA the layers compute in bf16 with fp32
  gradient reduction and fp32 master weights (`MixedPrecisionPolicy`); on CPU (gloo) everything stays fp32.

Both average gradients over the ranks, so the loss scaling of the loop is the same. One process is the same loop with
neither wrapper. Launching (one node or several, c10d rendezvous) is `torchrun_command`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from dapt_core.config import TrainConfig

# Ranks != 0 wait while rank 0 writes, evaluates and uploads a checkpoint (a 7B full checkpoint with optimizer state
# to S3 takes well over NCCL's default 10 minutes).
DIST_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun / accelerate launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, value: float, device: torch.device) -> float:
        """`value` summed over the ranks (fp64)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank (so all ranks take the same branch)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, value: int, device: torch.device) -> bool:
        """Whether every rank holds the same `value`."""
        if self.world == 1:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0]) == -int(t[1])

    def from_main(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's `flag`, on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(self.main and flag)], device=device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())


def distributed() -> Distributed:
    """Join the process group torchrun set up (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=DIST_TIMEOUT)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Distributed(rank=torch.distributed.get_rank(), world=world, local_rank=local)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (transformers names their class in `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"train.strategy fsdp: found no decoder layers in {type(base).__name__} (no _no_split_modules); "
            "use train.strategy ddp for this model"
        )
    return layers


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: fully_shard each decoder layer, then the root (embeddings, final norm, lm_head). In place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: DDP or FSDP2 over the ranks per `cfg.strategy`, the model itself in one process."""
    if dist.world == 1:
        return model
    if cfg.strategy == "fsdp":
        return shard_model(model, device)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if device.type == "cuda" else None
    )


def gradient_sync(wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context in which backward all-reduces (DDP) / reduce-scatters (FSDP) gradients only when `sync`: once per
    optimizer step, on its last micro-batch."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """FSDP: the weights a checkpoint keeps, gathered from every rank onto rank 0's CPU (None elsewhere); other
    strategies read the model directly (None)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    if cfg.method == "lora":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return {n: t for n, t in state.items() if n in trainable}
    return _without_tied_copies(model, state)


def _without_tied_copies(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the copies of tied weights (embed_tokens / lm_head) that safetensors' save_model drops, so the file is the
    one a one-process checkpoint writes and `load_weights` (load_model, strict) reads it back."""
    from safetensors.torch import _remove_duplicate_names

    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    probe = {name: t for names in names_of.values() if len(names) > 1 for t in [torch.empty(1)] for name in names}
    for dropped in _remove_duplicate_names(probe).values():
        for name in dropped:
            state.pop(name, None)
    return state


def torchrun_command(cfg: TrainConfig, module_args: list[str], shutdown_timeout_s: int) -> list[str]:
    """The torchrun launch of `python -m dapt_core.cpt ...` on this node: `--standalone` on one node; with
    `train.nnodes` > 1 a c10d rendezvous at `train.rdzv_endpoint`: the same command on every node
    (deployments/README.md: how the nodes are started)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc_per_node}"]
    if cfg.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cfg.rdzv_endpoint}",
            f"--rdzv_id={cfg.rdzv_id}",
        ]
        if cfg.node_rank is not None:
            cmd.append(f"--node_rank={cfg.node_rank}")
    return cmd + [f"--shutdown_timeout={shutdown_timeout_s}", "-m", "dapt_core.cpt", *module_args]
