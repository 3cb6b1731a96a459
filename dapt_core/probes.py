"""Cloze knowledge probes built from held-out text, and the built-in multiple-choice scorer (the native backend's
counterpart of lm-eval's `multiple_choice`: summed log-likelihood of " " + choice after the context, and the same per
UTF-8 byte for acc_norm)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z-]*[A-Za-z]$")


def _clean_word(w: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", w)


def build_probes(
    texts: Sequence[str],
    max_probes: int = 200,
    n_choices: int = 4,
    seed: int = 0,
    context_words: int = 48,
    min_words: int = 5,
) -> list[dict[str, Any]]:
    """Cloze probes `{"context", "choices", "label"}`: context = the text before a sentence's last word (at most
    `context_words` words, crossing sentence borders within the document), choices = that word plus `n_choices - 1`
    distractors of similar length drawn from the words of `texts`. Deterministic in `seed`."""
    if n_choices < 2:
        raise ValueError("n_choices must be >= 2")
    vocab: dict[str, str] = {}
    for t in texts:
        for w in t.split():
            c = _clean_word(w)
            if len(c) >= 3 and _WORD.match(c):
                vocab.setdefault(c.lower(), c)
    words = sorted(vocab.values())
    candidates: list[tuple[str, str]] = []
    for text in texts:
        pos = 0
        for sentence in _SENTENCE_END.split(text):
            start = text.find(sentence, pos)
            pos = start + len(sentence)
            toks = sentence.split()
            if len(toks) < min_words:
                continue
            target = _clean_word(toks[-1])
            if len(target) < 3 or not _WORD.match(target):
                continue
            cut = start + sentence.rfind(toks[-1])
            context = " ".join(text[:cut].split()[-context_words:])
            candidates.append((context, target))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    probes = []
    for context, target in candidates:
        if len(probes) >= max_probes:
            break
        pool = [w for w in words if w.lower() != target.lower() and abs(len(w) - len(target)) <= 2]
        if len(pool) < n_choices - 1:
            pool = [w for w in words if w.lower() != target.lower()]
        if len(pool) < n_choices - 1:
            continue
        choices = rng.sample(pool, n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, target)
        probes.append({"context": context, "choices": choices, "label": label})
    return probes


def score_probes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: Iterable[dict[str, Any]]
) -> tuple[float, float]:
    """(acc, acc_norm) of cloze probes (see `score_choices`)."""
    acc, acc_norm = score_choices(model, tokenizer, probes)
    return (sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)) if acc else (float("nan"), float("nan"))


def score_choices(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Iterable[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """Per item 1/0 (acc, acc_norm) of {"context", "choices", "label"}: summed log-likelihood of " " + choice after
    the context (acc), and the same divided by the choice's UTF-8 bytes (acc_norm), as lm-eval's multiple_choice."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: list[int] = []
    hits_norm: list[int] = []
    try:
        with torch.no_grad():
            for p in items:
                ctx = tokenizer(p["context"], add_special_tokens=False)["input_ids"]
                scores = []
                for c in p["choices"]:
                    full = tokenizer(p["context"] + " " + c, add_special_tokens=False)["input_ids"]
                    # split where the context's tokens stop matching (byte-level BPE may merge across the border)
                    k = 0
                    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
                        k += 1
                    k = max(k, 1)
                    ids = torch.tensor([full], device=device)
                    # log-softmax over the choice's positions only: the context's rows of a 49k vocabulary are waste
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, k - 1 : -1].float(), -1)
                    tgt = ids[0, k:]
                    ll = logp[torch.arange(len(tgt)), tgt].sum().item()
                    scores.append((ll, ll / len((" " + c).encode("utf-8"))))
                label = int(p["label"])
                hits.append(int(max(range(len(scores)), key=lambda i: scores[i][0]) == label))
                hits_norm.append(int(max(range(len(scores)), key=lambda i: scores[i][1]) == label))
    finally:
        model.train(was_training)
    return hits, hits_norm
