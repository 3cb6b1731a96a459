"""Text normalisation applied before every other cleaning step, so dedup and filters see one form."""

from __future__ import annotations

import re
import unicodedata

from dapt_core.config import NormalizeConfig

_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Unicode form (NFC/NFKC) and, if configured, whitespace: every line break becomes "\\n", runs
    of other whitespace one space, lines are trimmed, at most one blank line in a row, and no
    leading or trailing whitespace."""
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        # str.splitlines/str.split run in C: several times faster than the equivalent regexes.
        text = "\n".join(" ".join(line.split()) for line in text.splitlines())
        if "\n\n\n" in text:
            text = _BLANK_RUNS.sub("\n\n", text)
        text = text.strip()
    return text
