"""Packing (dapt_core.pack) and self-replay (dapt_core.replay): fast, offline, tokenizers trained on the fly.

Domain documents use only words starting with "d" and general documents only words starting with "g", and every
document carries one unique marker word (dmark<i> / gmark<i>), so a test can tell from token ids alone which kind a
token belongs to and where each document went.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapt_core import pack, split
from dapt_core.config import MixConfig, SelfReplayConfig
from dapt_core.pack import PackError, pack_corpus, tokenise

SEQ = 64


def _docs(kind: str, n: int, seed: int, min_words: int = 4, max_words: int = 120) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    p = kind[0]
    out = []
    for i in range(n):
        words = [f"{p}mark{i}"] + [f"{p}w{rng.randrange(300)}" for _ in range(rng.randint(min_words, max_words))]
        out.append((f"{kind}-{i:05d}", " ".join(words)))
    return out


def _write(path: Path, kind: str, docs: list[tuple[str, str]]) -> list[Path]:
    """A cleaned corpus of one Parquet part."""
    n = len(docs)
    pq.write_table(
        pa.table(
            {
                "doc_id": [d for d, _ in docs],
                "text": [t for _, t in docs],
                "source": [f"{kind}-src{i % 2}" for i in range(n)],
                "kind": [kind] * n,
                "file": [f"{kind}.jsonl"] * n,
                "position": list(range(n)),
            }
        ),
        path,
        row_group_size=97,
    )
    return [path]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pack")
    domain = _docs("domain", 400, seed=1)
    general = _docs("general", 300, seed=2)
    short_general = _docs("general", 12, seed=3, max_words=30)
    vocab = {"[UNK]": 0, "[PAD]": 1, "<eos>": 2, "<bos>": 3}
    for _, text in domain + general:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]", pad_token="[PAD]")
    tok_dir = root / "tokenizer"
    fast.save_pretrained(tok_dir)
    # a Llama-style tokenizer: its convention puts BOS in front of encoded text
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    bos_fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]", pad_token="[PAD]"
    )
    bos_dir = root / "tokenizer-bos"
    bos_fast.save_pretrained(bos_dir)
    return {
        "root": root,
        "tok_dir": tok_dir,
        "bos_dir": bos_dir,
        "vocab": vocab,
        "id2word": {i: w for w, i in vocab.items()},
        "domain_docs": dict(domain),
        "general_docs": dict(general),
        "domain": _write(root / "domain.parquet", "domain", domain),
        "general": _write(root / "general.parquet", "general", general),
        "short_general": _write(root / "short_general.parquet", "general", short_general),
    }


def _cfg(**kw) -> MixConfig:
    # general_sample_sequences=0: the tokenised-share assertions below measure what the replay share alone needs.
    base = dict(
        seq_len=SEQ,
        shard_sequences=100,
        heldout_fraction=0.05,
        max_heldout_docs=15,
        workers=1,
        seed=0,
        general_sample_sequences=0,
    )
    base.update(kw)
    return MixConfig(**base)


def _stream(result) -> tuple[np.ndarray, list[list[int]]]:
    rows = [pq.read_table(p).to_pylist() for p in result.train_shards]
    seqs = [r for shard in rows for r in shard]
    return np.array([r["input_ids"] for r in seqs], dtype=np.int64), [r["doc_lengths"] for r in seqs]


def _kinds(ids: np.ndarray, id2word: dict, eos: int) -> np.ndarray:
    """1 for general tokens, 0 for domain tokens; an EOS belongs to the document before it."""
    first = np.array([1 if id2word[i].startswith("g") else 0 for i in range(len(id2word))])
    flat = ids.reshape(-1)
    kinds = first[flat]
    for pos in np.flatnonzero(flat == eos):
        kinds[pos] = kinds[pos - 1]
    return kinds


@pytest.mark.parametrize("fraction", [0.05, 0.0])
def test_general_sample_for_ewc_is_general_text_only(corpus, tmp_path, fraction):
    """EWC's Fisher needs general text; the mixed shards do not mark it, so packing writes a general-only sample,
    also when there is no replay (EWC instead of replay)."""
    r = pack_corpus(
        corpus["domain"],
        corpus["general"],
        corpus["tok_dir"],
        _cfg(general_fraction=fraction, general_sample_sequences=7),
        tmp_path,
    )
    rows = pq.read_table(r.general_sample).to_pylist()
    ids = np.array([row["input_ids"] for row in rows], dtype=np.int64)
    assert ids.shape == (7, SEQ)
    assert _kinds(ids, corpus["id2word"], corpus["vocab"]["<eos>"]).all()
    again = pack_corpus(
        corpus["domain"],
        corpus["general"],
        corpus["tok_dir"],
        _cfg(general_fraction=fraction, general_sample_sequences=7),
        tmp_path / "again",
    )
    assert again.general_sample.read_bytes() == r.general_sample.read_bytes()


@pytest.mark.parametrize(
    "fraction,general_key", [(0.05, "general"), (0.15, "general"), (0.15, "short_general"), (0.0, "general")]
)
def test_token_share_is_exact(corpus, tmp_path, fraction, general_key):
    r = pack_corpus(corpus["domain"], corpus[general_key], corpus["tok_dir"], _cfg(general_fraction=fraction), tmp_path)
    ids, _ = _stream(r)
    assert ids.shape == (r.sequences, SEQ)
    kinds = _kinds(ids, corpus["id2word"], corpus["vocab"]["<eos>"])
    general = int(kinds.sum())
    assert general == r.tokens_by_kind["general"]
    assert general + r.tokens_by_kind["domain"] == ids.size
    realised = general / ids.size
    assert realised == pytest.approx(r.general_fraction)
    assert abs(realised - fraction) <= max(0.005 * fraction, 0.5 / ids.size)
    if fraction:
        assert abs(realised - fraction) <= 0.005 * fraction  # within 0.5% of the target
    else:
        assert general == 0 and "general-src0" not in r.tokens
    assert sum(r.tokens.values()) == ids.size
    assert 0 <= r.dropped_tokens < SEQ + 1
    assert r.report["domain"]["training_tokens_available"] == r.tokens_by_kind["domain"] + r.dropped_tokens
    if general_key == "short_general":  # repeated (upsampled) to reach the share
        assert r.report["general"]["epochs"] > 2
        assert any("repeated" in w for w in r.report["warnings"])
        assert pack.SELF_REPLAY_EVAL_WARNING not in r.report["warnings"]  # real general text
    elif fraction:  # a subset of the long general corpus, and only about that much was tokenised
        assert r.report["general"]["epochs"] is None
        assert r.report["general"]["tokenised_bytes_share"] < 0.9


def test_general_spread_through_the_stream(corpus, tmp_path):
    r = pack_corpus(corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(general_fraction=0.15), tmp_path)
    ids, _ = _stream(r)
    kinds = _kinds(ids, corpus["id2word"], corpus["vocab"]["<eos>"])
    quarters = np.array_split(kinds, 4)
    for q in quarters:  # every part of training sees replay, not all of it at the start or the end
        assert 0.07 < q.mean() < 0.25


def test_deterministic_for_a_seed_and_independent_of_workers(corpus, tmp_path, monkeypatch):
    args = (corpus["domain"], corpus["general"], corpus["tok_dir"])
    a = pack_corpus(*args, _cfg(general_fraction=0.15, seed=3), tmp_path / "a")
    b = pack_corpus(*args, _cfg(general_fraction=0.15, seed=3), tmp_path / "b")
    monkeypatch.setattr(tokenise, "INPROCESS_BYTES", 0)  # force the spawned worker pool even for this small corpus
    c = pack_corpus(*args, _cfg(general_fraction=0.15, seed=3, workers=2), tmp_path / "c")
    assert c.report["tokenization"]["mode"] == ["2 spawned workers"]
    d = pack_corpus(*args, _cfg(general_fraction=0.15, seed=4), tmp_path / "d")
    sa, sb, sc, sd = (_stream(x) for x in (a, b, c, d))
    assert len(a.train_shards) > 1
    assert np.array_equal(sa[0], sb[0]) and sa[1] == sb[1]
    assert np.array_equal(sa[0], sc[0]) and sa[1] == sc[1]
    for kind in ("domain", "general"):
        assert a.eval_files[kind].read_text() == c.eval_files[kind].read_text()
    # another seed: another held-out split and another order
    assert sa[0].shape != sd[0].shape or not np.array_equal(sa[0], sd[0])
    assert a.eval_files["domain"].read_text() != d.eval_files["domain"].read_text()


def test_heldout_documents_never_trained_on(corpus, tmp_path):
    cfg = _cfg(general_fraction=0.15)
    r = pack_corpus(corpus["domain"], corpus["general"], corpus["tok_dir"], cfg, tmp_path)
    ids, _ = _stream(r)
    present = set(np.unique(ids).tolist())
    vocab = corpus["vocab"]
    for kind, docs in (("domain", corpus["domain_docs"]), ("general", corpus["general_docs"])):
        fraction = split.heldout_fraction(len(docs), cfg.heldout_fraction, cfg.max_heldout_docs)
        expected = [t for d, t in docs.items() if split.is_heldout(d, fraction, cfg.seed)]
        lines = [json.loads(line) for line in r.eval_files[kind].read_text().splitlines()]
        assert [x["text"] for x in lines] == expected and set(lines[0]) == {"text"}
        assert 0 < len(expected) <= cfg.max_heldout_docs
        assert r.report[kind]["heldout_documents"] == len(expected)
        for text in expected:
            assert vocab[text.split()[0]] not in present  # the held-out document's unique marker never appears


def test_eos_after_every_document_and_boundaries(corpus, tmp_path):
    r = pack_corpus(corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path)
    ids, doc_lengths = _stream(r)
    vocab, eos = corpus["vocab"], corpus["vocab"]["<eos>"]
    flat = ids.reshape(-1)
    # every packed domain document appears once, exactly as its tokens followed by one EOS (no BOS: none configured)
    complete = 0
    for text in corpus["domain_docs"].values():
        doc = [vocab[w] for w in text.split()]
        where = np.flatnonzero(flat == doc[0])
        assert len(where) <= 1
        if not len(where):
            continue
        p = int(where[0])
        if p + len(doc) >= flat.size:  # the last document, cut at the end of the stream
            continue
        assert flat[p : p + len(doc)].tolist() == doc
        if flat[p + len(doc)] == eos:
            complete += 1
        else:
            assert p + len(doc) == flat.size  # only a document cut by the token budget may lack its EOS
        if p > 0:
            assert flat[p - 1] == eos  # documents start right after the previous document's EOS
    assert complete >= r.report["domain"]["training_documents"] - 2
    assert int((flat == eos).sum()) <= sum(len(x) for x in doc_lengths)
    # boundaries: pieces sum to seq_len; every EOS ends a piece; every piece but a sequence's last ends with EOS
    cuts_without_eos = 0
    for seq, lengths in zip(ids, doc_lengths):
        assert len(seq) == SEQ and sum(lengths) == SEQ and all(n > 0 for n in lengths)
        ends = np.cumsum(lengths) - 1
        assert set(np.flatnonzero(seq == eos).tolist()) <= set(ends.tolist())
        cuts_without_eos += sum(seq[e] != eos for e in ends[:-1])
    assert cuts_without_eos <= 2  # at most the two documents cut by the domain and general token budgets


def test_bos_only_when_the_tokenizer_convention_adds_it(corpus, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(corpus["bos_dir"])("dw1")["input_ids"][0] == corpus["vocab"]["<bos>"]
    r = pack_corpus(corpus["domain"], corpus["general"], corpus["bos_dir"], _cfg(general_fraction=0.05), tmp_path)
    assert "before every document" in r.report["tokenizer"]["bos"]
    flat = _stream(r)[0].reshape(-1)
    bos, eos = corpus["vocab"]["<bos>"], corpus["vocab"]["<eos>"]
    marks = np.flatnonzero(np.isin(flat, [i for w, i in corpus["vocab"].items() if "mark" in w]))
    marks = marks[marks > 0]
    assert len(marks) > 100 and (flat[marks - 1] == bos).all()  # every document starts with BOS ...
    after = flat[marks[marks > 1] - 2]  # ... right after the previous document's EOS, except after the (at most 2)
    assert (after != eos).sum() <= 2  # documents cut by the domain and general token budgets
    assert (flat == bos).sum() == len(marks)
    no_bos = pack_corpus(
        corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path / "n"
    )
    assert no_bos.report["tokenizer"]["bos"].startswith("none") and not (_stream(no_bos)[0] == bos).any()


def test_shards_load_with_datasets(corpus, tmp_path):
    import datasets

    r = pack_corpus(
        corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path / "out"
    )
    ds = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in r.train_shards], split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert len(ds) == r.sequences
    assert set(ds.column_names) == {"input_ids", "doc_lengths"}
    assert ds.features["input_ids"].feature.dtype == "int32"
    assert len(ds[0]["input_ids"]) == SEQ
    ev = datasets.load_dataset("json", data_files=str(r.eval_files["domain"]), cache_dir=str(tmp_path / "hf-cache"))
    assert list(ev) == ["train"] and ev["train"].column_names == ["text"]  # lm-eval: test_split: train


def test_clear_error_without_general_text(corpus, tmp_path):
    with pytest.raises(PackError, match=r"data\.general.*mix\.self_replay"):
        pack_corpus(corpus["domain"], [], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path)
    r = pack_corpus(corpus["domain"], [], corpus["tok_dir"], _cfg(general_fraction=0.0), tmp_path)
    assert r.tokens_by_kind["general"] == 0 and r.eval_files["general"] is None


def test_self_replay_amount_determinism_and_packing(corpus, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dapt_core.replay import sample_self_replay

    tokenizer = AutoTokenizer.from_pretrained(corpus["tok_dir"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    cfg = SelfReplayConfig(tokens=240, max_new_tokens=24, batch_size=5, temperature=1.0, top_p=0.95)

    def count(texts):
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    rng_before = torch.get_rng_state()
    a = list(sample_self_replay(model, tokenizer, cfg, seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    b = list(sample_self_replay(model, tokenizer, cfg, seed=1))
    c = list(sample_self_replay(model, tokenizer, cfg, seed=2))
    assert a == b and a != c
    assert count(a) == cfg.tokens and count(c) == cfg.tokens
    assert all(t.strip() for t in a)

    r = pack_corpus(
        corpus["domain"], [], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path, replay_texts=iter(a)
    )
    assert set(r.tokens) == {"domain-src0", "domain-src1", pack.REPLAY_SOURCE}
    assert abs(r.general_fraction - 0.05) <= 0.005 * 0.05
    assert r.report["general"]["self_replay_documents"] == len(a)
    # general held-out documents that are the base model's own samples: the report says so
    held = pack_corpus(
        corpus["domain"],
        [],
        corpus["tok_dir"],
        _cfg(general_fraction=0.05, heldout_fraction=0.4),
        tmp_path / "h",
        replay_texts=iter(a),
    )
    assert held.eval_files["general"] is not None and pack.SELF_REPLAY_EVAL_WARNING in held.warnings
    assert held.warnings == held.report["warnings"]


def test_document_separator_overrides_eos(corpus, tmp_path):
    sep = "[PAD]"  # any token of the vocabulary can separate documents
    result = pack_corpus(
        corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(document_separator=sep), tmp_path / "out"
    )
    ids, _ = _stream(result)
    assert (ids == corpus["vocab"][sep]).sum() >= result.report["domain"]["training_documents"] - 1
    assert not (ids == corpus["vocab"]["<eos>"]).any()
    with pytest.raises(PackError, match="mix.document_separator"):
        pack_corpus(
            corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(document_separator="<nope>"), tmp_path / "x"
        )


# ------------------------------------------------------------------------------------------------------ refresh
def _markers(ids: np.ndarray, id2word: dict) -> set[str]:
    return {id2word[int(i)] for i in np.unique(ids) if id2word[int(i)].startswith("dmark")}


def _heldout_markers(result) -> set[str]:
    lines = result.eval_files["domain"].read_text().splitlines()
    return {json.loads(line)["text"].split()[0] for line in lines}


def test_refresh_packs_the_new_documents_plus_the_replay_share(corpus, tmp_path):
    """Earlier corpus: 340 documents. Refresh corpus: the same 340 + 60 new. The refresh packs every new training
    document and earlier ones worth 25% of its domain tokens, with the earlier run's held-out threshold: a held-out
    cap (max_heldout_docs) that depends on the corpus size would otherwise move documents across the split."""
    docs = list(corpus["domain_docs"].items())
    earlier = _write(tmp_path / "earlier.parquet", "domain", docs[:340])
    current = earlier + _write(tmp_path / "new.parquet", "domain", docs[340:])  # a refresh adds parts
    cfg = _cfg(general_fraction=0.05)
    first = pack_corpus(earlier, corpus["general"], corpus["tok_dir"], cfg, tmp_path / "first")
    assert first.refresh is None and first.heldout_fractions["domain"] == pytest.approx(15 / 340)

    spec = pack.RefreshSpec(seen=earlier, heldout_fractions=first.heldout_fractions, domain_replay=0.25)
    r = pack_corpus(current, corpus["general"], corpus["tok_dir"], cfg, tmp_path / "refresh", refresh=spec)
    assert r.heldout_fractions == first.heldout_fractions  # not 15 / 400

    heldout_before = _heldout_markers(first)
    new_markers = {text.split()[0] for _, text in docs[340:]}
    assert _heldout_markers(r) - new_markers == heldout_before  # no earlier document moved across the split
    ids, _ = _stream(r)
    packed = _markers(ids, corpus["id2word"])
    new_training = new_markers - _heldout_markers(r)
    assert r.refresh.new_documents == len(packed & new_training) > 40
    assert len(new_training - packed) <= 1  # all packed (the last of the stream may fall in the dropped remainder)
    assert not packed & heldout_before  # never trains on an earlier held-out document
    replayed = packed - new_markers
    assert r.refresh.replayed_documents == len(replayed) < 340 / 2  # a replay share, not the whole corpus again
    share = r.refresh.replayed_tokens / (r.refresh.replayed_tokens + r.refresh.new_tokens)
    assert 0.22 < share < 0.32  # whole documents until 25%: over by at most one document
    assert r.tokens_by_kind["domain"] == r.refresh.new_tokens + r.refresh.replayed_tokens


def test_refresh_with_nothing_new_packs_nothing(corpus, tmp_path):
    first = pack_corpus(
        corpus["domain"], corpus["general"], corpus["tok_dir"], _cfg(general_fraction=0.05), tmp_path / "a"
    )
    spec = pack.RefreshSpec(seen=corpus["domain"], heldout_fractions=first.heldout_fractions, domain_replay=0.25)
    r = pack_corpus(
        corpus["domain"],
        corpus["general"],
        corpus["tok_dir"],
        _cfg(general_fraction=0.05),
        tmp_path / "b",
        refresh=spec,
    )
    assert (
        r.sequences == 0 and r.train_shards == [] and r.refresh.model_dump() == dict.fromkeys(r.refresh.model_dump(), 0)
    )
