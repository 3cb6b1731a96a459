"""The clean stage: each filter alone, dedup and decontamination end to end, accounting, determinism."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapt_core.clean import clean_corpus, quality
from dapt_core.clean.decontam import EvalNgrams, require_complete_eval_sets
from dapt_core.clean.identity import document_uid
from dapt_core.clean.minhash import (
    EMPTY,
    jaccard,
    lsh_band_keys,
    minhash_signatures,
    signature_column,
    signature_matrix,
)
from dapt_core.clean.ngrams import ngram_hashes, tokenize, words
from dapt_core.clean.normalize import normalize_text
from dapt_core.clean.pipeline import ShardJob, prepare_shard
from dapt_core.clean.quality import quality_failures, quality_reasons
from dapt_core.config import CleanConfig, NormalizeConfig, PrepareConfig, QualityConfig
from dapt_core.engine import open_engine
from dapt_core.manifest import IngestManifest, InputFile, QuarantineRecord
from tests.corpus import assert_same_clean_outputs, kept_table, write_shard

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ter",
    "san",
    "vo",
    "ru",
    "pel",
    "dis",
    "an",
    "ko",
    "tri",
    "mon",
    "se",
    "la",
    "fu",
    "ber",
    "gal",
    "ni",
    "os",
]


def prose_words(seed: int, n: int) -> list[str]:
    """Random pseudo-words (mean length ~5): text that passes every quality filter."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def prose(seed: int, n: int = 120) -> str:
    ws = prose_words(seed, n)
    sentences = [" ".join(ws[i : i + 10]).capitalize() + "." for i in range(0, n, 10)]
    return " ".join(sentences)


def decisions(out) -> list[dict]:
    return pq.read_table(out.decisions_path).to_pylist()


def by_text_id(out, text: str) -> dict:
    doc_id = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    [row] = [d for d in decisions(out) if d["doc_id"] == doc_id]
    return row


# --- normalisation ---------------------------------------------------------------------------


def test_normalize_unicode_and_whitespace():
    cfg = NormalizeConfig()
    assert normalize_text("ﬁne Ｆｕｌｌ\u00a0width", cfg) == "fine Full width"
    assert normalize_text("  a \t b  \r\nc\r\n\r\n\r\n\r\nd\u2028e  ", cfg) == "a b\nc\n\nd\ne"
    assert normalize_text("ﬁne", NormalizeConfig(unicode_form="NFC")) == "ﬁne"
    assert normalize_text("e\u0301", NormalizeConfig(unicode_form="NFC")) == "\u00e9"
    raw = "  a \t b\n\n\n\nc ﬁ "
    assert normalize_text(raw, NormalizeConfig(unicode_form="none", collapse_whitespace=False)) == raw


# --- quality heuristics ----------------------------------------------------------------------


def _lines(seed: int, n_lines: int, words_per_line: int = 12) -> list[str]:
    return [" ".join(prose_words(seed * 100 + i, words_per_line)) for i in range(n_lines)]


@functools.cache
def _failing_docs() -> dict[str, str]:
    """One document per heuristic that fails exactly that one under the default thresholds."""
    good = prose_words(1, 60)
    distinct = list(dict.fromkeys(prose_words(2, 200)))[:40]
    interleaved = [w for pair in zip(distinct, ["alpha beta"] * 40) for w in pair]
    return {
        "min_words": prose(3, 30),
        "max_words": " ".join(prose_words(4, 200_001)),
        "min_mean_word_length": " ".join("".join(random.Random(i).choices("abcdefghijklmnop", k=2)) for i in range(60)),
        "max_mean_word_length": " ".join(w * 4 for w in prose_words(5, 60)),
        "max_symbol_word_ratio": " ".join(good[:50] + [f"#{w}" for w in good[50:]]),
        "max_ellipsis_line_fraction": "\n".join(line + ("..." if i % 2 else "") for i, line in enumerate(_lines(6, 8))),
        "max_bullet_line_fraction": "\n".join(f"• {line}" for line in _lines(7, 8)),
        "min_alpha_word_fraction": " ".join(good + [str(10_000 + 37 * i) for i in range(20)]),
        "max_duplicate_line_fraction": "\n".join(_lines(8, 10) + ["Share"] * 6),
        "max_top_ngram_char_fraction": " ".join(interleaved),
        "max_duplicate_ngram_char_fraction": " ".join(prose_words(10, 30) + prose_words(11, 60) + prose_words(10, 30)),
    }


def test_good_prose_passes_every_heuristic():
    assert list(quality_failures(prose(0, 300), QualityConfig())) == []


@pytest.mark.parametrize("name", sorted(_failing_docs()))
def test_each_quality_heuristic_alone(name):
    doc = _failing_docs()[name]
    assert list(quality_failures(doc, QualityConfig())) == [f"quality:{name}"]
    assert list(quality_failures(doc, QualityConfig(**{name: None}))) == []  # None turns the check off


@pytest.mark.parametrize("chunk_words", [1 << 18, 500])
def test_batched_reasons_match_each_text_alone(monkeypatch, chunk_words):
    # The n-gram checks run on many documents at once: documents must not count each other's n-grams.
    monkeypatch.setattr(quality, "_NGRAM_CHUNK_WORDS", chunk_words)
    docs = [prose(15, 300), prose(15, 300), *_failing_docs().values(), "", "   ", prose(16, 300)]
    for cfg in [QualityConfig(), QualityConfig(min_words=None), QualityConfig(max_top_ngram_char_fraction=None)]:
        reasons = quality_reasons(docs, cfg)
        assert reasons == [next(iter(quality_failures(d, cfg)), None) for d in docs]
        assert reasons[:2] == [None, None] and reasons[-1] is None
    assert reasons[-3:-1] == ["quality:min_words"] * 2


def test_longer_duplicate_ngrams_have_lower_bounds():
    # One repeated 15-word passage covers ~12% of the characters: under the 5-gram bound (0.15),
    # over the 10-gram one (0.10), so it fails on a longer n-gram.
    passage = prose_words(13, 15)
    doc = " ".join(passage + prose_words(14, 90) + passage)
    assert list(quality_failures(doc, QualityConfig())) == ["quality:max_duplicate_ngram_char_fraction"]
    assert list(quality_failures(doc, QualityConfig(max_duplicate_ngram_char_fraction=0.2))) == []


def test_repetition_checks_only_read_a_prefix():
    repetitive = " " + " ".join(["spam eggs"] * 100_000)
    cfg = QualityConfig(max_words=None)
    assert list(quality_failures(prose(12, 200) + repetitive, cfg)) == [
        "quality:max_top_ngram_char_fraction",
        "quality:max_duplicate_ngram_char_fraction",
    ]
    assert list(quality_failures(prose(12, 20_000) + repetitive, cfg)) == []  # past the first 100k characters


# --- pipeline: filters, decontamination, dedup ------------------------------------------------


def test_quality_and_normalisation_in_pipeline(tmp_path):
    messy = "  " + prose(20).replace(" ", " \t ", 5) + "\r\n\r\n\r\n\r\nＥｎｄ  "
    shard = write_shard(tmp_path / "d.parquet", [messy, prose(21, 20)], "d")
    out = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "work")
    kept = kept_table(out.domain_parts).to_pylist()
    assert [k["text"] for k in kept] == [normalize_text(messy, NormalizeConfig())]
    assert kept[0]["text"].endswith(".\n\nEnd")
    assert set(kept[0]) == {"doc_id", "text", "source", "kind", "file", "position"}
    assert by_text_id(out, prose(21, 20))["reason"] == "quality:min_words"
    assert out.general_parts == []


def test_scratch_holds_text_of_filter_survivors_only(tmp_path):
    contaminated, short, kept = f"{prose(22)} {prose(23)}", prose(24, 20), prose(25)
    shard = write_shard(tmp_path / "d.parquet", [contaminated, short, kept], "d")
    evals = EvalNgrams(ngram_hashes(tokenize([prose(23)]), 13, short_docs=False)[0], 13)
    np.save(tmp_path / "evals.npy", evals.hashes)
    job = ShardJob(shard, CleanConfig(), tmp_path / "evals.npy", tmp_path / "part")
    prepare_shard(job)
    rows = pq.read_table(job.output("docs"), columns=["text", "filter_reason", "words"]).to_pylist()
    assert [(r["text"], r["filter_reason"]) for r in rows] == [
        (None, "decontaminated"),
        (None, "quality:min_words"),
        (kept, None),
    ]
    assert [r["words"] for r in rows] == [None, None, len(kept.split())]


def test_exact_duplicates_across_sources_keep_domain(tmp_path):
    text = prose(30)
    general = write_shard(tmp_path / "g.parquet", [text + "   ", prose(31)], "web", kind="general")
    domain = write_shard(tmp_path / "d.parquet", [prose(32), text], "papers")
    out = clean_corpus([general, domain], [], [], CleanConfig(), tmp_path / "work")  # general listed first
    kept, dup = by_text_id(out, text), by_text_id(out, text + "   ")
    assert (kept["status"], kept["source"]) == ("kept", "papers")
    assert (dup["status"], dup["reason"], dup["duplicate_of"]) == ("dropped", "exact_duplicate", kept["doc_uid"])
    assert dup["cluster_id"] == kept["cluster_id"] is not None
    assert out.dropped == {"exact_duplicate": 1}
    assert kept_table(out.general_parts).num_rows == 1


def test_near_duplicates_dropped_and_unrelated_kept(tmp_path):
    base = prose_words(40, 300)
    edited = list(base)
    for i in (50, 150, 250):
        edited[i] = "quartz"
    original, near, copy_of_near, unrelated = " ".join(base), " ".join(edited), " ".join(edited) + "\n", prose(41, 300)
    shard = write_shard(tmp_path / "d.parquet", [original, near, copy_of_near, unrelated], "d")
    out = clean_corpus([shard], [], [], CleanConfig(), tmp_path / "work")
    original, near, copy_of_near, unrelated = (by_text_id(out, t) for t in (original, near, copy_of_near, unrelated))
    assert original["status"] == "kept" and unrelated["status"] == "kept"
    assert (near["reason"], near["duplicate_of"]) == ("near_duplicate", original["doc_uid"])
    assert (copy_of_near["reason"], copy_of_near["duplicate_of"]) == ("exact_duplicate", near["doc_uid"])
    assert near["cluster_id"] == copy_of_near["cluster_id"] == original["cluster_id"] is not None  # one cluster
    assert unrelated["cluster_id"] is None
    assert (out.stats["total"]["duplicate_clusters"], out.stats["total"]["docs_in_duplicate_clusters"]) == (1, 3)


def test_every_input_document_has_its_own_id_and_duplicates_name_the_kept_copy(tmp_path):
    """Exact copies share a content hash (doc_id) but not a doc_uid: the decisions say which copy was kept."""
    texts = [prose(60), prose(61), prose(62)]
    first = write_shard(tmp_path / "a.parquet", [texts[0], texts[1], texts[0]], "papers")
    second = write_shard(tmp_path / "b.parquet", [texts[0], texts[2], texts[1]], "papers")
    web = write_shard(tmp_path / "w.parquet", [texts[2]], "web", kind="general")
    bad = QuarantineRecord(file="c.txt", source="papers", position="file", reason="empty_file")
    out = clean_corpus([first, second, web], [], [bad], CleanConfig(), tmp_path / "work")
    rows = decisions(out)
    uids = [r["doc_uid"] for r in rows]
    assert len(set(uids)) == len(rows) == 8
    by_uid = {r["doc_uid"]: r for r in rows}
    dropped = [r for r in rows if r["reason"] == "exact_duplicate"]
    assert len(dropped) == 4
    for dup in dropped:
        kept = by_uid[dup["duplicate_of"]]
        assert kept["status"] == "kept" and kept["doc_id"] == dup["doc_id"] and kept["doc_uid"] != dup["doc_uid"]
        assert (kept["kind"], kept["source"], kept["file"]) <= (
            dup["kind"],
            dup["source"],
            dup["file"],
        )  # first by priority
    assert by_uid[document_uid("domain", "papers", "a.txt", "line 3")]["duplicate_of"] == document_uid(
        "domain", "papers", "a.txt", "line 1"
    )
    assert by_uid[document_uid("domain", "papers", "c.txt", "file")]["reason"] == "quarantine:empty_file"
    for source in ("papers", "web"):
        mine = [r for r in rows if r["source"] == source]
        [stats] = [s for s in out.sources if s.source == source]
        assert stats.input_docs == len(mine) == stats.kept_docs + sum(stats.dropped.values())


def test_dedup_can_be_switched_off(tmp_path):
    text = prose(42)
    shard = write_shard(tmp_path / "d.parquet", [text, text + " ", prose(43)], "d")
    cfg = CleanConfig.model_validate({"dedup": {"exact": False, "near": False}})
    out = clean_corpus([shard], [], [], cfg, tmp_path / "work")
    assert out.kept_docs == 3 and out.dropped == {}


def test_decontamination_13_grams(tmp_path):
    eval_words = prose_words(50, 40)
    eval_shard = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"text": [" ".join(eval_words)]}), eval_shard)
    leaked = " ".join(w.upper() + "," for w in eval_words[10:23])  # 13 words; case and punctuation differ
    near_miss = " ".join(eval_words[10:22])  # 12 words
    contaminated = f"{prose(51)} quartz {leaked} quartz {prose(52)}"
    clean = f"{prose(53)} quartz {near_miss} quartz {prose(54)}"
    shard = write_shard(tmp_path / "d.parquet", [contaminated, clean], "d")
    out = clean_corpus([shard], [eval_shard], [], CleanConfig(), tmp_path / "work")
    assert by_text_id(out, contaminated)["reason"] == "decontaminated"
    assert by_text_id(out, clean)["status"] == "kept"
    assert out.input_docs == 2  # the eval text is not a training document


def test_decontamination_ignores_ngrams_without_letters(tmp_path):
    numbers = " ".join(str(1000 + 7 * i) for i in range(20))  # a table row: no letter in any 13 words
    eval_words = prose_words(55, 30)
    eval_shard = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"text": [f"{numbers} {' '.join(eval_words)} 42 43 44"]}), eval_shard)
    same_numbers = f"{prose(56)} {numbers} {prose(57)}"
    numbers_and_a_word = f"{prose(58)} {' '.join(numbers.split()[-12:])} {eval_words[0]} {prose(59)}"
    tail = f"{prose(60)} {' '.join(eval_words[-10:])} 42 43 44 {prose(61)}"  # 13 words, letters in 10 of them
    shard = write_shard(tmp_path / "d.parquet", [same_numbers, numbers_and_a_word, tail], "d")
    out = clean_corpus([shard], [eval_shard], [], CleanConfig(), tmp_path / "work")
    assert by_text_id(out, same_numbers)["status"] == "kept"
    assert by_text_id(out, numbers_and_a_word)["reason"] == "decontaminated"
    assert by_text_id(out, tail)["reason"] == "decontaminated"


# --- accounting, stats, determinism ------------------------------------------------------------


def _mixed_corpus(tmp_path: Path) -> tuple[list[Path], list[Path], list[QuarantineRecord]]:
    dup = prose(60)
    domain = [prose(61), dup, dup, prose(62, 10), prose(63), "", prose(64) + " " + "ok " * 5]
    general = [dup + " ", prose(65), prose(66, 20), prose(67)]
    eval_shard = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"text": [prose(63)]}), eval_shard)
    shards = [
        write_shard(tmp_path / "d.parquet", domain, "papers"),
        write_shard(tmp_path / "g.parquet", general, "web", "general"),
    ]
    quarantined = [
        QuarantineRecord(
            file="bad.jsonl",
            source="papers",
            kind="domain",
            position="line 3",
            reason="malformed_json",
            detail="Expecting ',' delimiter: line 1 column 9 (char 8)",
        ),
        QuarantineRecord(
            file="bad.jsonl",
            source="papers",
            kind="domain",
            position="line 10",
            reason="malformed_json",
            detail="Unterminated string | starting at: line 1 column 2",
        ),
        QuarantineRecord(file="x.gz", source="web", kind="general", position="byte 10", reason="truncated_gzip"),
        QuarantineRecord(file="q.jsonl", source="bench", kind="eval", position="line 1", reason="malformed_json"),
    ]
    return shards, [eval_shard], quarantined


def test_quarantine_and_accounting(tmp_path):
    shards, evals, quarantined = _mixed_corpus(tmp_path)
    out = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "work")
    rows = decisions(out)
    assert out.input_docs == len(rows) == 7 + 4 + 3  # eval quarantine is not a training document
    assert out.input_docs == out.kept_docs + sum(out.dropped.values())
    assert out.dropped["quarantine:malformed_json"] == 2 and out.dropped["quarantine:truncated_gzip"] == 1
    assert out.dropped["decontaminated"] == 1 and out.dropped["exact_duplicate"] == 2
    assert sum(r["status"] == "kept" for r in rows) == out.kept_docs
    for s in out.sources:
        assert s.input_docs == s.kept_docs + sum(s.dropped.values())
        mine = [r for r in rows if r["source"] == s.source]
        assert s.input_docs == len(mine) and s.kept_docs == sum(r["status"] == "kept" for r in mine)
        assert s.kept_est_tokens == s.kept_bytes // 4
    assert {(s.source, s.kind) for s in out.sources} == {("papers", "domain"), ("web", "general")}
    assert all((r["reason"] is None) == (r["status"] == "kept") for r in rows)
    kept_ids = {r["doc_id"] for r in rows if r["status"] == "kept"}
    written = (
        kept_table(out.domain_parts).column("doc_id").to_pylist()
        + kept_table(out.general_parts).column("doc_id").to_pylist()
    )
    assert set(written) == kept_ids and len(written) == out.kept_docs


def test_stats_content_and_markdown(tmp_path):
    shards, evals, quarantined = _mixed_corpus(tmp_path)
    out = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "work")
    [papers] = [s for s in out.stats["sources"] if s["source"] == "papers"]
    kept = [r for r in kept_table(out.domain_parts).to_pylist()]
    lengths = sorted(len(r["text"].split()) for r in kept)
    assert papers["kept_bytes"] == sum(len(r["text"].encode()) for r in kept)
    assert (papers["kept_words"]["min"], papers["kept_words"]["max"]) == (lengths[0], lengths[-1])
    assert (
        papers["docs_in_duplicate_clusters"] == 2 and papers["duplicate_clusters"] == 1
    )  # its copy in web counts there
    md = out.stats_markdown
    json.dumps(out.stats)  # JSON-serialisable
    assert "UTF-8 bytes / 4" in md and "| papers | domain |" in md and "quarantine:truncated_gzip" in md


def test_quarantine_details_reach_decisions_stats_and_report(tmp_path):
    """Not only a reason code: where and what was wrong (the JSON error, a symlink's target) for each input."""
    shards, evals, quarantined = _mixed_corpus(tmp_path)
    out = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "work")
    training = quarantined[:3]  # the eval set's quarantine is not a training input
    assert out.quarantined == training
    by_position = {
        (r["file"], r["position"]): r for r in decisions(out) if (r["reason"] or "").startswith("quarantine:")
    }
    assert {k: r["detail"] for k, r in by_position.items()} == {(q.file, q.position): q.detail for q in training}
    assert all(r["detail"] is None for r in decisions(out) if not (r["reason"] or "").startswith("quarantine:"))
    listed = [(q["file"], q["position"], q["reason"], q["detail"]) for q in out.stats["quarantined"]]
    assert listed == [(q.file, q.position, q.reason, q.detail) for q in training]  # domain first, line 3 before line 10
    md = out.stats_markdown
    assert "| papers | bad.jsonl | line 3 | malformed_json | Expecting ',' delimiter: line 1 column 9 (char 8) |" in md
    assert "Unterminated string \\| starting at" in md  # a '|' in a detail cannot break the table
    assert "| web | x.gz | byte 10 | truncated_gzip |  |" in md


def test_two_runs_give_identical_outputs(tmp_path):
    shards, evals, quarantined = _mixed_corpus(tmp_path)
    first = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "one")
    second = clean_corpus(shards, evals, quarantined, CleanConfig(), tmp_path / "two")
    assert_same_clean_outputs(first, second)
    assert first.stats_markdown == second.stats_markdown
    assert not (tmp_path / "one" / "clean-scratch").exists()


def test_eval_kind_rows_are_refused_as_training(tmp_path):
    shard = write_shard(tmp_path / "e.parquet", [prose(70)], "bench", kind="eval")
    with pytest.raises(ValueError, match="domain/general"):
        clean_corpus([shard], [], [], CleanConfig(), tmp_path / "work")


# --- MinHash -----------------------------------------------------------------------------------


def _shingles(text: str, k: int = 5) -> set[bytes]:
    ws = words(text)
    return {b" ".join(ws[i : i + k]) for i in range(len(ws) - k + 1)}


def test_minhash_estimates_agree_with_datasketch():
    from datasketch import MinHash

    base = prose_words(80, 400)
    pairs = []
    for keep in (50, 200, 330, 390):  # the second doc shares the first `keep` words, then diverges
        pairs.append((" ".join(base), " ".join(base[:keep] + prose_words(81 + keep, 400 - keep))))
    texts = [t for pair in pairs for t in pair]
    sig = minhash_signatures(tokenize(texts), shingle_size=5, num_perm=256, seed=1)
    for i, (a, b) in enumerate(pairs):
        truth = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
        sketches = []
        for t in (a, b):
            m = MinHash(num_perm=256, seed=1)
            m.update_batch(list(_shingles(t)))
            sketches.append(m)
        assert abs(float(jaccard(sig[2 * i], sig[2 * i + 1])) - truth) < 0.1
        assert abs(sketches[0].jaccard(sketches[1]) - truth) < 0.1


def test_minhash_edge_cases_and_bands():
    sig = minhash_signatures(
        tokenize(["", "!!!", "two words", "Two, WORDS!", prose(90)]), shingle_size=5, num_perm=64, seed=3
    )
    assert sig.shape == (5, 64) and sig.dtype == np.uint32
    assert (sig[0] == EMPTY).all() and (sig[1] == EMPTY).all()
    assert not (sig[2] == EMPTY).all() and (sig[2] == sig[3]).all()  # one shingle of all words; case/punct-blind
    keys = lsh_band_keys(sig, bands=8, rows=8)
    assert keys.shape == (5, 8) and (keys[2] == keys[3]).all() and not (keys[2] == keys[4]).any()
    with pytest.raises(ValueError):
        lsh_band_keys(sig, bands=9, rows=8)


def test_signatures_read_back_from_parquet_as_written(tmp_path):
    sig = minhash_signatures(tokenize([prose(i) for i in range(7)]), shingle_size=5, num_perm=32, seed=3)
    pq.write_table(pa.table({"sig": signature_column(sig)}), tmp_path / "s.parquet", row_group_size=3)
    column = pq.read_table(tmp_path / "s.parquet").column("sig")
    assert column.num_chunks == 3 and (signature_matrix(column, 32) == sig).all()
    assert (signature_matrix(column.combine_chunks()[2:5], 32) == sig[2:5]).all()  # an array with an offset
    assert (signature_matrix(column.filter(np.isin(range(7), [1, 6])), 32) == sig[[1, 6]]).all()
    assert signature_matrix(column.slice(0, 0), 32).shape == (0, 32)
    with pytest.raises(ValueError, match="256-byte"):
        signature_matrix(column, 32 * 2)  # read with another num_perm
    with pytest.raises(ValueError, match="no nulls"):
        signature_matrix(pa.array([None], pa.binary(128)), 32)


def test_minhash_is_deterministic_across_processes():
    texts = [prose(i) for i in range(3)]
    here = minhash_signatures(tokenize(texts), 5, 32, 7)
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_clean import prose; from dapt_core.clean.minhash import minhash_signatures;"
        "from dapt_core.clean.ngrams import tokenize;"
        "sys.stdout.write(minhash_signatures(tokenize([prose(i) for i in range(3)]), 5, 32, 7).tobytes().hex())"
    )
    root = str(Path(__file__).resolve().parents[1])
    other = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert bytes.fromhex(other.stdout) == here.tobytes()


def test_eval_sets_must_read_completely_at_discovery_and_after_ingest(tmp_path):

    require_complete_eval_sets([QuarantineRecord(file="d.bin", kind="domain", position="file", reason="unsupported")])
    refused = [QuarantineRecord(file="eval.bin", kind="eval", position="file", reason="unsupported_format")]
    with pytest.raises(ValueError, match=r"data\.eval: .*eval\.bin: unsupported_format"):
        require_complete_eval_sets(refused)

    def ingested(name: str, docs: int, quarantined: list[QuarantineRecord]) -> IngestManifest:
        inp = InputFile(uri=name, source="ev", kind="eval", fingerprint="0" * 64, bytes=10)
        return IngestManifest(input=inp, shard=None, docs=docs, quarantined=quarantined, code_version="test")

    bad_line = QuarantineRecord(file="b.jsonl", kind="eval", position="line 3", reason="missing_field")
    complete, empty, partial = (
        ingested("a.jsonl", 5, []),
        ingested("e.jsonl", 0, []),
        ingested("b.jsonl", 4, [bad_line]),
    )
    require_complete_eval_sets([], [complete])
    with pytest.raises(ValueError, match="text_field") as e:
        require_complete_eval_sets([], [complete, empty, partial])
    assert "e.jsonl: 0 documents read" in str(e.value) and "missing_field at line 3" in str(e.value)
    assert "a.jsonl" not in str(e.value)


def test_local_engine_imports_no_ray(monkeypatch):
    """The default engine runs without Ray installed; the Ray engine says what is missing when it has no cluster."""
    code = (
        "import sys; import dapt.flows.prepare, dapt_core.clean; from dapt_core.engine "
        "import open_engine; from dapt_core.config import PrepareConfig; "
        "open_engine(PrepareConfig()); assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="prepare.ray_address"):
        open_engine(PrepareConfig(engine="ray"))
