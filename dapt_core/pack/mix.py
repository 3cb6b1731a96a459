"""Mixing by token share, token-exact, and the order documents are packed in.

With D domain training tokens and target share f, the training stream has T = floor(D / (1 - f) / seq_len) * seq_len
tokens: G = round(f * T) general and T - G domain tokens, so the realised share is within 0.5 / T of f (absolute; that
is within 0.5% of f once T >= 100 / f tokens). The domain document that crosses T - G is cut, and the domain tokens
after it (< seq_len + 1, i.e. the final partial sequence) are dropped and reported as `dropped_tokens`. The (at most
two) documents cut by a budget end without their EOS; `doc_lengths` still marks where they end.

General documents are taken in a seeded shuffled order until G tokens (the last one cut): when the general corpus is
long, that is a deterministic random subset, and only about that much general text is tokenised at all (the shuffle
is by a hash of (seed, doc_id), so a prefix of it can be chosen from byte counts before tokenising); when it is short,
it is repeated, every further epoch in a new seeded permutation. f = 0 packs no general tokens.

Domain documents are in a seeded shuffled order too (so the order does not depend on row order); general documents
are spread evenly through the stream (each document is placed at the relative position of its midpoint within its own
kind), so any window of training sees about f general tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dapt_core.pack.documents import Docs, ensure_tokens, in_key_order
from dapt_core.pack.tokenise import Encoder, TokenFile
from dapt_core.pack.types import PackError

if TYPE_CHECKING:
    from dapt_core.config import MixConfig


@dataclass(frozen=True)
class MixBudget:
    """How many tokens of each kind the training stream takes (a whole number of sequences)."""

    domain_pool: int  # domain training tokens available
    sequences: int
    total: int  # sequences * seq_len
    general: int  # round(f * total)
    domain: int  # total - general
    general_sample: int  # general tokens for the EWC Fisher sample (0: none)

    @classmethod
    def of(cls, dom: Docs, d_order: np.ndarray, gen: Docs | None, cfg: MixConfig) -> MixBudget:
        """The budget for the domain documents `d_order`; raises PackError when it cannot be met."""
        f = cfg.general_fraction
        pool = int(dom.tok_len.astype(np.int64)[d_order].sum())
        sequences = int(pool / (1 - f)) // cfg.seq_len
        total = sequences * cfg.seq_len
        general = int(round(f * total))
        if sequences == 0:
            raise PackError(
                f"{pool:,} domain training tokens make no full sequence of mix.seq_len={cfg.seq_len}: "
                "add domain text or lower mix.seq_len"
            )
        has_general = gen is not None and gen.train.any()
        if general > 0 and not has_general:
            raise PackError(
                "the general corpus has no training documents (all empty or held out): add data.general "
                "text or enable mix.self_replay"
            )
        sample = cfg.general_sample_sequences * cfg.seq_len if has_general else 0
        return cls(pool, sequences, total, general, total - general, sample)


@dataclass(frozen=True)
class Streams:
    """The documents (indices) each kind contributes and how many of their tokens, in stream order per kind."""

    d_idx: np.ndarray
    d_take: np.ndarray
    g_idx: np.ndarray
    g_take: np.ndarray
    epochs: float | None  # passes over the general training text (None: a subset of it, less than one pass)
    dropped: int  # domain tokens of the final partial sequence

    @property
    def general_tokens(self) -> int:
        return int(self.g_take.sum())


def take_streams(dom: Docs, d_order: np.ndarray, gen: Docs | None, budget: MixBudget, seed: int) -> Streams:
    """Domain documents in key order until the domain budget; general ones until theirs (see `_general_stream`)."""
    d_take = budget_take(d_order, dom.tok_len.astype(np.int64), budget.domain)
    keep = d_take > 0
    d_idx, d_take = d_order[keep], d_take[keep]
    if gen is not None and budget.general > 0:
        g_idx, g_take, epochs = _general_stream(gen, budget.general, seed)
    else:
        g_idx, g_take, epochs = np.empty(0, np.int64), np.empty(0, np.int64), 0.0
    return Streams(d_idx, d_take, g_idx, g_take, epochs, budget.domain_pool - int(d_take.sum()))


def interleave(streams: Streams, dom: Docs, gen: Docs | None, budget: MixBudget) -> tuple[np.ndarray, np.ndarray]:
    """(token-file offset, tokens taken) per document of the training stream: every document at the relative
    position of its midpoint within its kind."""

    def rel_mid(take: np.ndarray, kind_budget: int) -> np.ndarray:
        return (np.cumsum(take) - take / 2) / max(kind_budget, 1)

    pos = np.concatenate([rel_mid(streams.d_take, budget.domain), rel_mid(streams.g_take, budget.general)])
    kind = np.concatenate([np.zeros(len(streams.d_take), np.int8), np.ones(len(streams.g_take), np.int8)])
    order = np.lexsort((kind, pos))
    g_off = gen.tok_off[streams.g_idx] if len(streams.g_idx) else np.empty(0, np.int64)
    off = np.concatenate([dom.tok_off[streams.d_idx], g_off])[order]
    take = np.concatenate([streams.d_take, streams.g_take])[order]
    return off, take


def tokens_by_source(dom: Docs, gen: Docs | None, streams: Streams) -> dict[str, int]:
    """Training tokens per source name, over both kinds."""
    by_source: dict[str, int] = {}
    for docs, idx, tk in ((dom, streams.d_idx, streams.d_take), (gen, streams.g_idx, streams.g_take)):
        if docs is None or not len(idx):
            continue
        sums = np.bincount(docs.source[idx], weights=tk, minlength=len(docs.sources))
        for name, s in zip(docs.sources, sums):
            if s:
                by_source[name] = by_source.get(name, 0) + int(s)
    return by_source


def budget_take(docs_order: np.ndarray, lens: np.ndarray, budget: int) -> np.ndarray:
    """Tokens taken from each document of an ordered list until `budget` tokens (the last one cut, the rest 0)."""
    starts = np.concatenate([[0], np.cumsum(lens[docs_order], dtype=np.int64)[:-1]])
    return np.clip(budget - starts, 0, lens[docs_order]).astype(np.int64)


def _general_stream(docs: Docs, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """General documents (indices) and tokens taken, epoch 0 in key order, later epochs re-permuted, until budget.

    The third value is the number of passes over the general training text (budget / its tokens) when all of it was
    tokenised, None when only a prefix of the shuffled order was (a subset: less than one pass)."""
    base = in_key_order(docs, docs.train & (docs.tok_off >= 0))
    lens = docs.tok_len.astype(np.int64)
    pool = int(lens[base].sum())
    if budget == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0.0
    if pool == 0:
        raise PackError("the general corpus has no training documents (all empty or held out): add general text")
    parts, need, epoch = [], budget, 0
    while need > 0:
        order = base if epoch == 0 else base[np.random.default_rng([seed % (1 << 63), epoch]).permutation(len(base))]
        take = budget_take(order, lens, need)
        keep = take > 0
        parts.append((order[keep], take[keep]))
        need -= int(take.sum())
        epoch += 1
    idx = np.concatenate([p[0] for p in parts])
    take = np.concatenate([p[1] for p in parts])
    everything = bool((docs.tok_off[docs.train] >= 0).all())
    return idx, take, (budget / pool if everything else None)


def refresh_domain_order(
    dom: Docs, paths: list[Path], replay: float, encoder: Encoder, token_file: TokenFile
) -> np.ndarray:
    """The domain documents of a refresh, in key order: every new training document, then earlier ones (whole, in key
    order) until they are `replay` of the domain tokens. Empty when nothing is new. Only what is used is tokenised."""
    lens = dom.tok_len.astype(np.int64)
    fresh = in_key_order(dom, dom.train & dom.new)
    new_tokens = int(lens[fresh].sum())
    if new_tokens == 0 or replay == 0:
        return fresh
    budget = int(round(replay / (1 - replay) * new_tokens))
    bytes_per_token = dom.nbytes[fresh].sum() / new_tokens
    ensure_tokens(dom, paths, budget, bytes_per_token, encoder, token_file, mask=~dom.new)
    earlier = in_key_order(dom, dom.train & ~dom.new & (dom.tok_off >= 0))
    count = (
        int(np.searchsorted(np.cumsum(dom.tok_len[earlier], dtype=np.int64), budget)) + 1
    )  # whole documents, the last one reaching budget
    chosen = np.zeros(len(dom.train), bool)
    chosen[fresh] = True
    chosen[earlier[:count]] = True
    return in_key_order(dom, chosen)
