"""Embedding surgery for an extended vocabulary: resize the model and initialise the new rows.

Kept apart from the tokenizer logic (in the spirit of LLaMA-Factory's `model/model_utils/embedding.py`) so that
every change to a weight matrix happens here, documented and checked.

Initialisation (`add_tokens_with_mean_init`). Every new token's row is the mean of the rows of the pieces the
ORIGINAL tokenizer splits the token's text into (" tacrolimus" -> "Ġtac" "rol" "imus": the new input row is the
mean of those three input rows). The same is done for the output matrix (lm_head) when it is untied; tied weights
are one tensor and are initialised once. A mean of piece rows keeps the new token near what the model already
"means" by that text (Hewitt 2021; Gee et al. 2022, "Fast Vocabulary Transfer"). On the output side its logit is
the mean of the pieces' logits, which by Jensen is at most their log-mean-exp, so a new token never starts out
taking much probability mass from the old ones.

Padded vocabularies. A checkpoint's embedding matrix often has more rows than the tokenizer has ids (padded to a
multiple of 64/128 for tensor cores). New ids that already fit are written into those rows without resizing; the
matrix is never shrunk. When it must grow it grows to a multiple of `pad_to_multiple_of` (64); the extra rows that
no token id reaches are set to the mean of all old rows (input and output), never left at the library's random
init: an output row still gets a logit and so probability mass, and a mean row's logit is the mean of the old
logits, which bounds each such row's share below 1/V of the old softmax mass (Jensen again). Pre-existing
padding rows (between the old tokenizer's size and the old matrix size) that no new token uses are left exactly
as they were.

The lm_head guard. `resize_token_embeddings` is known to re-initialise or re-tie an untied lm_head in some
transformers versions (it calls `tie_weights()`, which re-reads `config.tie_word_embeddings`; a checkpoint whose
config says "tied" but whose weights differ gets its lm_head replaced by the input embeddings). So the old rows of
both matrices are snapshotted before resizing and compared afterwards: changed rows are restored, an lm_head that
got tied is untied again (and `tie_word_embeddings` set to False so a later `tie_weights()` keeps it so), and the
report says what was repaired.

`default_resize` is the library's own initialisation (`resize_token_embeddings` with its defaults, which in
transformers >= 4.46 samples new rows around the mean of all old rows), kept for the comparison in the tokenizer
report.
"""

from __future__ import annotations

import torch
from torch import nn


def embeddings_tied(model) -> bool:
    """Whether the output embeddings are the very same tensor as the input embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def vocab_rows_needed(tokenizer) -> int:
    """Rows a model needs for `tokenizer`: its largest id + 1 (equal to len(tokenizer) unless ids have holes)."""
    return max(tokenizer.get_vocab().values()) + 1


def token_pieces(old_tokenizer, token: str) -> list[int]:
    """Ids of the pieces the ORIGINAL tokenizer splits `token` into.

    `token` is a vocabulary string of the new tokenizer ("Ġtacrolimus" for byte-level BPE, "▁tacrolimus" for
    SentencePiece-style BPE). The original BPE model is run on it directly, which is exactly how the original
    tokenizer segments that pre-token in running text. When that is not possible (the original model has no
    `tokenize`, or the pieces do not spell the token, e.g. an AddedToken written as plain text) the token's
    decoded text is encoded with the original tokenizer instead.
    """
    backend = getattr(old_tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "tokenize"):
        try:
            pieces = model.tokenize(token)
        except Exception:  # noqa: BLE001 - fall back to encoding the text
            pieces = []
        if pieces and "".join(p.value for p in pieces) == token and all(p.id is not None for p in pieces):
            return [p.id for p in pieces]
    text = old_tokenizer.convert_tokens_to_string([token])
    ids = old_tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the original tokenizer gives no pieces for {token!r}")
    return ids


def _snapshot(model) -> dict:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embeddings_tied(model)
    snap = {"tied": tied, "rows": inp.weight.shape[0], "input": inp.weight.detach().clone()}
    if out is not None and not tied:
        snap["output"] = out.weight.detach().clone()
    if out is not None and getattr(out, "bias", None) is not None:
        snap["bias"] = out.bias.detach().clone()
    return snap


def _set_untied_config(model) -> None:
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def _resize(model, rows_needed: int, pad_to_multiple_of: int | None, mean_resizing: bool) -> dict:
    """Grow (never shrink) the embedding matrices to `rows_needed`; repair old rows and ties afterwards."""
    snap = _snapshot(model)
    old_rows = snap["rows"]
    info = {"old_rows": old_rows, "resized": False, "tied": snap["tied"], "repaired": []}
    if rows_needed > old_rows:
        model.resize_token_embeddings(rows_needed, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing)
        info["resized"] = True
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    new_rows = inp.weight.shape[0]
    with torch.no_grad():
        if out is not None:
            now_tied = out.weight is inp.weight
            if snap["tied"] and not now_tied:
                out.weight = inp.weight
                info["repaired"].append("lm_head came back untied from a tied model: re-tied")
            elif not snap["tied"] and now_tied:
                out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
                out.weight[:old_rows].copy_(snap["output"])
                _set_untied_config(model)
                info["repaired"].append("lm_head was re-tied to the input embeddings by resize: untied and restored")
        if not torch.equal(inp.weight[:old_rows], snap["input"]):
            inp.weight[:old_rows].copy_(snap["input"])
            info["repaired"].append("old input-embedding rows changed by resize: restored")
        if "output" in snap and not torch.equal(out.weight[:old_rows], snap["output"]):
            out.weight[:old_rows].copy_(snap["output"])
            info["repaired"].append("old lm_head rows changed by resize: restored")
        if "bias" in snap and out.bias.shape[0] >= old_rows and not torch.equal(out.bias[:old_rows], snap["bias"]):
            out.bias[:old_rows].copy_(snap["bias"])
            info["repaired"].append("old lm_head bias changed by resize: restored")
        if hasattr(out, "out_features"):
            out.out_features = out.weight.shape[0]
    info["new_rows"] = new_rows
    info["snapshot"] = snap
    return info


def add_tokens_with_mean_init(
    model,
    old_tokenizer,
    new_tokenizer,
    new_tokens: list[str] | None = None,
    pad_to_multiple_of: int | None = 64,
) -> dict:
    """Resize `model` (in place) to `new_tokenizer` and give each new token the mean of its original pieces' rows.

    new_tokens: vocabulary strings of `new_tokenizer` that the original tokenizer lacks (default: all of them).
    Returns a JSON-able report: old_rows, new_rows, resized, tied, repaired (what the lm_head guard fixed),
    pieces {token: [piece ids]}, extra_rows (rows that no listed token uses and that were set to the mean of all
    old rows).
    """
    old_vocab = old_tokenizer.get_vocab()
    new_vocab = new_tokenizer.get_vocab()
    if new_tokens is None:
        new_tokens = sorted((t for t in new_vocab if t not in old_vocab), key=new_vocab.__getitem__)
    for t in new_tokens:
        if t not in new_vocab:
            raise ValueError(f"{t!r} is not in the new tokenizer's vocabulary")
        if t in old_vocab:
            raise ValueError(f"{t!r} is already in the original tokenizer: its trained row must not be overwritten")
    ids = [new_vocab[t] for t in new_tokens]
    old_ids_end = vocab_rows_needed(old_tokenizer)
    if any(i < old_ids_end for i in ids):
        raise ValueError("new token ids must come after every id of the original tokenizer")
    pieces = {t: token_pieces(old_tokenizer, t) for t in new_tokens}

    info = _resize(model, max(vocab_rows_needed(new_tokenizer), old_ids_end), pad_to_multiple_of, mean_resizing=False)
    snap = info.pop("snapshot")
    old_rows, new_rows = info["old_rows"], info["new_rows"]
    for t, p in pieces.items():
        if max(p) >= old_rows:
            raise ValueError(f"piece ids of {t!r} exceed the original embedding matrix ({old_rows} rows)")

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    untied = out is not None and out.weight is not inp.weight
    bias = getattr(out, "bias", None) if out is not None else None

    def mean_rows(matrix: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return matrix[rows].to(torch.float32).mean(0)

    with torch.no_grad():
        for t, i in zip(new_tokens, ids):
            p = pieces[t]
            inp.weight[i] = mean_rows(snap["input"], p).to(inp.weight.dtype)
            if untied:
                out.weight[i] = mean_rows(snap["output"], p).to(out.weight.dtype)
            if bias is not None:
                bias[i] = snap["bias"][p].to(torch.float32).mean().to(bias.dtype)
        # Rows created by this resize that no listed token uses (multiple-of-64 padding, unlisted ids).
        extra = sorted(set(range(old_rows, new_rows)) - set(ids)) if info["resized"] else []
        if extra:
            inp.weight[extra] = snap["input"].to(torch.float32).mean(0).to(inp.weight.dtype)
            if untied:
                out.weight[extra] = snap["output"].to(torch.float32).mean(0).to(out.weight.dtype)
            if bias is not None:
                bias[extra] = snap["bias"].to(torch.float32).mean().to(bias.dtype)
    info.update(
        tied=not untied,
        pieces={t: pieces[t] for t in new_tokens},
        new_ids={t: i for t, i in zip(new_tokens, ids)},
        extra_rows=len(extra),
        init="mean of the original pieces' rows (input and untied output); extra rows: mean of all old rows",
    )
    return info


def default_resize(model, new_tokenizer, pad_to_multiple_of: int | None = 64) -> dict:
    """The library's default initialisation, for comparison: `resize_token_embeddings` with its default init.

    New ids that fit in an already padded matrix keep whatever those rows held (the library does nothing there).
    Old rows are still checked and repaired by the same guard, so the comparison is about the new rows only.
    """
    info = _resize(model, vocab_rows_needed(new_tokenizer), pad_to_multiple_of, mean_resizing=True)
    info.pop("snapshot")
    info["init"] = "transformers resize_token_embeddings default (mean_resizing=True)"
    return info
