"""Stage 3: extend the base tokenizer with frequent domain terms it splits into several pieces.

Pipeline (`extend`):

1. Train a domain BPE (`tokenizers`) on the training (not held-out) domain texts with the BASE tokenizer's
   normalizer and pre-tokenizer, so its tokens follow the base conventions: byte-level BPE tokens carry the
   leading-space marker 'Ġ' ("Ġtacrolimus" is " tacrolimus"), SentencePiece-style BPE tokens carry '▁'.
2. Candidates are domain-BPE tokens that the base BPE splits into 2+ pieces. Each is ranked by the tokens it
   saves on the domain corpus, `saving = frequency * (pieces - 1)`, where
     * frequency = the number of pre-tokens of the training texts (after the base normalizer and pre-tokenizer:
       for byte-level BPE a word with its leading space, " tacrolimus") that are exactly the token. Occurrences
       inside longer words do not count. This is the count for which the saving is exact: the extended
       tokenizer encodes such a pre-token as one token where the base used `pieces` (checked for every chosen
       token, see 3), so the saving is a lower bound of the real one. Counting the token as a word-piece of the
       domain BPE's own segmentation instead would credit fragments that save nothing: the domain BPE can learn
       " sugges" from " suggested"/" suggests", but the base already has " suggested" as one token, so a
       " sugges" merge never fires there;
     * pieces = the number of tokens the base BPE model produces for that same pre-token string.
   Filters: at least `min_chars` characters without the space marker; word-like (at least one letter; only
   letters, digits, combining marks, '-', '_' and apostrophes; no inner space); frequency >= `min_frequency`;
   valid UTF-8 on its own. At most `max_new_tokens` vocabulary entries are added in all (see 3 for why a
   candidate can need more than one).
3. Add the winners to the base tokenizer as ordinary vocabulary tokens (see below), resize the model,
   initialise the new rows with the mean of their original pieces' rows and refine them per `tokenizer.init`
   (default seqprob: output rows raised toward the base's probability of the piece sequence; `dapt_core.embedding`).
4. Report tokens per word on held-out domain text before/after, encode->decode round trips on the held-out texts,
   and bits per byte of the base model, of the extended-but-untrained model with mean init and with the configured
   init, and of the same model with the library's default resize init (measured on a copy).

Why merges, not AddedToken. `tokenizer.add_tokens([" tacrolimus"])` creates AddedTokens, which the `tokenizers`
library matches as raw substrings BEFORE pre-tokenization and BPE:
  * " tacrolimusemia" is cut into " tacrolimus" + "emia" (a forced split that the BPE would never make, and
    "emia" then loses its word-start context);
  * `single_word=True` does not fix it for leading-space tokens: the word-boundary test looks at the character
    before the match, which for " tacrolimus" is the last letter of the previous word, so "the tacrolimus" no
    longer matches at all (only after punctuation or a double space);
  * the tokens live outside the BPE model (tokenizer.json "added_tokens"), and every runtime that honours them
    (transformers, llama.cpp's user-defined tokens, vLLM) repeats the same substring pre-split.
Extending the BPE model itself has none of these problems. Each new token gets a vocabulary entry and a chain of
merges appended AFTER all base merges, building it from exactly the pieces the base produces: ("Ġtac", "rol") ->
"Ġtacrol", ("Ġtacrol", "imus") -> "Ġtacrolimus". Because BPE applies merges by rank and every new merge ranks
below every base merge, a pre-token is first segmented exactly as the base does, then the new merges apply. So:
  * " tacrolimus" is one token in running text and decodes to the same bytes (byte-level BPE is lossless);
  * text in which no new merge applies (in particular general text without the new terms) is tokenized exactly
    as before: the old ids and segmentations the model was trained on are unchanged;
  * a longer word such as " tacrolimusemia" is segmented by the BPE, never force-split: the base segmentation of
    it is "Ġtac" "rol" "im" "use" "mia", so only the first new merge applies and it becomes "Ġtacrol" "im" "use"
    "mia". That is the behaviour chosen: longer words get what the merges give them, nothing is cut at a
    substring boundary.
The cost: a token of k base pieces needs k-1 merges and so up to k-2 intermediate tokens ("Ġtacrol"). The merge
tree for each token is chosen to reuse existing or already added tokens as intermediates where it can (fewest new
entries; ties go to the left-to-right chain); the intermediates that still have to be added are counted against
`max_new_tokens`, get mean-initialised rows like the rest, and are listed in the report. After building, every
chosen token is checked to encode to exactly one token; one that does not (a base merge can fire on an
intermediate that already was a base token) is dropped and the tokenizer rebuilt.

Only BPE base tokenizers without a continuing-subword prefix are supported (GPT-2/Llama-3/Qwen/SmolLM style
byte-level BPE and SentencePiece-converted BPE such as Llama-2/Mistral); anything else returns the base unchanged
with the reason in the report.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from typing import TYPE_CHECKING

from dapt_core.config import TokenizerConfig
from dapt_core.manifest import ExtensionCost
from dapt_core.tokenizer_report import bpb_report, render_markdown

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_WORD_PUNCT = set("-_'’")
_BYTE_LEVEL, _METASPACE, _PLAIN = "byte-level", "metaspace", "plain"


@dataclass
class Candidate:
    token: str  # vocabulary string, e.g. "Ġtacrolimus"
    text: str  # what it decodes to, e.g. " tacrolimus"
    frequency: int  # occurrences as a whole pre-token in the training texts
    pieces: list[str]  # the base BPE's segmentation of `token`
    saving: int  # frequency * (len(pieces) - 1)


@dataclass
class ExtensionResult:
    tokenizer: object
    model: object
    report: dict
    report_markdown: str
    new_tokens: list[str] = field(default_factory=list)  # every vocabulary entry added (candidates + intermediates)
    initial_cost: ExtensionCost | None = None  # held-out bpb, original vs extended-untrained


# ---------------------------------------------------------------------------------------------------------------
# conventions of the base tokenizer


def _find_types(node: object, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        if "type" in node:
            out.add(node["type"])
        for v in node.values():
            _find_types(v, out)
    elif isinstance(node, list):
        for v in node:
            _find_types(v, out)
    return out


def _scheme(backend_json: dict) -> str:
    """How the base marks a word start: byte-level ('Ġ'), metaspace ('▁') or plain text."""
    types = _find_types([backend_json.get("pre_tokenizer"), backend_json.get("decoder")], set())
    if "ByteLevel" in types:
        return _BYTE_LEVEL
    if "Metaspace" in types or "▁" in json.dumps(backend_json.get("normalizer"), ensure_ascii=False):
        return _METASPACE
    return _PLAIN


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_text(token: str, scheme: str) -> str | None:
    """The text a vocabulary string stands for (" tacrolimus" for "Ġtacrolimus"); None if not valid UTF-8 alone."""
    if scheme == _BYTE_LEVEL:
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    if scheme == _METASPACE:
        return token.replace("▁", " ")
    return token


def _word_like(word: str) -> bool:
    if not word or not any(c.isalpha() for c in word):
        return False
    return all(c.isalnum() or c in _WORD_PUNCT or unicodedata.category(c).startswith("M") for c in word)


def unsupported_reason(base_tokenizer: PreTrainedTokenizerBase) -> str | None:
    backend = getattr(base_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "the base tokenizer is not a fast (tokenizers) tokenizer"
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        return f"the base tokenizer's model is {model.get('type')}; only BPE can be extended with merges"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with a continuing-subword prefix / end-of-word suffix is not supported"
    return None


# ---------------------------------------------------------------------------------------------------------------
# 1. domain BPE and frequencies


def train_domain_bpe(
    base_tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> Tokenizer:
    """A BPE trained on `texts` with the base tokenizer's normalizer and pre-tokenizer (a `tokenizers.Tokenizer`)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    base = base_tokenizer.backend_tokenizer
    scheme = _scheme(json.loads(base.to_str()))
    domain = Tokenizer(models.BPE())
    if base.normalizer is not None:
        domain.normalizer = base.normalizer
    # A base without pre-tokenizer (Llama-2's converted SentencePiece runs BPE over the whole '▁'-joined text)
    # would let the domain BPE learn tokens across words: split before each space marker for training only.
    domain.pre_tokenizer = base.pre_tokenizer or pre_tokenizers.Split(Regex(r"[▁\s]"), behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if scheme == _BYTE_LEVEL else [],
    )
    domain.train_from_iterator(texts, trainer)
    return domain


def pretoken_frequencies(
    domain_bpe: Tokenizer, texts: Iterable[str], tokens: list[str], batch_size: int = 1024
) -> np.ndarray:
    """How often each of `tokens` (vocabulary strings) is a whole pre-token of `texts`, under the domain BPE's
    normalizer and pre-tokenizer (the base's). Counted in Rust by a WordLevel model whose vocabulary is `tokens`
    (every other pre-token maps to an unknown id). Returns a numpy array aligned with `tokens`."""
    import numpy as np
    from tokenizers import Tokenizer, models

    unk = "\x00"  # no pre-token is this string: byte-level maps byte 0 to 'Ā', and others keep words intact
    vocab = {unk: 0, **{t: i + 1 for i, t in enumerate(tokens)}}
    counter = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    if domain_bpe.normalizer is not None:
        counter.normalizer = domain_bpe.normalizer
    counter.pre_tokenizer = domain_bpe.pre_tokenizer
    encode = getattr(counter, "encode_batch_fast", counter.encode_batch)
    counts = np.zeros(len(vocab), dtype=np.int64)

    def flush(batch: list[str]) -> None:
        ids = [i for enc in encode(batch, add_special_tokens=False) for i in enc.ids]
        if ids:
            counts[:] += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(vocab))

    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return counts[1:]


# ---------------------------------------------------------------------------------------------------------------
# 2. candidates


def find_candidates(
    base_tokenizer: PreTrainedTokenizerBase, domain_bpe: Tokenizer, texts: Iterable[str], cfg: TokenizerConfig
) -> tuple[list[Candidate], dict[str, int]]:
    """Domain-BPE tokens the base splits into 2+ pieces that pass the filters, best saving first, with their
    frequency as whole pre-tokens of `texts` (the training texts); and the rejects counted by reason."""
    base = base_tokenizer.backend_tokenizer
    scheme = _scheme(json.loads(base.to_str()))
    rejected: dict[str, int] = {}
    shaped: list[tuple[str, str, list[str]]] = []

    def reject(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    for token in sorted(domain_bpe.get_vocab()):
        text = token_text(token, scheme)
        if text is None:
            reject("not valid UTF-8 on its own")
            continue
        word = text[1:] if text.startswith(" ") else text
        if len(word) < cfg.min_chars:
            reject(f"shorter than {cfg.min_chars} characters")
            continue
        if not _word_like(word):
            reject("not word-like")
            continue
        try:
            pieces = base.model.tokenize(token)
        except Exception:  # noqa: BLE001 - e.g. a character the base model cannot represent
            pieces = []
        if not pieces or "".join(p.value for p in pieces) != token or any(p.id is None for p in pieces):
            reject("base pieces do not spell the token (unknown/byte-fallback pieces)")
            continue
        if len(pieces) < 2:
            reject("already one base token")
            continue
        shaped.append((token, text, [p.value for p in pieces]))
    counts = pretoken_frequencies(domain_bpe, texts, [t for t, _, _ in shaped])
    out: list[Candidate] = []
    for (token, text, pieces), freq in zip(shaped, counts.tolist()):
        if freq < cfg.min_frequency:
            reject(f"frequency below {cfg.min_frequency}")
            continue
        out.append(Candidate(token, text, freq, pieces, freq * (len(pieces) - 1)))
    out.sort(key=lambda c: (-c.saving, -c.frequency, c.token))
    return out, rejected


# ---------------------------------------------------------------------------------------------------------------
# 3. the extended tokenizer (vocab + merges)


def _merge_plan(pieces: list[str], known: Collection[str]) -> list[tuple[str, str, str]]:
    """Merges (left, right, result) that build "".join(pieces) from `pieces`, children before parents, adding the
    fewest strings not in `known` (ties: the left-to-right chain)."""

    @cache
    def best(i: int, j: int) -> tuple[int, int]:
        if j - i == 1:
            return 0, -1
        choice = None
        for m in range(j - 1, i, -1):  # m = j-1 first: the left chain wins ties
            cost = best(i, m)[0] + best(m, j)[0]
            if choice is None or cost < choice[0]:
                choice = (cost, m)
        cost, m = choice
        return cost + ("".join(pieces[i:j]) not in known), m

    plan: list[tuple[str, str, str]] = []

    def walk(i: int, j: int) -> str:
        if j - i == 1:
            return pieces[i]
        m = best(i, j)[1]
        left, right = walk(i, m), walk(m, j)
        plan.append((left, right, left + right))
        return left + right

    walk(0, len(pieces))
    return plan


def _build(base_json: dict, candidates: list[Candidate], cap: int) -> tuple[dict, list[Candidate], list[str], int]:
    j = copy.deepcopy(base_json)
    model = j["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    as_lists = not merges or isinstance(merges[0], list)
    pairs = {tuple(m) if as_lists else tuple(m.split(" ", 1)) for m in merges}
    next_id = max([*vocab.values(), *(t["id"] for t in j.get("added_tokens") or [])]) + 1
    added: list[str] = []
    chosen: list[Candidate] = []
    over_cap = 0
    for cand in candidates:
        plan = _merge_plan(cand.pieces, vocab)
        new = list(dict.fromkeys(r for _, _, r in plan if r not in vocab))
        if len(added) + len(new) > cap:
            over_cap += 1
            continue
        for left, right, result in plan:
            if result not in vocab:
                vocab[result] = next_id
                next_id += 1
                added.append(result)
            if (left, right) not in pairs:
                pairs.add((left, right))
                merges.append([left, right] if as_lists else f"{left} {right}")
        chosen.append(cand)
    return j, chosen, added, over_cap


def build_extended_tokenizer(
    base_tokenizer: PreTrainedTokenizerBase, candidates: list[Candidate], max_new_tokens: int
) -> tuple[PreTrainedTokenizerBase, list[Candidate], list[str], dict]:
    """The base tokenizer with the candidates (best first, within `max_new_tokens` vocabulary entries) appended to
    its BPE vocab and merges. Returns (tokenizer, chosen candidates, added vocabulary strings, stats)."""
    from tokenizers import Tokenizer

    base_json = json.loads(base_tokenizer.backend_tokenizer.to_str())
    pool = list(candidates)
    dropped: list[str] = []
    while True:
        j, chosen, added, over_cap = _build(base_json, pool, max_new_tokens)
        backend = Tokenizer.from_str(json.dumps(j, ensure_ascii=False))
        bad = {c.token for c in chosen if [p.value for p in backend.model.tokenize(c.token)] != [c.token]}
        if not bad:
            break
        dropped += sorted(bad)
        pool = [c for c in pool if c.token not in bad]
    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer._tokenizer = backend
    stats = {"over_cap": over_cap, "dropped_merge_conflict": dropped}
    return tokenizer, chosen, added, stats


# ---------------------------------------------------------------------------------------------------------------
# 4. the stage


def _texts_factory(texts: Iterable[str] | Callable[[], Iterable[str]]) -> Callable[[], Iterable[str]]:
    if callable(texts):
        return texts
    if iter(texts) is texts:  # a one-shot iterator: it is read twice (training, then frequencies)
        texts = list(texts)
    return lambda: texts


def _tokenization_report(
    tokenizer: PreTrainedTokenizerBase, base_tokenizer: PreTrainedTokenizerBase, heldout: list[str]
) -> dict:
    """Round trip and tokens per word of the held-out texts, extended vs base tokenizer."""
    from dapt_core.metrics import tokens_per_word

    same, exact = _lossless(tokenizer, base_tokenizer, heldout)
    base_exact = _lossless(base_tokenizer, base_tokenizer, heldout)[1]
    before, after = tokens_per_word(base_tokenizer, heldout), tokens_per_word(tokenizer, heldout)
    return {
        "roundtrip": {"texts": len(heldout), "same_as_base": same, "exact_extended": exact, "exact_base": base_exact},
        "tokens_per_word_heldout": {"before": before, "after": after, "reduction": 1 - after / before},
    }


def _lossless(
    tokenizer: PreTrainedTokenizerBase, base_tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[int, int]:
    """(texts whose encode->decode equals the base tokenizer's encode->decode, texts equal to the input)."""
    same_as_base = exact = 0
    for t in texts:
        dec = tokenizer.backend_tokenizer.decode(
            tokenizer(t, add_special_tokens=False)["input_ids"], skip_special_tokens=False
        )
        base = base_tokenizer.backend_tokenizer.decode(
            base_tokenizer(t, add_special_tokens=False)["input_ids"], skip_special_tokens=False
        )
        same_as_base += dec == base
        exact += dec == t
    return same_as_base, exact


def _cap_bytes(texts: list[str], max_bytes: int | None) -> list[str]:
    if max_bytes is None:
        return texts
    out, total = [], 0
    for t in texts:
        if out and total >= max_bytes:
            break
        out.append(t)
        total += len(t.encode("utf-8"))
    return out


def _unchanged(
    model: PreTrainedModel, base_tokenizer: PreTrainedTokenizerBase, report: dict, reason: str
) -> ExtensionResult:
    report.update(changed=False, reason=reason)
    return ExtensionResult(base_tokenizer, model, report, render_markdown(report))


@dataclass
class _Surgery:
    """What the resize-and-initialise step needs besides the model: the extended tokenizer, its added entries, the
    training texts (for the context-fitted inits), the config and the scoring settings."""

    tokenizer: PreTrainedTokenizerBase
    added: list[str]
    texts: Callable[[], Iterable[str]]
    cfg: TokenizerConfig
    kw: dict


def _resize_and_measure(
    model: PreTrainedModel,
    base_tokenizer: PreTrainedTokenizerBase,
    surgery: _Surgery,
    heldout: list[str],
    general: list[str],
    report: dict,
    eval_max_bytes: int | None,
    pad_to_multiple_of: int | None,
) -> ExtensionCost | None:
    """Resize and initialise `model` in place (mean of pieces, then `cfg.init`), scoring the held-out texts with the
    base model and a default-init copy before the change and with the extended model after it: the report's bits per
    byte and the extension's initial cost (None without held-out texts)."""
    from dapt_core.embedding import add_tokens_with_mean_init, default_resize, refine_new_rows
    from dapt_core.metrics import nll_stats

    tokenizer, added, texts, cfg, kw = surgery.tokenizer, surgery.added, surgery.texts, surgery.cfg, surgery.kw
    general = _cap_bytes(general, eval_max_bytes)
    if heldout:
        report.update(_tokenization_report(tokenizer, base_tokenizer, heldout))
        evald = _cap_bytes(heldout, eval_max_bytes)
        base_stats = nll_stats(model, base_tokenizer, evald, **kw)
        base_general = nll_stats(model, base_tokenizer, general, **kw) if general else None
        clone = copy.deepcopy(model)
        default_resize(clone, tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        default_stats = nll_stats(clone, tokenizer, evald, **kw)
        del clone
    emb = add_tokens_with_mean_init(model, base_tokenizer, tokenizer, added, pad_to_multiple_of=pad_to_multiple_of)
    report["embedding"] = {k: v for k, v in emb.items() if k not in ("pieces", "new_ids")}
    mean_stats = nll_stats(model, tokenizer, evald, **kw) if heldout and cfg.init != "mean" else None
    report["init"] = refine_new_rows(
        model,
        base_tokenizer,
        tokenizer,
        emb,
        texts(),
        cfg.init,
        layer=cfg.init_layer,
        intermediates=report["intermediate_tokens"],
    )
    cost = None
    if heldout:
        ext_stats = nll_stats(model, tokenizer, evald, **kw)
        ext_general = nll_stats(model, tokenizer, general, **kw) if general else None
        report["bits_per_byte_heldout"], cost = bpb_report(
            cfg.init,
            len(evald),
            base_stats,
            ext_stats,
            mean_stats or ext_stats,
            default_stats,
            len(general),
            base_general,
            ext_general,
        )
        report["initial_cost"] = cost.model_dump()
    else:
        report["bits_per_byte_heldout"] = None
        report["note"] = "no held-out texts: tokens per word, round trip and bits per byte were not measured"
    return cost


def extend(
    model: PreTrainedModel,
    base_tokenizer: PreTrainedTokenizerBase,
    train_texts: Iterable[str] | Callable[[], Iterable[str]],
    heldout_texts: Iterable[str],
    cfg: TokenizerConfig,
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    eval_max_bytes: int | None = 2_000_000,
    pad_to_multiple_of: int | None = 64,
    general_heldout_texts: Iterable[str] = (),
) -> ExtensionResult:
    """Extend `base_tokenizer` with domain terms and resize/initialise `model` IN PLACE (`cfg.init`).

    train_texts: the kept, NOT held-out domain texts (a re-iterable, or a zero-argument callable returning a fresh
    iterable; a one-shot iterator is materialised because it is read twice). heldout_texts: held-out domain texts
    for the report (bits per byte on the first `eval_max_bytes` bytes of them; None: all); general_heldout_texts:
    held-out general texts, for the general part of the initial cost. The base and a default-init copy are scored
    before the model changes. Returns the base tokenizer and model unchanged, with the reason in the report, when
    `cfg.enabled` is false, the tokenizer cannot be extended, or no candidate passes."""
    report: dict = {"enabled": cfg.enabled, "config": cfg.model_dump()}
    if not cfg.enabled:
        return _unchanged(model, base_tokenizer, report, "tokenizer.enabled is false")
    reason = unsupported_reason(base_tokenizer)
    if reason:
        return _unchanged(model, base_tokenizer, report, reason)

    texts = _texts_factory(train_texts)
    domain = train_domain_bpe(base_tokenizer, texts(), cfg.domain_vocab_size, min_frequency=cfg.min_frequency)
    candidates, rejected = find_candidates(base_tokenizer, domain, texts(), cfg)
    report["domain_bpe_vocab_size"] = domain.get_vocab_size()
    report["rejected"] = rejected
    report["candidates"] = len(candidates)
    if not candidates:
        return _unchanged(model, base_tokenizer, report, "no domain token passed the filters (see 'rejected')")
    if cfg.max_new_tokens == 0:
        return _unchanged(model, base_tokenizer, report, "tokenizer.max_new_tokens is 0")

    tokenizer, chosen, added, stats = build_extended_tokenizer(base_tokenizer, candidates, cfg.max_new_tokens)
    report.update(stats)
    if not chosen:
        return _unchanged(model, base_tokenizer, report, "no candidate fits within tokenizer.max_new_tokens")
    final = {c.token for c in chosen}
    report["new_tokens"] = [asdict(c) for c in chosen]
    report["intermediate_tokens"] = [t for t in added if t not in final]
    report["added_vocab_entries"] = len(added)
    report["estimated_tokens_saved_on_train"] = sum(c.saving for c in chosen)

    surgery = _Surgery(tokenizer, added, texts, cfg, {"max_length": max_length, "batch_size": batch_size})
    cost = _resize_and_measure(
        model,
        base_tokenizer,
        surgery,
        list(heldout_texts),
        list(general_heldout_texts),
        report,
        eval_max_bytes,
        pad_to_multiple_of,
    )
    report.update(changed=True, reason=f"added {len(chosen)} domain tokens ({len(added)} vocabulary entries)")
    return ExtensionResult(tokenizer, model, report, render_markdown(report), new_tokens=added, initial_cost=cost)
