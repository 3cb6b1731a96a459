"""LoRA surgery for `train.method: lora` (peft), kept apart from the training loop.

After a tokenizer extension (`new_token_ids`) the new tokens' rows of the input embeddings and of an untied lm_head
train too, and only those rows (`cfg.train_new_tokens`, peft trainable tokens); `cfg.train_embeddings` trains both
matrices in full instead. `merge_lora(model)` folds it all into plain weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dapt_core.config import TrainConfig


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, new_token_ids: Sequence[int] = ()) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft). cfg.train_embeddings trains embed_tokens and lm_head in full; else, with
    cfg.train_new_tokens, the rows of `new_token_ids` (the tokenizer extension's tokens) train and no other row does:
    peft's trainable tokens on the input embeddings and, when untied, on the lm_head."""
    from peft import LoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    token_rows = None
    if new_token_ids and cfg.train_new_tokens and not cfg.train_embeddings:
        leaf = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        token_rows = {leaf[id(model.get_input_embeddings())]: sorted(new_token_ids)}
        if not tied:  # a tied lm_head follows the input rows (ensure_weight_tying)
            token_rows[leaf[id(model.get_output_embeddings())]] = sorted(new_token_ids)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=["embed_tokens", "lm_head"] if cfg.train_embeddings else None,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=token_rows,
        ensure_weight_tying=tied,  # tied embeddings stay one matrix (else merging unties them: a second copy)
    )
    return get_peft_model(model, lora)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
