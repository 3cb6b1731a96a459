"""Gopher (Rae et al. 2021) and C4 style document quality heuristics.

Words are whitespace-separated tokens, lines are the non-blank lines. Every threshold comes from
QualityConfig, where None turns that check off; a dropped document's reason is the name of the
first failing field, e.g. "quality:min_words". The repetition checks look at a prefix of the
document only, so their cost is bounded however large the document is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import filterfalse, repeat

import numpy as np

from dapt_core.clean.ngrams import POSITION_MULT
from dapt_core.config import QualityConfig

REPETITION_PREFIX_CHARS = 100_000
_BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "–", "-", "*", "·")
_ELLIPSES = ("...", "…")
_has_letter = re.compile(r"[^\W\d_]").search
_TOP_NGRAM_SCALE = {2: 1.0, 3: 0.9, 4: 0.8}  # Gopher: 0.20 / 0.18 / 0.16
_DUP_NGRAM_SCALE = {n: 1 - (n - 5) / 15 for n in range(5, 11)}  # Gopher: 0.15 down to 0.10


def quality_reason(text: str, cfg: QualityConfig) -> str | None:
    """The first failing check as 'quality:<config field>', or None when the document passes."""
    return next(quality_failures(text, cfg), None)


def quality_failures(text: str, cfg: QualityConfig) -> Iterator[str]:
    """Every failing check, cheapest first; lazy, so taking the first one skips the costly ones."""
    words = text.split()
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
    if cfg.max_ellipsis_line_fraction is not None:
        if sum(map(str.endswith, lines, repeat(_ELLIPSES))) / len(lines) > cfg.max_ellipsis_line_fraction:
            yield "quality:max_ellipsis_line_fraction"
    if cfg.max_bullet_line_fraction is not None:
        if sum(map(str.startswith, lines, repeat(_BULLETS))) / len(lines) > cfg.max_bullet_line_fraction:
            yield "quality:max_bullet_line_fraction"
    if cfg.min_alpha_word_fraction is not None:
        others = list(filterfalse(str.isalpha, words))  # most words are all letters; only the others need the regex
        with_letter = n_words - len(others) + sum(map(bool, map(_has_letter, others)))
        if with_letter / n_words < cfg.min_alpha_word_fraction:
            yield "quality:min_alpha_word_fraction"
    if len(text) > REPETITION_PREFIX_CHARS:
        text = text[:REPETITION_PREFIX_CHARS]
        words, lines = text.split(), [line for line in map(str.strip, text.split("\n")) if line]
    yield from _repetition_failures(text, words, lines, cfg)


def _repetition_failures(text: str, words: list[str], lines: list[str], cfg: QualityConfig) -> Iterator[str]:
    if cfg.max_duplicate_line_fraction is not None and lines:
        if 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
            yield "quality:max_duplicate_line_fraction"
    if cfg.max_top_ngram_char_fraction is None and cfg.max_duplicate_ngram_char_fraction is None:
        return
    # Only equality of words within this document matters, so the built-in (per-process) str hash is fine.
    word_keys = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    chars_before = np.concatenate([[0], np.cumsum(lengths)])  # n-gram chars = chars_before[i+n] - chars_before[i]
    keys = _ngram_keys(word_keys)
    if cfg.max_top_ngram_char_fraction is not None:
        for n, scale in _TOP_NGRAM_SCALE.items():
            chars = _top_ngram_chars(keys[n], chars_before[n:] - chars_before[:-n])
            if chars / len(text) > cfg.max_top_ngram_char_fraction * scale:
                yield "quality:max_top_ngram_char_fraction"
                break
    if cfg.max_duplicate_ngram_char_fraction is not None:
        for n, scale in _DUP_NGRAM_SCALE.items():
            fraction = _duplicate_ngram_chars(keys[n], lengths, n) / len(text)
            if fraction > cfg.max_duplicate_ngram_char_fraction * scale:
                yield "quality:max_duplicate_ngram_char_fraction"
                break
            # Longer n-grams cover a subset of what shorter ones do, so below the lowest bound we are done.
            if fraction <= cfg.max_duplicate_ngram_char_fraction * min(_DUP_NGRAM_SCALE.values()):
                break


def _ngram_keys(word_keys: np.ndarray) -> dict[int, np.ndarray]:
    """For n = 1..10, one uint64 per word n-gram (by start): equal n-grams have equal keys, and
    different ones collide with probability ~2^-64. Built incrementally: key_n = key_{n-1} + w * M_n."""
    keys = {1: word_keys * POSITION_MULT[0]}
    for n in range(2, max(_DUP_NGRAM_SCALE) + 1):
        keys[n] = keys[n - 1][:-1] + word_keys[n - 1 :] * POSITION_MULT[n - 1]
    return keys


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of `keys`, start of each run of equal keys in that order, and each run's length."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    return order, starts, np.diff(np.append(starts, len(keys)))


def _top_ngram_chars(keys: np.ndarray, ngram_chars: np.ndarray) -> int:
    """Characters (spaces excluded) in all occurrences of the most frequent repeated n-gram."""
    if len(keys) == 0:
        return 0
    order, starts, counts = _groups(keys)
    top = counts.max()
    if top < 2:
        return 0
    return int(top * ngram_chars[order[starts[counts == top]]].max())


def _duplicate_ngram_chars(keys: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters (spaces excluded) of the words covered by an n-gram occurrence that repeats an
    earlier one; overlapping occurrences count each word once."""
    if len(keys) == 0:
        return 0
    order, starts, counts = _groups(keys)
    if counts.max() < 2:
        return 0
    repeats = np.ones(len(keys), dtype=bool)
    repeats[np.minimum.reduceat(order, starts)] = False  # the first occurrence of each n-gram
    starts_of_repeats = np.flatnonzero(repeats)
    delta = np.zeros(len(lengths) + 1, dtype=np.int64)
    delta[starts_of_repeats] += 1
    delta[starts_of_repeats + n] -= 1
    covered = np.cumsum(delta[:-1]) > 0
    return int(lengths[covered].sum())
