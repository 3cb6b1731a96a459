"""The attention kernel (`train.attn_implementation`) and how packed sequences stay per-document on each.

With `train.block_cross_document_attention`, position ids restart at every document of a packed sequence and no
attention mask is passed. transformers then builds the block-diagonal causal mask from the position ids for eager and
sdpa, at any batch size. flash-attention-2 instead runs varlen attention from the position ids, but only detects
packing for a batch of one row: at batch > 1 it would silently attend across documents. So for flash-attention the
micro-batch is flattened into one row (`flatten_for_varlen`): each row's end is a document boundary too
(its position ids restart at 0), and the first token of every row is masked from the loss, as the first token of
every document already is. Combinations that cannot run are refused before the first step (`check_attention`).
"""

from __future__ import annotations

import importlib.util

import torch

from dapt_core.config import TrainConfig

FLASH = "flash_attention_2"


def check_attention(cfg: TrainConfig, device: torch.device) -> None:
    """One clear error for an attention setting that cannot run here."""
    if cfg.attn_implementation != FLASH:
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "train.attn_implementation flash_attention_2: the flash-attn package is not installed "
            "(pip install flash-attn --no-build-isolation on the GPU machine), or use sdpa"
        )
    if device.type != "cuda":
        raise ValueError(
            "train.attn_implementation flash_attention_2 needs a CUDA GPU; this run is on CPU: use sdpa or eager"
        )


def set_attention(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Switch the model (and a peft wrapper's base) to cfg.attn_implementation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(cfg.attn_implementation)


def flatten_for_varlen(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch of B packed rows as one row of B*L tokens with per-document position ids, which flash-attention
    runs as varlen attention (one sequence per document). Target tokens are unchanged: the first token of each row,
    now preceded by another row's last token, is masked, as every document's first token is."""
    positions = batch["position_ids"].reshape(1, -1)
    labels = batch["labels"].reshape(1, -1).clone()
    labels[positions == 0] = -100
    flat = {"input_ids": batch["input_ids"].reshape(1, -1), "position_ids": positions, "labels": labels}
    return {**batch, **flat}


def needs_flattening(cfg: TrainConfig) -> bool:
    return cfg.attn_implementation == FLASH and cfg.block_cross_document_attention
