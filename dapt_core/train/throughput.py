"""Throughput figures of the training loop: tokens/s, model FLOP utilisation (MFU) and peak GPU memory.

MFU = flops_per_token * tokens/s / (peak bf16 FLOP/s * GPUs), with flops_per_token = 6 N for full training and 4 N for
LoRA (frozen weights get no weight gradients), N the model's parameters, and the peak from `dapt plan`'s table
(dapt_core/gpus.py), matched on the CUDA device name; None on CPU or an unknown GPU.
"""

from __future__ import annotations

import torch


def flops_per_token(model: torch.nn.Module, method: str) -> float:
    params = sum(p.numel() for p in model.parameters())
    return (6.0 if method == "full" else 4.0) * params


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU from the table, or None (CPU, a GPU not in the table)."""
    if device.type != "cuda":
        return None
    from dapt_core.gpus import GPU_PEAK_TFLOPS

    name = torch.cuda.get_device_name(device).upper().replace(" ", "")
    for gpu, tflops in sorted(GPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if gpu in name:
            return tflops * 1e12
    return None


def mfu(flops_per_token_: float, tokens_per_second: float, peak: float | None, gpus: int) -> float | None:
    return None if peak is None else flops_per_token_ * tokens_per_second / (peak * gpus)


def step_peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last call (CUDA), then reset; None on CPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak
