"""Gopher (Rae et al. 2021) and C4 style document quality heuristics.

Words are whitespace-separated tokens, lines are the non-blank lines. Every threshold comes from
QualityConfig, where None turns that check off; a dropped document's reason is the name of the
first failing field, e.g. "quality:min_words". The repetition checks look at a prefix of the
document only, so their cost is bounded however large the document is. The n-gram repetition
signals are computed for many documents at once (`quality_reasons`): on one document of a few
hundred words, numpy's per-call overhead outweighed the work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import chain, filterfalse, repeat

import numpy as np

from dapt_core.clean.ngrams import POSITION_MULT
from dapt_core.config import QualityConfig

REPETITION_PREFIX_CHARS = 100_000
_BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "–", "-", "*", "·")
_ELLIPSES = ("...", "…")
_has_letter = re.compile(r"[^\W\d_]").search
_TOP_NGRAM_SCALE = {2: 1.0, 3: 0.9, 4: 0.8}  # Gopher: 0.20 / 0.18 / 0.16
_DUP_NGRAM_SCALE = {n: 1 - (n - 5) / 15 for n in range(5, 11)}  # Gopher: 0.15 down to 0.10
_DOC_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: adding doc * _DOC_MULT to n-gram keys keeps documents apart
_NGRAM_CHUNK_WORDS = 1 << 18  # per n-gram pass: amortises numpy's per-call cost, bounds the memory


def quality_reasons(texts: list[str], cfg: QualityConfig) -> list[str | None]:
    """The first failing check of each text as 'quality:<config field>', None for a text that passes.

    The per-text checks stop at a text's first failure; the texts that pass them all get the n-gram
    checks in chunks of about _NGRAM_CHUNK_WORDS words.
    """
    reasons: list[str | None] = []
    todo: list[int] = []  # passed the per-text checks, n-gram checks pending
    todo_words: list[list[str]] = []
    pending = 0
    for i, text in enumerate(texts):
        words = text.split()
        reasons.append(next(_text_failures(text, words, cfg), None))
        if reasons[i] is None:
            todo.append(i)
            todo_words.append(_ngram_words(text, words))
            pending += len(todo_words[-1])
        if todo and (pending >= _NGRAM_CHUNK_WORDS or i == len(texts) - 1):
            for j, failures in zip(todo, _ngram_failures([texts[j] for j in todo], todo_words, cfg)):
                reasons[j] = failures[0] if failures else None
            todo, todo_words, pending = [], [], 0
    return reasons


def quality_failures(text: str, cfg: QualityConfig) -> list[str]:
    """Every failing check of one text, cheapest first."""
    words = text.split()
    return [*_text_failures(text, words, cfg), *_ngram_failures([text], [_ngram_words(text, words)], cfg)[0]]


def _text_failures(text: str, words: list[str], cfg: QualityConfig) -> Iterator[str]:
    """Every check but the n-gram ones, lazily, cheapest first; `words` is text.split()."""
    n_words = len(words)
    if cfg.min_words is not None and n_words < cfg.min_words:
        yield "quality:min_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        yield "quality:max_words"
    if n_words == 0:
        return  # every other signal is a ratio over words or lines
    mean_len = len("".join(words)) / n_words
    if cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length:
        yield "quality:min_mean_word_length"
    if cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length:
        yield "quality:max_mean_word_length"
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
        if symbols / n_words > cfg.max_symbol_word_ratio:
            yield "quality:max_symbol_word_ratio"
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    if (
        cfg.max_ellipsis_line_fraction is not None
        and sum(map(str.endswith, lines, repeat(_ELLIPSES))) / len(lines) > cfg.max_ellipsis_line_fraction
    ):
        yield "quality:max_ellipsis_line_fraction"
    if (
        cfg.max_bullet_line_fraction is not None
        and sum(map(str.startswith, lines, repeat(_BULLETS))) / len(lines) > cfg.max_bullet_line_fraction
    ):
        yield "quality:max_bullet_line_fraction"
    if cfg.min_alpha_word_fraction is not None:
        others = list(filterfalse(str.isalpha, words))  # most words are all letters; only the others need the regex
        with_letter = n_words - len(others) + sum(map(bool, map(_has_letter, others)))
        if with_letter / n_words < cfg.min_alpha_word_fraction:
            yield "quality:min_alpha_word_fraction"
    if cfg.max_duplicate_line_fraction is not None:
        if len(text) > REPETITION_PREFIX_CHARS:  # like the n-gram checks, it only reads a prefix
            lines = [line for line in map(str.strip, text[:REPETITION_PREFIX_CHARS].split("\n")) if line]
        if lines and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
            yield "quality:max_duplicate_line_fraction"


def _ngram_words(text: str, words: list[str]) -> list[str]:
    """The words the n-gram checks read (`words` is text.split()): those of its first
    REPETITION_PREFIX_CHARS characters."""
    return words if len(text) <= REPETITION_PREFIX_CHARS else text[:REPETITION_PREFIX_CHARS].split()


def _ngram_failures(texts: list[str], words: list[list[str]], cfg: QualityConfig) -> list[list[str]]:
    """The failing n-gram repetition checks of each text (`words`: its `_ngram_words`); none for a
    text without words (no ratio to take)."""
    failures: list[list[str]] = [[] for _ in texts]
    if cfg.max_top_ngram_char_fraction is None and cfg.max_duplicate_ngram_char_fraction is None:
        return failures
    length = np.array([max(1, min(len(t), REPETITION_PREFIX_CHARS)) for t in texts])[:, None]
    has_words = np.array([len(w) > 0 for w in words], dtype=bool)
    top, dup = _ngram_chars(words)
    checks = [
        (cfg.max_top_ngram_char_fraction, _TOP_NGRAM_SCALE, top, "quality:max_top_ngram_char_fraction"),
        (cfg.max_duplicate_ngram_char_fraction, _DUP_NGRAM_SCALE, dup, "quality:max_duplicate_ngram_char_fraction"),
    ]
    for bound, scales, chars, reason in checks:
        if bound is None:
            continue
        bounds = np.array([bound * scale for scale in scales.values()])  # the same floats as a per-n Python loop
        for i in np.flatnonzero(has_words & (chars / length > bounds).any(axis=1)):
            failures[i].append(reason)
    return failures


def _ngram_chars(docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The word n-gram repetition signals of a batch of documents (their words), in characters
    (spaces excluded), with one column per n:

    - top, n in _TOP_NGRAM_SCALE: all occurrences of the most frequent repeated n-gram;
    - dup, n in _DUP_NGRAM_SCALE: the words covered by an n-gram occurrence that repeats an earlier
      one, each word once however many occurrences overlap it.

    An n-gram is a uint64 key (equal n-grams of a document have equal keys; others collide with
    probability ~2^-64), grouped with one argsort per n over the whole batch. An n-gram can only
    repeat where the (n-1)-gram it extends repeats, so only those positions go on to n + 1: in prose
    a small fraction.
    """
    flat = list(chain.from_iterable(docs))
    # Only equality of words within this batch matters, so the built-in (per-process) str hash is fine.
    word_keys = np.fromiter(map(hash, flat), dtype=np.int64, count=len(flat)).view(np.uint64)
    chars = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
    chars_before = np.concatenate([[0], np.cumsum(chars)])  # n-gram chars = chars_before[i + n] - chars_before[i]
    sizes = [len(d) for d in docs]
    doc = np.repeat(np.arange(len(docs)), sizes)
    doc_end = np.repeat(np.cumsum(sizes), sizes)
    top = np.zeros((len(docs), len(_TOP_NGRAM_SCALE)), dtype=np.int64)
    dup = np.zeros((len(docs), len(_DUP_NGRAM_SCALE)), dtype=np.int64)
    starts = np.arange(len(flat))
    keys = word_keys * POSITION_MULT[0] + doc.astype(np.uint64) * _DOC_MULT
    for n in range(2, max(_DUP_NGRAM_SCALE) + 1):
        inside = starts + n <= doc_end[starts]
        starts = starts[inside]
        if len(starts) == 0:
            break
        keys = keys[inside] + word_keys[starts + n - 1] * POSITION_MULT[n - 1]  # key_n = key_{n-1} + w * M_n
        order, run_starts, run_lengths = _groups(keys)
        count = np.empty(len(keys), dtype=np.int64)
        count[order] = np.repeat(run_lengths, run_lengths)
        owner = doc[starts]
        if n in _TOP_NGRAM_SCALE:
            top_count = np.zeros(len(docs), dtype=np.int64)
            np.maximum.at(top_count, owner, count)
            is_top = (count == top_count[owner]) & (count > 1)
            top_chars = np.zeros(len(docs), dtype=np.int64)
            np.maximum.at(top_chars, owner[is_top], chars_before[starts[is_top] + n] - chars_before[starts[is_top]])
            top[:, list(_TOP_NGRAM_SCALE).index(n)] = top_count * top_chars
        if n in _DUP_NGRAM_SCALE:
            later = count > 1
            later[np.minimum.reduceat(order, run_starts)] = False  # the first occurrence of each n-gram
            begin = starts[later]  # ascending; each occurrence covers words [begin, begin + n) of its document
            end = begin + n
            # Count each word once: an occurrence only adds the words after the previous one's end
            # (which, in an earlier document, is at most this one's begin).
            begin[1:] = np.maximum(begin[1:], end[:-1])
            np.add.at(dup[:, list(_DUP_NGRAM_SCALE).index(n)], doc[begin], chars_before[end] - chars_before[begin])
        repeated = count > 1
        starts, keys = starts[repeated], keys[repeated]
    return top, dup


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of `keys`, start of each run of equal keys in that order, and each run's length."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    return order, starts, np.diff(np.append(starts, len(keys)))
