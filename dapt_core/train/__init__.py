"""Continual pretraining (CPT) of a causal LM on the packed shards of `dapt pack`: a recipe in torchtune's style.

`train()` is `setup()` (process group, data, EWC anchor, model surgery, resume, optimizer) followed by `run_loop()`,
which reads top to bottom: stop? → one optimizer step → log → checkpoint and judge. The pieces live beside it:
data order and micro-batches (dapt_core/train/data.py), checkpoints (dapt_core/train/checkpoint.py), DDP / FSDP2 and the
torchrun launch (dapt_core/train/distributed.py), LoRA (dapt_core/train/lora.py), attention kernels and packing
(dapt_core/train/attention.py), tokens/s and MFU (dapt_core/train/throughput.py), AdamW and the LR schedule
(dapt_core/train/optim.py), the EWC anchor (dapt_core/train/anchor.py).

* **Method.** `full` trains every parameter; `lora` wraps the model with peft (`cfg.lora`), new tokenizer rows train
  per `cfg.train_new_tokens` / `cfg.train_embeddings`.
* **Optimisation.** AdamW (no weight decay on biases / norm weights; fused on CUDA), LR = linear warmup over
  round(warmup_ratio * steps) steps to the peak, then cosine to min_lr_ratio * peak at the last step (`lr_at`),
  gradient accumulation over `grad_accum` micro-batches, global grad-norm clipping. The loss is token-weighted
  over the whole optimizer step (all micro-batches and ranks), as HF Trainer: summed NLL / target tokens of the
  step, so response-only SFT masks, accumulation and several ranks weigh every target token the same. fp32 on CPU;
  on CUDA bf16 autocast (DDP) or bf16 FSDP2 compute, weights and optimizer state fp32. Optional activation
  checkpointing per decoder layer (`cfg.gradient_checkpointing`) and per-layer `torch.compile` (`cfg.compile`).
* **Documents.** With `block_cross_document_attention`, position ids restart at every document of a packed sequence
  and no token attends to another document on any `attn_implementation` (dapt_core/train/attention.py). The label
  of each document's first token (predicted from the previous document) is ignored.
* **Distributed.** Under `torchrun` (WORLD_SIZE > 1) each rank takes its slice of every global micro-batch
  (batch_size sequences per rank, same permutation); `cfg.strategy` ddp replicates, fsdp shards (FSDP2). Rank 0 writes
  checkpoints and runs `on_checkpoint` while the others wait. One process is the same loop, unchanged.
* **Logging.** Every `cfg.log_every` steps rank 0 logs step, loss, LR, tokens/s, step time, MFU and peak GPU memory
  (CUDA) and ETA (logger `dapt.train`, which reaches the Prefect flow-run logs) and hands a `StepProgress` to
  `on_progress`; `cfg.report_to: [tensorboard]` also writes them to out_dir/tensorboard.
* **EWC.** `cfg.ewc.enabled` adds (lambda/2) * sum F_i (theta_i - theta*_i)^2 once per optimizer step
  (dapt_core/ewc.py); the Fisher is estimated once on `general_samples` and saved as out_dir/ewc.safetensors.
* **Checkpoints.** Every `save_every` steps and at the end (dapt_core/train/checkpoint.py); `on_checkpoint(step,
  path)` is called after each one (evaluate, upload...); when it returns False training stops there (roll back instead).
* **Stopping.** A stop request (dapt_core/stop.py) is honoured before the next optimizer step: the loop writes a
  checkpoint of the current step (unless it was just written) and raises `StopRequested`; all ranks stop together.
* **Exact resume.** With `resume=True` the loop restarts from the latest complete checkpoint: weights, optimizer,
  scheduler, RNG states and data position are restored, so a run killed at any point (SIGKILL included) and resumed
  ends with the same weights as an uninterrupted run (bitwise on CPU; tested for one process, DDP and FSDP).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from dapt_core.ewc import EWC

from dapt_core import stop
from dapt_core.config import TrainConfig
from dapt_core.stop import Stopped, StopRequested
from dapt_core.train import checkpoint as ckpt
from dapt_core.train.anchor import setup_ewc
from dapt_core.train.attention import (
    check_attention,
    flatten_for_varlen,
    needs_flattening,
    set_attention,
)
from dapt_core.train.checkpoint import (
    CHECKPOINT_PREFIX,
    list_checkpoints,
    load_state,
    load_weights,
    save_weights,
)
from dapt_core.train.data import (
    MicroBatches,
    PackedSequences,
    document_position_ids,
    epoch_order,
    list_column,
    make_batch,
    micro_batch_loader,
    summed_token_nll,
    target_tokens,
)
from dapt_core.train.distributed import (
    DIST_TIMEOUT,
    Distributed,
    decoder_layers,
    distributed,
    full_state,
    gradient_sync,
    wrap_model,
)
from dapt_core.train.lora import apply_lora, is_peft, merge_lora
from dapt_core.train.optim import build_optimizer, lr_at, set_peak_lr, total_steps_for
from dapt_core.train.throughput import (
    flops_per_token,
    mfu,
    peak_flops,
    step_peak_memory_gib,
)

__all__ = [  # the training API other modules use (re-exported from the modules the recipe is built from)
    "CHECKPOINT_PREFIX",
    "DIST_TIMEOUT",
    "Distributed",
    "PackedSequences",
    "list_column",
    "StepProgress",
    "TrainResult",
    "apply_lora",
    "distributed",
    "document_position_ids",
    "epoch_order",
    "list_checkpoints",
    "load_state",
    "load_weights",
    "lr_at",
    "make_batch",
    "merge_lora",
    "run_loop",
    "save_weights",
    "setup",
    "tensorboard_writer",
    "total_steps_for",
    "train",
]

log = logging.getLogger("dapt.train")


# -------------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    model: object  # the trained model (a peft model for method "lora": see merge_lora)
    step: int  # optimizer steps done
    total_steps: int
    final_loss: float | None  # mean LM loss of the last optimizer step
    history: list[dict] = field(default_factory=list)  # per step: step, lr, loss, grad_norm (pre-clip), ewc, seconds
    checkpoints: list[Path] = field(default_factory=list)  # written by this call
    resumed_from: Path | None = None


@dataclass(frozen=True)
class StepProgress:
    """Where training stands, every `log_every` steps: for the log, a progress bar, a UI."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float  # over the steps since the last report
    eta_seconds: float  # the remaining steps at that rate (checkpoint evaluations not included)
    step_seconds: float = 0.0  # mean optimizer-step time since the last report
    mfu: float | None = None  # model FLOP utilisation (CUDA, a GPU in plan's table)
    peak_memory_gib: float | None = None  # peak GPU memory allocated in the last step (CUDA)

    def line(self) -> str:
        extra = f" step {self.step_seconds:.3g}s"
        if self.mfu is not None:
            extra += f" MFU {self.mfu:.1%}"
        if self.peak_memory_gib is not None:
            extra += f" peak mem {self.peak_memory_gib:.2f} GiB"
        return (
            f"step {self.step}/{self.total_steps} loss {self.loss:.4f} lr {self.lr:.3g} "
            f"{self.tokens_per_second:,.0f} tokens/s{extra} eta {timedelta(seconds=round(self.eta_seconds))}"
        )


def tensorboard_writer(cfg: TrainConfig, out_dir: Path, dist: Distributed) -> SummaryWriter | None:
    """A TensorBoard writer on out_dir/tensorboard when cfg.report_to asks for one (rank 0 only), else None."""
    if "tensorboard" not in cfg.report_to or not dist.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# -------------------------------------------------------------------------------------------------- setup
@dataclass
class Run:
    """What `setup` prepares and `run_loop` advances: one training run's state."""

    cfg: TrainConfig
    out_dir: Path
    dist: Distributed
    device: torch.device
    model: torch.nn.Module  # what the loop calls: the DDP wrapper, the FSDP-sharded model or the model itself
    trained: torch.nn.Module  # what checkpoints save and the caller gets back (a peft model for LoRA)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Iterator[dict[str, torch.Tensor]]
    num_sequences: int
    seq_len: int
    total_steps: int
    ewc: EWC | None
    writer: object | None
    step: int = 0
    position: int = 0  # sequences of the data stream consumed (over all ranks)
    history: list[dict] = field(default_factory=list)
    resumed_from: Path | None = None
    last_saved: tuple[int, Path | None] = (0, None)  # the step the newest checkpoint holds
    flops_per_token: float = 0.0
    peak_flops: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.dist.world * self.cfg.grad_accum * self.seq_len

    def trainer_state(self) -> dict:
        n = self.num_sequences
        return {
            "step": self.step,
            "epoch": self.position // n,
            "index": self.position % n,
            "total_steps": self.total_steps,
            "seed": self.cfg.seed,
            "method": self.cfg.method,
            "world_size": self.dist.world,
            "strategy": self.strategy,
            "history": self.history,
        }

    @property
    def strategy(self) -> str:
        return self.cfg.strategy if self.dist.world > 1 else "single"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (a resumed run then overwrites them with the checkpoint's RNG states)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_strategy(cfg: TrainConfig, dist: Distributed) -> None:
    """One clear error for a combination this loop cannot run correctly."""
    if cfg.strategy == "fsdp" and dist.world > 1 and cfg.ewc.enabled:
        raise ValueError(
            "train.ewc with train.strategy fsdp: the EWC penalty needs every parameter whole on each rank; "
            "use train.strategy ddp with EWC, or switch EWC off for FSDP runs"
        )


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, new_token_ids: Sequence[int]):
    """Model surgery before training: LoRA adapters, the attention kernel, activation checkpointing, compilation."""
    if cfg.method == "lora" and not is_peft(model):
        model = apply_lora(model, cfg, new_token_ids)
    set_attention(model, cfg)
    if cfg.gradient_checkpointing:  # per decoder layer (transformers' GradientCheckpointingLayer)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if cfg.compile:  # per layer, in place: the state dict keeps its names, FSDP2 and DDP wrap the compiled layers
        for layer in decoder_layers(model):
            layer.compile()
    model.train()
    return model


def read_resume_point(checkpoint: Path, cfg: TrainConfig, dist: Distributed) -> dict:
    """The checkpoint's trainer state, refused when this run could not continue it exactly."""
    state = ckpt.read_trainer_state(checkpoint)
    if state.get("world_size", 1) != dist.world:
        raise ValueError(
            f"{checkpoint} was written by {state.get('world_size', 1)} process(es) and this run has {dist.world}: "
            "the global batch would change mid-run. Resume with the same train.nproc_per_node, or start a new run."
        )
    written_by = state.get("strategy", "ddp" if dist.world > 1 else "single")
    expected = cfg.strategy if dist.world > 1 else "single"
    if written_by != expected:
        raise ValueError(
            f"{checkpoint} was written with train.strategy {written_by} and this run uses {expected}: "
            f"resume with train.strategy {written_by}, or start a new run."
        )
    return state


def restore_optimizer(run: Run, checkpoint: Path) -> None:
    """Optimizer (whole or this rank's shard), schedule and RNG states of `checkpoint`."""
    if run.strategy == "fsdp":
        ckpt.load_sharded_optimizer(run.model, run.optimizer, checkpoint)
    else:
        run.optimizer.load_state_dict(load_state(checkpoint / "optimizer.pt", map_location=run.device))
    run.scheduler.load_state_dict(load_state(checkpoint / "scheduler.pt"))
    set_peak_lr(run.optimizer, run.scheduler, run.cfg.lr)
    ckpt.set_rng_state(load_state(checkpoint / "rng.pt"))


def data_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.data_workers is not None:
        return cfg.data_workers
    return 2 if device.type == "cuda" else 0


def setup(
    model: torch.nn.Module,
    shards: list[Path],
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = True,
    general_samples: Sequence[Sequence[int]] | None = None,
    new_token_ids: Sequence[int] = (),
) -> Run:
    """Everything before the first step: process group, data, EWC anchor, model surgery, resume, optimizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_partial(out_dir)
    seed_everything(cfg.seed)
    dist = distributed()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    check_strategy(cfg, dist)
    check_attention(cfg, device)
    model.to(device)
    data = PackedSequences(shards)
    total_steps = total_steps_for(cfg, len(data), dist.world)
    ewc = setup_ewc(model, cfg, out_dir, resume, general_samples, dist, device)
    trained = prepare_model(model, cfg, new_token_ids)

    found = list_checkpoints(out_dir) if resume else []
    resumed_from = found[-1][1] if found else None
    state = read_resume_point(resumed_from, cfg, dist) if resumed_from else {}
    if not dist.agree(state.get("step", 0), device):
        raise ValueError(
            f"the ranks found different checkpoints to resume from in {out_dir} "
            f"(this rank: step {state.get('step', 0)}): "
            "every node's training directory must hold the same checkpoints (each node's first process fetches them)"
        )
    if resumed_from:  # into the whole model, before FSDP shards it
        load_weights(trained, resumed_from / "model.safetensors", cfg.method)
    wrapped = wrap_model(trained, cfg, dist, device)
    optimizer, scheduler = build_optimizer(wrapped, cfg, total_steps, device)

    position = state.get("epoch", 0) * len(data) + state.get("index", 0)
    micro = MicroBatches(
        shards, cfg.seed, cfg.batch_size, dist.rank, dist.world, position, cfg.block_cross_document_attention
    )
    run = Run(
        cfg=cfg,
        out_dir=out_dir,
        dist=dist,
        device=device,
        model=wrapped,
        trained=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=micro_batch_loader(micro, data_workers(cfg, device), device.type == "cuda"),
        num_sequences=len(data),
        seq_len=data.seq_len,
        total_steps=total_steps,
        ewc=ewc,
        writer=tensorboard_writer(cfg, out_dir, dist),
        step=state.get("step", 0),
        position=position,
        history=state.get("history", []),
        resumed_from=resumed_from,
        last_saved=(state.get("step", 0), resumed_from),
        flops_per_token=flops_per_token(trained, cfg.method),
        peak_flops=peak_flops(device),
    )
    if resumed_from:
        restore_optimizer(run, resumed_from)
    return run


# -------------------------------------------------------------------------------------------------- the loop
def train(
    model: torch.nn.Module,
    shards: list[Path],
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = True,
    on_checkpoint: Callable[[int, Path], bool | None] | None = None,
    general_samples: Sequence[Sequence[int]] | None = None,
    new_token_ids: Sequence[int] = (),
    on_progress: Callable[[StepProgress], None] | None = None,
) -> TrainResult:
    """Continually pretrain `model` on the packed `shards`; checkpoints in `out_dir` (see module docstring).
    `on_progress` gets a `StepProgress` every cfg.log_every optimizer steps (and the last), on rank 0."""
    with stop.training(cfg.stop_grace_s):
        run = setup(model, shards, cfg, Path(out_dir), resume, general_samples, new_token_ids)
        return run_loop(run, on_checkpoint, on_progress)


def run_loop(
    run: Run,
    on_checkpoint: Callable[[int, Path], bool | None] | None = None,
    on_progress: Callable[[StepProgress], None] | None = None,
) -> TrainResult:
    """Optimizer steps until the last one, a rejected checkpoint or a stop request (see module docstring)."""
    cfg, written = run.cfg, []
    log.info(
        "training steps %d to %d%s",
        run.step + 1,
        run.total_steps,
        f" (resumed from {run.resumed_from})" if run.resumed_from else "",
    )
    window: list[dict] = []  # the steps since the last progress report
    try:
        while run.step < run.total_steps:
            if run.dist.any(stop.requested(), run.device):
                stop_with_checkpoint(run)
            record = train_step(run)
            window.append(record)
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                report(run, window, on_progress)
                window = []
            if run.step % cfg.save_every == 0 or run.step == run.total_steps:
                path, accepted = save_and_judge(run, on_checkpoint)
                written.append(path)
                if not accepted:
                    break
    finally:
        if run.writer is not None:
            run.writer.close()
    return TrainResult(
        model=run.trained,
        step=run.step,
        total_steps=run.total_steps,
        final_loss=run.history[-1]["loss"] if run.history else None,
        history=run.history,
        checkpoints=written,
        resumed_from=run.resumed_from,
    )


def next_micro_batch(run: Run) -> dict[str, torch.Tensor]:
    """This rank's slice of the next global micro-batch, on the device (one row per micro-batch for flash varlen)."""
    batch = next(run.batches)
    run.position += run.cfg.batch_size * run.dist.world
    if needs_flattening(run.cfg):
        batch = flatten_for_varlen(batch)
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches; returns its history record."""
    t0 = time.perf_counter()
    micro_batches = [next_micro_batch(run) for _ in range(run.cfg.grad_accum)]
    # Token-weighted loss, as HF Trainer: every target token of the optimizer step weighs the same, whichever
    # micro-batch or rank holds it (response-only SFT masks make the counts uneven). Each rank scales its summed
    # NLL by world / (target tokens of the whole step); DDP's / FSDP's gradient averaging divides the world back out.
    local_targets = float(sum(target_tokens(b["labels"]) for b in micro_batches))
    step_targets = max(run.dist.all_reduce_sum(local_targets, run.device), 1.0)
    nll_sum, ewc_value = 0.0, 0.0
    for micro, batch in enumerate(micro_batches):
        last = micro == run.cfg.grad_accum - 1
        with gradient_sync(run.model, sync=last):  # reduce gradients once per optimizer step
            labels = batch.pop("labels")
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast_bf16(run)):
                out = run.model(**batch, use_cache=False)
            summed = summed_token_nll(out.logits, labels)
            total = summed * (run.dist.world / step_targets)
            if run.ewc is not None and last:  # once per optimizer step, not once per micro-batch
                penalty = run.ewc.penalty(run.trained)
                ewc_value = float(penalty.detach())
                total = total + penalty
            total.backward()
        nll_sum += float(summed.detach())
        del out, summed, total  # the logits (and their loss) must not outlive their backward into the next forward
    grad_norm = clip_gradients(run)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss = run.dist.all_reduce_sum(nll_sum, run.device) / step_targets  # the global batch's loss
    record = {
        "step": run.step,
        "lr": lr,
        "loss": loss,
        "grad_norm": grad_norm,
        "ewc": ewc_value if run.ewc else None,
        "seconds": time.perf_counter() - t0,
    }
    run.history.append(record)
    return {**record, "peak_memory_gib": step_peak_memory_gib(run.device)}


def autocast_bf16(run: Run) -> bool:
    """bf16 autocast on CUDA, except under FSDP, whose mixed-precision policy already computes in bf16."""
    return run.device.type == "cuda" and torch.cuda.is_bf16_supported() and run.strategy != "fsdp"


def clip_gradients(run: Run) -> float | None:
    """Clip the global gradient norm (over every rank's shard under FSDP); the norm before clipping."""
    if run.cfg.grad_clip is None:
        return None
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def report(run: Run, window: list[dict], on_progress: Callable[[StepProgress], None] | None) -> None:
    """Log the steps since the last report; hand them to `on_progress` and TensorBoard (rank 0)."""
    if not run.dist.main:
        return
    seconds = sum(r["seconds"] for r in window)
    rate = len(window) / max(seconds, 1e-9)
    last = window[-1]
    tokens_per_second = run.tokens_per_step * rate
    progress = StepProgress(
        step=run.step,
        total_steps=run.total_steps,
        loss=last["loss"],
        lr=last["lr"],
        tokens_per_second=tokens_per_second,
        eta_seconds=(run.total_steps - run.step) / rate,
        step_seconds=seconds / len(window),
        mfu=mfu(run.flops_per_token, tokens_per_second, run.peak_flops, run.dist.world),
        peak_memory_gib=last["peak_memory_gib"],
    )
    log.info("%s", progress.line())
    if on_progress is not None:
        on_progress(progress)
    if run.writer is not None:
        scalars = {
            "loss": last["loss"],
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "ewc_penalty": last["ewc"],
            "tokens_per_second": run.tokens_per_step / max(last["seconds"], 1e-9),
            "step_seconds": last["seconds"],
            "mfu": progress.mfu,
            "peak_memory_gib": progress.peak_memory_gib,
        }
        for name, value in scalars.items():
            if value is not None:
                run.writer.add_scalar(f"train/{name}", value, run.step)


def save_checkpoint(run: Run) -> Path:
    """checkpoint-<step> (see dapt_core/train/checkpoint.py). Under FSDP every rank takes part (weights gathered to
    rank 0, optimizer shards written by each); otherwise rank 0 alone writes. Returns its path on every rank."""
    sharded = run.strategy == "fsdp"
    weights = full_state(run.model, run.cfg)
    if sharded:
        ckpt.save_sharded_optimizer(run.model, run.optimizer, run.out_dir, run.step, run.device)
    path = run.out_dir / f"{CHECKPOINT_PREFIX}{run.step}"
    if run.dist.main:
        path = ckpt.write_checkpoint(
            run.out_dir,
            run.step,
            run.trained,
            run.optimizer,
            run.scheduler,
            run.cfg.method,
            run.trainer_state(),
            weights=weights,
            sharded_optimizer=sharded,
        )
    run.last_saved = (run.step, path)
    return path


def save_and_judge(run: Run, on_checkpoint: Callable[[int, Path], bool | None] | None) -> tuple[Path, bool]:
    """Write a checkpoint and let rank 0's `on_checkpoint` judge it; every rank follows its verdict."""
    path = save_checkpoint(run)
    rejected = False
    if run.dist.main:
        if run.writer is not None:
            run.writer.flush()
        rejected = on_checkpoint is not None and on_checkpoint(run.step, path) is False
        # The judge evaluated the model in eval mode; left there, training would go on without activation
        # checkpointing (transformers applies it only in training mode: +1.4 GB on the demo) and without dropout.
        run.model.train()
    return path, not run.dist.from_main(rejected, run.device)


def stop_with_checkpoint(run: Run) -> None:
    """Honour a stop request: a checkpoint of this step (unless it was just written), then StopRequested."""
    step, path = run.last_saved
    if step != run.step:
        path = save_checkpoint(run)
        run.dist.barrier()
    raise StopRequested(Stopped(step=run.step, checkpoint=str(path) if path else None, reason=stop.reason()))
