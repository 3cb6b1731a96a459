"""Self-replay: general "replay" text sampled from the base model itself, for users without a general corpus.

Trade-offs (README, "Defaults and why"): replaying text the base model generates keeps the training distribution
close to what the model already does, which is the point of replay, but it preserves the model's own distribution
*including its mistakes* (hallucinated facts, repetition, its biases), its diversity is lower than real text (sampling
concentrates on the model's modes, more so at low temperature / top_p), and it costs generation compute before
training (about `tokens` forward passes of the base model, batched). Real general text (a slice of web, books or
Wikipedia in the model's languages) is preferred whenever it is available; self-replay is the fallback when
`data.general` is empty and `mix.general_fraction > 0`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from dapt_core.config import SelfReplayConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_EMPTY_BATCHES = 8


def _start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """BOS when the tokenizer puts BOS in front of text (Llama style), else EOS: how packed documents begin/follow."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        if with_special[:1] == [bos]:
            return int(bos)
    if eos is not None:
        return int(eos)
    if bos is not None:
        return int(bos)
    raise ValueError("self-replay needs a tokenizer with a bos_token or an eos_token to start sampling from")


def sample_self_replay(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SelfReplayConfig, seed: int
) -> Iterator[str]:
    """Yield documents sampled from `model` until `cfg.tokens` tokens have been produced.

    Each batch of `cfg.batch_size` sequences starts from a single BOS (or EOS, see `_start_token`) token and samples
    up to `cfg.max_new_tokens` tokens (`do_sample`, `cfg.temperature`, `cfg.top_p`). A document ends at the first EOS;
    special tokens are left out. "Produced" counts the generated, non-special tokens kept in the yielded texts; the
    last document is cut so the total is exactly `cfg.tokens`. Deterministic for a seed: batch k samples under
    `torch.manual_seed(seed * 1_000_003 + k)` inside `torch.random.fork_rng`, so the caller's RNG state is untouched
    and interleaving with other torch work between yields does not change the output.
    """
    import torch

    start = _start_token(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else start)
    special = set(tokenizer.all_special_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    produced, batch_idx, empty = 0, 0, 0
    try:
        while produced < cfg.tokens:
            input_ids = torch.full((cfg.batch_size, 1), start, dtype=torch.long, device=device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                torch.manual_seed(seed * 1_000_003 + batch_idx)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            batch_idx += 1
            batch_tokens = 0
            for row in out[:, input_ids.shape[1] :].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                ids = [t for t in row if t not in special][: cfg.tokens - produced]
                if not ids:
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if not text.strip():
                    continue
                produced += len(ids)
                batch_tokens += len(ids)
                yield text
                if produced >= cfg.tokens:
                    return
            empty = empty + 1 if batch_tokens == 0 else 0
            if empty >= MAX_EMPTY_BATCHES:
                raise RuntimeError(
                    f"self-replay: {MAX_EMPTY_BATCHES} batches in a row produced no text (the model ends every "
                    "sample at once); "
                    "check the model and tokenizer, or add data.general text"
                )
    finally:
        model.train(was_training)
