"""Embedding surgery for an extended vocabulary: resize the model and initialise the new rows.

Kept apart from the tokenizer logic (in the spirit of LLaMA-Factory's `model/model_utils/embedding.py`) so that
every change to a weight matrix happens here, documented and checked.

Initialisation (`add_tokens_with_mean_init`; then `refine_new_rows` applies `tokenizer.init`, below). Every new
token's row is the mean of the rows of the pieces the ORIGINAL tokenizer splits the token's text into
(" tacrolimus" -> "Ġtac" "rol" "imus": the new input row is the mean of those three input rows). The same is done for
the output matrix (lm_head) when it is untied; tied weights
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

Output rows that keep the probability of the piece sequence (`fit_output_rows`, `tokenizer.init: seqprob`). The mean
of the pieces' output rows gives the new token the mean of the pieces' logits. Where the word starts, only the first
piece is likely; the later pieces' logits are low there, so the new token starts out far less likely than the base
model found the whole piece sequence, and every occurrence of the term in domain text pays for it. The base's own
probability of the term is known exactly: for a context with final hidden state h,
    log p_base(p1 p2 ... pk | ctx) = log p(p1 | h) + log p(p2 | ctx, p1) + ... ,
so the logit that gives the new token that probability is  t(h) = logit_p1(h) + sum_{j>=2} log p(pj | ctx, p<j).
The new output row w is fitted so that h·w reaches t(h) on the contexts where the term occurs in the training texts
(one forward pass of the base over a few thousand tokens) wherever the mean row falls short of it: ridge regression
anchored at the mean row, on the shortfall only,
    w = w_mean + s H^T (H H^T + λ I)^{-1} max(t - H w_mean, 0),   λ = ridge * mean ||h||^2,
the smallest change of the mean row that reaches the targets (λ keeps it small where contexts are few or alike),
shortened (s < 1) where the row would grow longer than the longest old row. The fit never aims BELOW the mean row:
a base that has not learnt a term (tests/test_pipeline.py's base, trained on general text only) finds its piece
sequence far less likely than the mean row does (24 nats on average there), and reaching that takes rows up to ~50x
longer than the average old row, which give huge logits at positions unlike the fitted ones (general bpb x4.3) and,
tied, are read back as input rows; the mean row is then the better start, and it is kept. Old tokens' logits do not
change; each keeps its probability relative to the other old tokens, and all of them give up together the share the
new tokens take.

Input rows from the last piece (`set_input_rows_from_last_piece`, `tokenizer.init: last_piece`). What the model
must do after reading the new token is what the base does after reading the term's LAST piece: that position is
where the base has assembled the word (Kaplan et al. 2024, "From Tokens to Words: On the Inner Lexicon of LLMs",
use the last piece's hidden state as a new word's input embedding). The input row is the base's residual stream at
the last piece after `tokenizer.init_layer` layers (0, the default: the last piece's own input row), averaged over
the contexts and scaled to the mean row's norm. Measured on the tests' tiny models, the position right after a new
token costs ~10x the base's bits with the mean row and ~2x with this one (bench/README.md).

Unmet tokens (`quiet_unmet_output_rows`). Intermediate merge tokens (" tacrol" on the way to " tacrolimus") are
emitted only for rare words, yet a mean output row gives them a share of every position's probability. Every init
but "mean" gives the intermediate tokens not met in the contexts the output row of the old token whose highest
probability at any position read while collecting the contexts is the lowest (terms not met within the context
budget keep their mean rows). Not the token least likely where terms start: on tests/test_pipeline.py's base that
was " and", one of the commonest words of general text, and 157 copies of its row took its share wherever " and"
is likely (general bpb x1.12 instead of x1.04). With tied
embeddings a token has one row: the output fit then also moves the input row (for "last_piece_seqprob", by the smallest
change of the last-piece row that reaches the targets: measured on
the tied tiny model it beats the last-piece row alone). `refine_new_rows` applies a `tokenizer.init`; the measured
comparison is bench/extension.py.

`default_resize` is the library's own initialisation (`resize_token_embeddings` with its defaults, which in
transformers >= 4.46 samples new rows around the mean of all old rows), kept for the comparison in the tokenizer
report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

import torch
from torch import nn

from dapt_core.config_sections import NewRowInit
from dapt_core.metrics import prefix_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def embeddings_tied(model: PreTrainedModel) -> bool:
    """Whether the output embeddings are the very same tensor as the input embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def vocab_rows_needed(tokenizer: PreTrainedTokenizerBase) -> int:
    """Rows a model needs for `tokenizer`: its largest id + 1 (equal to len(tokenizer) unless ids have holes)."""
    return max(tokenizer.get_vocab().values()) + 1


def token_pieces(old_tokenizer: PreTrainedTokenizerBase, token: str) -> list[int]:
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


def _snapshot(model: PreTrainedModel) -> dict:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embeddings_tied(model)
    snap = {"tied": tied, "rows": inp.weight.shape[0], "input": inp.weight.detach().clone()}
    if out is not None and not tied:
        snap["output"] = out.weight.detach().clone()
    if out is not None and getattr(out, "bias", None) is not None:
        snap["bias"] = out.bias.detach().clone()
    return snap


def _set_untied_config(model: PreTrainedModel) -> None:
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def _resize(model: PreTrainedModel, rows_needed: int, pad_to_multiple_of: int | None, mean_resizing: bool) -> dict:
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
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
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


def default_resize(
    model: PreTrainedModel, new_tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = 64
) -> dict:
    """The library's default initialisation, for comparison: `resize_token_embeddings` with its default init.

    New ids that fit in an already padded matrix keep whatever those rows held (the library does nothing there).
    Old rows are still checked and repaired by the same guard, so the comparison is about the new rows only.
    """
    info = _resize(model, vocab_rows_needed(new_tokenizer), pad_to_multiple_of, mean_resizing=True)
    info.pop("snapshot")
    info["init"] = "transformers resize_token_embeddings default (mean_resizing=True)"
    return info


@dataclass
class _Contexts:
    """Per new token id: final hidden states before the term, and the raw logit each should give the new token."""

    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    targets: dict[int, list[float]] = field(default_factory=dict)
    last_piece_states: dict[int, torch.Tensor] = field(default_factory=dict)  # summed residual stream per layer
    tokens_read: int = 0
    peak_log_probs: torch.Tensor | None = None  # per old token: its highest log-probability at any position read


def _occurrences(
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    text: str,
    wanted: dict[int, list[int]],
) -> tuple[list[int], list[tuple[int, int]]]:
    """The base ids of `text` and (new token id, index of its first piece in them) for each occurrence of a wanted
    new token. An occurrence counts when the base encodes the same characters as exactly the token's pieces."""
    new = new_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [(tid, off[0]) for tid, off in zip(new["input_ids"], new["offset_mapping"]) if tid in wanted]
    if not hits:
        return [], []
    base = old_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, start_of = base["input_ids"], {off[0]: i for i, off in enumerate(base["offset_mapping"])}
    found = []
    for tid, char in hits:
        i = start_of.get(char)
        if i is not None and ids[i : i + len(wanted[tid])] == wanted[tid]:
            found.append((tid, i))
    return ids, found


def _collect_contexts(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    pieces_by_id: dict[int, list[int]],
    texts: Iterable[str],
    old_rows: int,
    max_contexts: int,
    max_tokens: int,
    max_length: int,
) -> _Contexts:
    """Run the model (old ids only, so its old-vocabulary softmax is the base's) over windows of `texts` holding
    occurrences of the new tokens, until each has `max_contexts` of them or `max_tokens` tokens were read."""
    prefix = prefix_id(old_tokenizer)
    out, width = _Contexts(), max_length - 1
    head, captured = model.get_output_embeddings(), {}
    hook = head.register_forward_hook(lambda _m, args, _o: captured.__setitem__("h", args[0]))
    try:
        for text in texts:
            if out.tokens_read >= max_tokens or all(len(out.targets.get(t, ())) >= max_contexts for t in pieces_by_id):
                break
            ids, found = _occurrences(old_tokenizer, new_tokenizer, text, pieces_by_id)
            windows: dict[int, list[tuple[int, int]]] = {}
            for tid, i in found:
                if i // width == (i + len(pieces_by_id[tid]) - 1) // width:  # the pieces fit in one window
                    windows.setdefault(i // width, []).append((tid, i % width + 1))
            for w, occ in windows.items():
                occ = [(tid, j) for tid, j in occ if len(out.targets.get(tid, ())) < max_contexts]
                if not occ or out.tokens_read >= max_tokens:
                    continue
                window = [prefix, *ids[w * width : (w + 1) * width]]
                out.tokens_read += len(window)
                with torch.no_grad():
                    res = model(input_ids=torch.tensor([window]), use_cache=False, output_hidden_states=True)
                    logits = res.logits[0, :, :old_rows].float()
                    states = torch.stack(res.hidden_states)[:, 0].float()  # (layers + 1, positions, d)
                    hidden = captured["h"][0].float()
                    raw = torch.nn.functional.linear(
                        hidden,
                        head.weight[:old_rows].float(),
                        None if head.bias is None else head.bias[:old_rows].float(),
                    )
                logp = torch.log_softmax(logits, -1)
                peak = logp.max(0).values
                out.peak_log_probs = peak if out.peak_log_probs is None else torch.maximum(out.peak_log_probs, peak)
                for tid, j in occ:
                    p = pieces_by_id[tid]
                    seq = sum(float(logp[j - 1 + m, p[m]]) for m in range(len(p)))
                    scale = float(logits[j - 1] @ raw[j - 1] / (raw[j - 1] @ raw[j - 1]))  # final = scale * raw
                    target = float(raw[j - 1, p[0]]) + (seq - float(logp[j - 1, p[0]])) / scale
                    out.hidden.setdefault(tid, []).append(hidden[j - 1])
                    last = states[:, j + len(p) - 1]
                    out.last_piece_states[tid] = out.last_piece_states.get(tid, 0) + last
                    out.targets.setdefault(tid, []).append(target)
    finally:
        hook.remove()
    return out


def collect_piece_contexts(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    new_ids: dict[str, int],
    pieces: dict[str, list[int]],
    old_rows: int,
    texts: Iterable[str],
    *,
    max_contexts: int = 16,
    max_tokens: int = 16_384,
    max_length: int = 256,
) -> _Contexts:
    """What the base model does around each new token's occurrences in `texts` (training texts, never held-out
    ones): the final hidden state before the term and the logit that would give the term its base probability
    there; the residual stream at the term's last piece. Runs `model` (already resized) on old ids only."""
    pieces_by_id = {new_ids[t]: pieces[t] for t in new_ids}
    was_training = model.training
    model.eval()
    try:
        return _collect_contexts(
            model, old_tokenizer, new_tokenizer, pieces_by_id, texts, old_rows, max_contexts, max_tokens, max_length
        )
    finally:
        model.train(was_training)


RIDGE = 1.0  # λ = RIDGE * mean ||h||^2 (module docstring)


def fit_output_rows(model: PreTrainedModel, contexts: _Contexts, old_rows: int, ridge: float = RIDGE) -> dict:
    """Raise the output rows of the new tokens met in `contexts` so that each new token's logit reaches the base's
    log-probability of its piece sequence where the mean row falls short of it (module docstring), never past the
    norm of the longest old row. Returns a JSON-able report: tokens fitted, contexts used, mean logit shortfall on
    those contexts before (mean row) and after the fit, and how many rows the norm bound shortened."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    longest = float(head.weight[:old_rows].detach().float().norm(dim=1).max())
    short_before = short_after = 0.0
    n_contexts = bounded = 0
    with torch.no_grad():
        for tid, hs in contexts.hidden.items():
            h = torch.stack(hs).double()
            t = torch.tensor(contexts.targets[tid], dtype=torch.float64) - (
                float(bias[tid]) if bias is not None else 0.0
            )
            w0 = head.weight[tid].double()
            shortfall = (t - h @ w0).clamp(min=0.0)
            gram = h @ h.T
            lam = ridge * float(gram.diagonal().mean())
            change = h.T @ torch.linalg.solve(gram + lam * torch.eye(len(hs), dtype=torch.float64), shortfall)
            scale = _within_norm(w0, change, longest)
            bounded += scale < 1.0
            w = w0 + scale * change
            head.weight[tid] = w.to(head.weight.dtype)
            short_before += float(shortfall.sum())
            short_after += float((t - h @ w).clamp(min=0.0).sum())
            n_contexts += len(hs)
    return {
        "fitted_tokens": len(contexts.hidden),
        "contexts": n_contexts,
        "tokens_read": contexts.tokens_read,
        "ridge": ridge,
        "mean_logit_shortfall_mean_row": short_before / n_contexts if n_contexts else None,
        "mean_logit_shortfall_fitted": short_after / n_contexts if n_contexts else None,
        "rows_bounded_by_norm": bounded,
    }


def _within_norm(row: torch.Tensor, change: torch.Tensor, limit: float) -> float:
    """The largest s in [0, 1] with ||row + s * change|| <= limit (0 when the row alone is already past it)."""
    a, b, c = float(change @ change), 2 * float(row @ change), float(row @ row) - limit**2
    if a == 0.0 or a + b + c <= 0.0:
        return 1.0
    if c >= 0.0:
        return 0.0
    return (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)


def set_input_rows_from_last_piece(model: PreTrainedModel, contexts: _Contexts, layer: int) -> dict:
    """Input row of each new token met in `contexts` = the base's residual stream at the term's last piece after
    `layer` layers (0: that piece's own input row), averaged over the contexts and scaled to the norm of the
    mean-of-pieces row (module docstring). Returns a JSON-able report."""
    emb = model.get_input_embeddings()
    layers = next((len(v) for v in contexts.last_piece_states.values()), layer + 1)
    if layer >= layers:
        raise ValueError(
            f"tokenizer.init_layer: {layer} is past the model's last layer ({layers - 1}); use 0..{layers - 1}"
        )
    with torch.no_grad():
        for tid, summed in contexts.last_piece_states.items():
            state = summed[layer] / len(contexts.hidden[tid])
            emb.weight[tid] = (state * emb.weight[tid].float().norm() / state.norm()).to(emb.weight.dtype)
    return {"input_rows_set": len(contexts.last_piece_states), "layer": layer}


def quiet_unmet_output_rows(model: PreTrainedModel, contexts: _Contexts, new_ids: list[int]) -> dict:
    """Output rows of `new_ids` (intermediate merge tokens, which the extended tokenizer emits only for rare
    words) never met in `contexts` = the output row of the old token whose highest probability at any position the
    contexts read is the lowest: they start as unlikely as the base's least likely token instead of taking the mean
    of their pieces' probability at every position. (The token least likely where terms start can be a common one
    elsewhere, " and" for instance: every copy of its row then takes its share there.) Returns a JSON-able report."""
    unmet = [i for i in new_ids if i not in contexts.hidden]
    if not unmet or contexts.peak_log_probs is None:
        return {"unmet_rows_quieted": 0}
    head = model.get_output_embeddings()
    quiet = int(contexts.peak_log_probs.argmin())
    with torch.no_grad():
        head.weight[unmet] = head.weight[quiet].clone()
        if head.bias is not None:
            head.bias[unmet] = head.bias[quiet].clone()
    return {
        "unmet_rows_quieted": len(unmet),
        "quiet_row_of": quiet,
        "quiet_row_peak_log_prob": float(contexts.peak_log_probs[quiet]),
    }


NEW_ROW_INITS = get_args(NewRowInit)  # the values tokenizer.init accepts


def refine_new_rows(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    added: dict,
    texts: Iterable[str],
    init: str,
    *,
    layer: int = 0,
    contexts: _Contexts | None = None,
    intermediates: Iterable[str] = (),
) -> dict:
    """Apply `init` to the new rows of a model that `add_tokens_with_mean_init` extended (`added` is its report):
    "mean" keeps the mean rows; "seqprob" fits the output rows to the base's piece-sequence probability;
    "last_piece" sets the input rows from the base's residual stream at the term's last piece; "last_piece_seqprob"
    does both (tied: the fit's smallest change of the last-piece row). Every init but "mean" also quiets the output
    rows of the `intermediates` (merge tokens that are no term) never met (`quiet_unmet_output_rows`). `texts`:
    training texts, where the contexts come from (`contexts`: already collected by `collect_piece_contexts` on this
    model). Returns a JSON-able report."""
    if init not in NEW_ROW_INITS:
        raise ValueError(f"tokenizer.init: {init!r} is not one of {', '.join(NEW_ROW_INITS)}")
    report: dict = {"init": init}
    if init == "mean":
        return report
    if contexts is None:
        contexts = collect_piece_contexts(
            model,
            old_tokenizer,
            new_tokenizer,
            added["new_ids"],
            added["pieces"],
            added["old_rows"],
            texts,
        )
    report.update(tokens_read=contexts.tokens_read, tokens_met=len(contexts.hidden), new_tokens=len(added["new_ids"]))
    if init.startswith("last_piece"):
        report["input"] = set_input_rows_from_last_piece(model, contexts, layer)
    if init.endswith("seqprob"):
        report["output"] = fit_output_rows(model, contexts, added["old_rows"])
    report["unmet"] = quiet_unmet_output_rows(model, contexts, [added["new_ids"][t] for t in intermediates])
    return report
