"""Tokenizer-independent language-model metrics: bits per byte, and tokens per word.

Bits per byte (bpb) = total next-token negative log-likelihood over the texts, in bits, divided by their total
UTF-8 bytes. Dividing by bytes instead of tokens makes models with different tokenizers comparable (the base model
vs the same model with an extended vocabulary), because both pay for exactly the same bytes.

For that to hold every token of a text must be scored, including the first. Each text is therefore scored after a
one-token prefix (the tokenizer's BOS token, else its EOS token, which is the usual document separator); the prefix
itself is not scored. Long texts are cut into windows of `max_length` tokens (prefix included) with no overlap:
each window starts again from the prefix, so a window's first tokens see less context than they would with a
sliding window. That overestimates bpb slightly and equally for the models compared, and costs one forward pass
per token instead of several.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class NLLStats:
    nll_nats: float  # summed over the scored tokens
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the texts
    unscored_tokens: int  # first tokens of windows when no prefix token exists

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes if self.bytes else float("nan")


def prefix_id(tokenizer: PreTrainedTokenizerBase, prefix_token_id: int | None = None) -> int | None:
    """The token a scored window starts with: `prefix_token_id` if given, else BOS, else EOS (None: neither)."""
    for tid in (prefix_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return None


def nll_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_length: int = 1024,
    batch_size: int = 8,
    prefix_token_id: int | None = None,
) -> NLLStats:
    """Summed next-token NLL of `texts` under `model` (see the module docstring for windows and the prefix;
    `prefix_token_id` overrides the BOS/EOS choice, e.g. a pretraining document separator)."""
    import torch

    prefix = prefix_id(tokenizer, prefix_token_id)
    width = max_length - (prefix is not None)
    if width < 1 or (prefix is None and width < 2):
        raise ValueError("max_length too small")
    windows: list[list[int]] = []
    n_bytes = unscored = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            chunk = ids[start : start + width]
            windows.append(([prefix] if prefix is not None else []) + chunk)
            unscored += prefix is None
    windows.sort(key=len, reverse=True)  # similar lengths per batch: less padding

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, scored = 0.0, 0
    try:
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                batch = windows[b : b + batch_size]
                length = len(batch[0])
                if length < 2:
                    continue  # a lone token with no prefix: nothing to predict
                input_ids = torch.zeros((len(batch), length), dtype=torch.long)
                mask = torch.zeros((len(batch), length), dtype=torch.long)
                for r, w in enumerate(batch):
                    input_ids[r, : len(w)] = torch.tensor(w)
                    mask[r, : len(w)] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                total += _summed_nll(model, input_ids, mask, labels)
                scored += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return NLLStats(nll_nats=total, tokens=scored, bytes=n_bytes, unscored_tokens=unscored)


LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits one forward call may produce (rows per call follow from it)
_NLL_CHUNK = 256  # positions per fp32 cross-entropy


def rows_within_budget(model: PreTrainedModel, length: int) -> int:
    """How many rows of `length` tokens one forward call may score so that their fp32 logits (rows x length x vocab)
    stay within LOGITS_BUDGET bytes; at least one. With a 49k vocabulary one 1024-token row is
    already 200 MB: a whole batch of them would be gigabytes."""
    vocab = int(model.config.get_text_config().vocab_size)
    return max(1, LOGITS_BUDGET // (4 * vocab * max(1, length)))


def _summed_nll(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token NLL from the model's own forward logits, a few rows per call.

    The logits must come from the model's forward, not `lm_head(decoder(x))`: several architectures post-process
    them there (Gemma 2/3 final-logit soft-capping, Granite `logits_scaling`, Cohere `logit_scale`), and skipping
    that scores a different distribution. Memory stays bounded by calling the model on as many rows as fit in
    `LOGITS_BUDGET` (at least one) and upcasting the logits to fp32 `_NLL_CHUNK` positions at a time.
    """
    import torch.nn.functional as F

    rows = rows_within_budget(model, input_ids.shape[1])
    total = 0.0
    for r in range(0, len(input_ids), rows):
        logits = model(input_ids=input_ids[r : r + rows], attention_mask=mask[r : r + rows], use_cache=False).logits[
            :, :-1
        ]
        targets = labels[r : r + rows]
        for s in range(0, logits.shape[1], _NLL_CHUNK):
            chunk = logits[:, s : s + _NLL_CHUNK].float()
            total += F.cross_entropy(
                chunk.reshape(-1, chunk.shape[-1]),
                targets[:, s : s + _NLL_CHUNK].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
        del logits
    return total


def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_length: int = 1024,
    batch_size: int = 8,
    prefix_token_id: int | None = None,
) -> float:
    """Total next-token NLL in nats / ln 2 / total UTF-8 bytes of `texts`."""
    return nll_stats(model, tokenizer, texts, max_length, batch_size, prefix_token_id).bits_per_byte


def tokens_per_word(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> float:
    """Tokens (no special tokens) per whitespace-separated word, over all `texts`."""
    tokens = words = 0
    for text in texts:
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        words += len(text.split())
    return tokens / words if words else float("nan")
