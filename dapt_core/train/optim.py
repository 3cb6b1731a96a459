"""The optimizer and its LR schedule: AdamW without weight decay on biases / norm weights (fused on CUDA), linear
warmup then cosine decay (`lr_at`), and the peak-LR reset after loading a checkpoint's scheduler (`set_peak_lr`)."""

from __future__ import annotations

import math

import torch

from dapt_core.config import TrainConfig


def warmup_steps_for(cfg: TrainConfig, total_steps: int) -> int:
    return round(cfg.warmup_ratio * total_steps)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to cfg.lr (reached at the last warmup step), then
    cosine from cfg.lr (first step after warmup) to min_lr_ratio * cfg.lr (last step, total_steps - 1)."""
    warmup = warmup_steps_for(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def total_steps_for(cfg: TrainConfig, num_sequences: int, world: int = 1) -> int:
    """Optimizer steps: cfg.max_steps, or cfg.epochs passes at batch_size * world * grad_accum sequences per step."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_sequences / (cfg.batch_size * world * cfg.grad_accum)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused kernels on CUDA) and the warmup + cosine schedule."""
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)
    return optimizer, scheduler


def set_peak_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, peak: float) -> None:
    """After loading a checkpoint's scheduler: the schedule's peak is this run's cfg.lr, at the loaded position. A plain
    resume keeps the same LR; a rollback continuing from an accepted checkpoint (dapt_core/continuation.py) lowers it
    on the same schedule (the loaded state carries the old peak as base_lrs)."""
    scheduler.base_lrs = [peak for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)
