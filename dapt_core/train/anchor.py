"""The EWC anchor of a training run (dapt_core/ewc.py): the Fisher is estimated once on general text, on the model
before any adapter or update, and saved as out_dir/ewc.safetensors; a resumed run reloads it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dapt_core.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from dapt_core.ewc import EWC
    from dapt_core.train.distributed import Distributed

EWC_FILE = "ewc.safetensors"


def setup_ewc(
    model: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool,
    general_samples: Sequence[Sequence[int]] | None,
    dist: Distributed,
    device: torch.device,
) -> EWC | None:
    """The EWC anchor and Fisher, on the model as given (before any adapter or update); a resumed run reloads them."""
    if not cfg.ewc.enabled:
        return None
    from dapt_core.ewc import EWC

    path = out_dir / EWC_FILE
    if resume and path.is_file():
        ewc = EWC.load(path, cfg.ewc.lambda_)
    else:
        if not general_samples:
            raise ValueError("train.ewc.enabled needs general_samples (token id sequences of general text)")
        if cfg.method == "lora":
            raise ValueError("train.ewc: EWC applies to full training (LoRA adapters start at zero: nothing to anchor)")
        ewc = EWC.from_model(model, general_samples, cfg.ewc.lambda_, max_samples=cfg.ewc.fisher_samples)
        if dist.main:
            tmp = out_dir / f".tmp-{EWC_FILE}"
            ewc.save(tmp)
            os.replace(tmp, path)
    ewc.to(device)
    return ewc
