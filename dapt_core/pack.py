"""Mixed-corpus packing: held-out eval splits, tokenisation, a token-exact domain/general mix, fixed-length sequences.

`pack_corpus` turns the cleaned domain and general corpora (Parquet: doc_id, text, source, kind, file, position)
into training shards and evaluation files:

1. **Held-out split by document, before anything is packed.** Per kind, a document is held out when
   `split.is_heldout(doc_id, split.heldout_fraction(n_rows_of_kind, cfg.heldout_fraction, cfg.max_heldout_docs),
   cfg.seed)`: the same rule the tokenizer stage uses, so neither trains on the evaluation documents. `n_rows_of_kind`
   counts every row of that kind's corpus (self-replay texts count as general rows). Held-out documents are written
   to `eval/domain.jsonl` and `eval/general.jsonl` (`{"text": ...}` per line) and are never tokenised for training.
   For lm-eval, a `data_files` string makes these the `train` split of the local dataset: use `test_split: train`.
   General held-out text is written even when `general_fraction` is 0 (forgetting is still measured on it).
2. **Tokenisation.** Every document is `[BOS] ids EOS`: EOS (the tokenizer's `eos_token`) after every document; BOS
   only when the tokenizer's own convention puts it in front of encoded text (`tokenizer("x")` starts with
   `bos_token_id`, as with Llama 2/3); GPT-2/SmolLM/Qwen style tokenizers get no BOS. Text is encoded with the fast
   tokenizer's Rust backend (`AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer`, added tokens included,
   `add_special_tokens=False`). Token ids stream to a flat int32 file on disk (with per-document offsets) that packing
   reads back through a memmap, never to Python lists of the whole corpus: memory is O(documents) plus a batch
   (measured: peak RSS 494 MB for 2.5M tokens, 553 MB for 9.0M; the growth is mapped, reclaimable pages of the token
   file; most of the rest is transformers, imported to load the tokenizer).
3. **Parallelism (measured with `bench/pack.py` and A/B runs on the 2-core development machine).** Whole
   `pack_corpus` calls on the bench's 11 MB of real text with the SmolLM2 tokenizer (2.53M tokens tokenised),
   tokens/s per design. "final": this code, 9 interleaved rounds (the machine is shared, so best and median);
   "busy": an earlier revision (same structure, `encode_batch`) while other jobs held the load average at 3.5-4.4:

   | design | final: best | final: median | busy: range |
   | --- | --- | --- | --- |
   | `workers=1`: in-process, Rust `encode_batch_fast` thread pool (2 threads) | 0.96 M | 0.82 M | 0.18-0.24 M |
   | `workers=2`: 2 spawned processes, 1 Rust thread each | 1.00 M | 0.89 M | 0.25-0.43 M |
   | reference: raw `encode_batch` in-process, lengths only, no packing | 1.08 M | 1.02 M | 0.22-0.32 M |

   The processes are ahead (by ~4-9% quiet, more when the machine is busy: they get a fairer share of a contended
   CPU). Pure tokenisation scales only 1.5-1.9x on the Rust thread pool here (0.59 M tokens/s on 1 thread, 0.88-1.12
   M on 2), and in-process everything else (Parquet reads, ids to numpy, hashing, writing) runs while the Rust
   threads wait; with worker processes it overlaps with encoding. So `workers > 1` (the default 0 = one per CPU core) means
   that many **spawned** processes (never fork: the parent may already run Rust/torch threads, and
   fork-after-threads can deadlock), each with `TOKENIZERS_PARALLELISM=false`. They are started first thing, so
   their start-up overlaps the tokenizer load; the parent reads Parquet, decides the held-out split, ships text
   batches (~256 KB) and writes the returned ids in submission order (the output never depends on the worker
   count), with at most 2 batches per worker in flight (bounded memory). Workers call `encode_batch_fast` (no
   character offsets: ~12% faster than `encode_batch` on one thread, same ids). Passes under 1 MB of text, and
   `workers=1`, run in-process on the Rust thread pool: starting processes would cost more than it saves. Spawned
   workers re-import the caller's `__main__` (Python's spawn rule: scripts need the `if __name__ == "__main__":`
   guard, and a main module that imports transformers at the top adds ~2 s to each worker's start, once per call);
   if the pool cannot start or breaks, packing tokenises in-process instead and reports it in `report["warnings"]`.
4. **Mix by token share, token-exact.** With D domain training tokens and target share f, the training stream has
   T = floor(D / (1 - f) / seq_len) * seq_len tokens: G = round(f * T) general and T - G domain tokens, so the
   realised share is within 0.5 / T of f (absolute; that is within 0.5% of f once T >= 100 / f tokens). The domain
   document that crosses T - G is cut, and the domain tokens after it (< seq_len + 1, i.e. the final partial
   sequence) are dropped and reported as `dropped_tokens`. The (at most two) documents cut by a budget end without
   their EOS; `doc_lengths` still marks where they end. General documents are taken in a seeded shuffled order
   until G tokens (the last one cut): when the general corpus is long, that is a deterministic random subset, and
   only about that much general text is tokenised at all (the shuffle is by a hash of (seed, doc_id), so a prefix of
   it can be chosen from byte counts before tokenising); when it is short, it is repeated, every further epoch in a
   new seeded permutation. f = 0 packs no general tokens. f > 0 without general text or replay texts is an error.
5. **Interleaving and packing.** Domain documents are in a seeded shuffled order (hash of seed and doc_id, so the
   order does not depend on row order); general documents are spread evenly through the stream (each document is
   placed at the relative position of its midpoint within its own kind), so any window of training sees about f
   general tokens. The stream is cut into `seq_len` sequences (a document may span sequences). Every sequence
   carries `doc_lengths`: the lengths of the document pieces in it, summing to seq_len, so training can build
   position ids that restart per document or a block-diagonal attention mask.
6. **Output.** `train/train-00000.parquet`, ... with `cfg.shard_sequences` rows each: `input_ids` list<int32>,
   `doc_lengths` list<int32>; `datasets.load_dataset("parquet", data_files=[...])` reads them directly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from dapt_core import split
from dapt_core.manifest import RefreshCounts
from dapt_core.model import adds_bos

SELF_REPLAY_EVAL_WARNING = (
    "no data.general: the general held-out set is the base model's own samples (mix.self_replay), so general "
    "bits-per-byte and perplexity measure drift from the base model's own distribution, not general knowledge; "
    "add data.general text for a real forgetting signal"
)

if TYPE_CHECKING:
    from dapt_core.config import MixConfig

# pyarrow and transformers are imported inside the functions that use them: tokenizer worker processes import this
# module and need only numpy and tokenizers (a spawned worker starts in ~0.1 s instead of ~0.3 s).

KINDS = ("domain", "general")
REPLAY_SOURCE = "self-replay"
BATCH_BYTES = 256 * 1024  # text per tokenizer task
BATCH_DOCS = 2048
INPROCESS_BYTES = 1 << 20  # passes smaller than this are tokenised in-process


class PackError(ValueError):
    """Packing cannot produce what the config asks for; the message says what to change."""


@dataclass
class PackResult:
    train_shards: list[Path]
    eval_files: dict[str, Path | None]  # "domain" / "general" -> eval jsonl ({"text": ...}), None when no doc held out
    tokens: dict[str, int]  # training tokens per source, in the packed sequences (after subsetting/upsampling)
    tokens_by_kind: dict[str, int]  # training tokens per kind ("domain", "general"), in the packed sequences
    general_fraction: float  # realised: general tokens / training tokens
    general_fraction_target: float
    sequences: int
    seq_len: int
    dropped_tokens: int  # domain tokens of the final partial sequence, not packed
    general_sample: Path | None = None  # up to mix.general_sample_sequences general training sequences (EWC Fisher)
    heldout_fractions: dict[str, float] = field(default_factory=dict)  # per kind: the held-out threshold used
    refresh: RefreshCounts | None = None  # a refresh: new vs replayed domain documents and tokens
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RefreshSpec:
    """A refresh packs what is new, not the whole corpus again: the domain documents absent from `seen` (the cleaned
    domain corpus of the lineage's last success) plus `domain_replay` of the domain tokens from earlier documents
    (key order, so the replayed ones rotate with the seed only), with the lineage's held-out thresholds, so that no
    document ever moves between training and held-out."""

    seen: Path
    heldout_fractions: dict[str, float]
    domain_replay: float




# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class _TokSpec:
    tokenizer_file: str  # the fast tokenizer's backend, serialised (a small path, not the JSON, crosses to workers)
    bos: int | None  # prepended to every document when not None
    eos: int


def _token_spec(tokenizer_dir: Path, tmp: Path, separator: str | None) -> tuple[_TokSpec, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise PackError(f"{tokenizer_dir}: a fast tokenizer (tokenizer.json) is required for packing")
    if separator is not None:
        if separator not in tok.get_vocab():  # (not `== unk_token_id`: GGUF tokenizers map unk to <|endoftext|>)
            raise PackError(f"mix.document_separator: {separator!r} is not a token of the tokenizer in {tokenizer_dir}")
        tok.eos_token = separator
    if tok.eos_token_id is None:
        raise PackError(f"{tokenizer_dir}: the tokenizer has no eos_token; set mix.document_separator to separate documents")
    bos = tok.bos_token_id
    add_bos = adds_bos(tok)
    info = {
        "eos_token": tok.eos_token,
        "eos_id": int(tok.eos_token_id),
        "bos": f"{tok.bos_token} ({bos}) before every document: the tokenizer adds it to encoded text"
        if add_bos
        else "none: the tokenizer does not add BOS to encoded text",
        "vocab_size": len(tok),
    }
    path = tmp / "tokenizer.json"
    path.write_text(backend.to_str(), encoding="utf-8")
    return _TokSpec(str(path), int(bos) if add_bos else None, int(tok.eos_token_id)), info


_worker_toks: dict = {}  # tokenizer file -> Tokenizer, in a spawned worker process


def _init_worker() -> None:
    """Runs first in every spawned worker: one Rust thread per process, imports done before the first batch."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers  # noqa: F401


def _warm() -> int:
    return os.getpid()


def _encode_in_worker(spec: _TokSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = _worker_toks.get(spec.tokenizer_file)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _worker_toks[spec.tokenizer_file] = Tokenizer.from_file(spec.tokenizer_file)
    return _encode(tok, spec, texts)


def _encode(tok, spec: _TokSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(per-document lengths incl. BOS/EOS, int32 ids of all documents back to back).

    `encode_batch_fast` (tokenizers >= 0.21) skips character offsets, which packing does not need: ~12% faster than
    `encode_batch` on one thread here (0.70-0.75 vs 0.62-0.65 M tokens/s), same ids."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encs = encode(texts, add_special_tokens=False)
    flat: list[int] = []
    lens = np.empty(len(encs), dtype=np.int64)
    for k, e in enumerate(encs):
        ids = e.ids
        lens[k] = len(ids)
        flat.extend(ids)
    ids = np.array(flat, dtype=np.int32)
    ends = np.cumsum(lens)
    ids = np.insert(ids, ends, spec.eos)
    extra = 1
    if spec.bos is not None:
        ids = np.insert(ids, np.concatenate([[0], ends[:-1]]) + np.arange(len(lens)), spec.bos)
        extra = 2
    return (lens + extra).astype(np.int32), ids


class _Encoder:
    """Encodes text batches in order, in-process or on a pool of spawned single-threaded workers started once.

    If the pool breaks (a worker cannot start, e.g. `python - < script.py`, whose `__main__` spawn cannot re-import,
    or a worker is killed), the batches are encoded in-process instead and the report says so. The spawn payload is
    kept small (the tokenizer travels as a file path): CPython blocks forever writing a payload larger than a pipe
    buffer to a child that died before reading it.
    """

    def __init__(self, workers: int, start_pool: bool):
        self.spec: _TokSpec | None = None  # set once the tokenizer is loaded (the pool starts before, in parallel)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.tok = None  # in-process tokenizer (Rust thread pool)
        self.mode_used: set[str] = set()
        self.broken: str | None = None
        if start_pool and workers > 1:
            self._start_pool()

    def _start_pool(self) -> None:
        self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
        for _ in range(self.workers):  # spawn every worker now, so its start overlaps the parent's own start-up
            self._submit_raw(_warm)

    def _submit_raw(self, fn, *args):
        try:
            return self.pool.submit(fn, *args)
        except BrokenExecutor as e:
            self._break(e)
            return None

    def _local(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.tok is None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(self.spec.tokenizer_file)
        return _encode(self.tok, self.spec, texts)

    def _submit(self, texts: list[str]):
        return None if self.broken else self._submit_raw(_encode_in_worker, self.spec, texts)

    def _result(self, texts: list[str], fut) -> tuple[np.ndarray, np.ndarray]:
        if fut is not None:
            try:
                return fut.result()
            except BrokenExecutor as e:
                self._break(e)
        self.mode_used.add("in-process")
        return self._local(texts)

    def _break(self, e: Exception) -> None:
        if self.broken is None:
            self.broken = f"tokenizer worker pool failed ({type(e).__name__}: {e}); tokenised in-process instead"
            self.pool.shutdown(wait=False, cancel_futures=True)

    def map(self, batches: Iterable, approx_bytes: int) -> Iterator:
        """batches: (meta, texts) pairs; yields (meta, lengths, ids) in the same order."""
        if self.workers <= 1 or approx_bytes < INPROCESS_BYTES or self.broken:
            self.mode_used.add("in-process")
            for meta, texts in batches:
                yield (meta, *self._local(texts))
            return
        if self.pool is None:
            self._start_pool()
        self.mode_used.add(f"{self.workers} spawned workers")
        pending: deque = deque()
        for meta, texts in batches:
            pending.append((meta, texts, self._submit(texts)))
            if len(pending) >= 2 * self.workers:
                m, t, fut = pending.popleft()
                yield (m, *self._result(t, fut))
        while pending:
            m, t, fut = pending.popleft()
            yield (m, *self._result(t, fut))

    def close(self) -> None:
        if self.pool is not None:
            # Workers exit in the background: waiting for their interpreters to tear down cost ~0.4 s per call.
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------- documents


@dataclass
class _Docs:
    """One kind's documents, O(documents) memory: one entry per row of the kind's Parquet files, in file order."""

    key: np.ndarray  # uint64 shuffle key: xxh64(seed:order:doc_id)
    nbytes: np.ndarray  # int64 UTF-8 bytes of the text
    source: np.ndarray  # int32 index into sources
    train: np.ndarray  # bool: not held out and not empty
    tok_off: np.ndarray  # int64 offset in the token file (-1: not tokenised)
    tok_len: np.ndarray  # int32 tokens incl. BOS/EOS
    new: np.ndarray  # bool: not in the refresh's earlier corpus (all True outside a refresh)
    sources: list[str]
    heldout: int
    fraction: float


BATCH_READ_BYTES = 16 << 20  # text per Parquet read batch (rows per batch follow from the file's mean row size)


def _batches(path: Path) -> Iterator[tuple[int, list[str], object, np.ndarray, np.ndarray, list]]:
    """(first row, doc ids, text column (Arrow), UTF-8 bytes per text, has-text mask, sources) per Parquet batch.

    Texts stay in Arrow until a caller needs them as Python strings (a general corpus is mostly only measured)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    cols = ["doc_id", "text"] + (["source"] if "source" in names else [])
    mean_bytes = _text_bytes([path]) / max(1, pf.metadata.num_rows)
    batch_rows = int(min(4096, max(16, BATCH_READ_BYTES // max(mean_bytes, 1))))
    row = 0
    for b in pf.iter_batches(columns=cols, batch_size=batch_rows):
        n = b.num_rows
        ids = [str(x) for x in b.column("doc_id").to_pylist()]
        text = b.column("text")
        nbytes = pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        has_text = pc.fill_null(pc.match_substring_regex(text, r"\S"), False).to_numpy(zero_copy_only=False)
        sources = b.column("source").to_pylist() if "source" in cols else [path.stem] * n
        yield row, ids, text, nbytes, has_text, sources
        row += n


def _n_rows(paths: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _text_bytes(paths: list[Path]) -> int:
    """Uncompressed size of the text column, from Parquet metadata (an estimate for choosing in-process work)."""
    import pyarrow.parquet as pq

    total = 0
    for p in paths:
        md = pq.ParquetFile(p).metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                if g.column(c).path_in_schema == "text":
                    total += g.column(c).total_uncompressed_size
    return total


def _scan(
    paths: list[Path],
    kind: str,
    cfg: MixConfig,
    eval_path: Path,
    encoder: _Encoder | None,
    tokens_out,
    tok_pos: list[int],
    fraction: float | None = None,
    seen: set[str] | None = None,
) -> _Docs:
    """Read a kind's rows once: held-out decision, eval file, shuffle keys, sizes; tokenise training rows if `encoder`
    (only the new ones when `seen` holds the ids of an earlier corpus). `fraction`: a fixed held-out threshold."""
    n = _n_rows(paths)
    if fraction is None:
        fraction = split.heldout_fraction(n, cfg.heldout_fraction, cfg.max_heldout_docs)
    seed = cfg.seed
    key = np.empty(n, np.uint64)
    nbytes = np.zeros(n, np.int64)
    source = np.empty(n, np.int32)
    train = np.zeros(n, bool)
    tok_off = np.full(n, -1, np.int64)
    tok_len = np.zeros(n, np.int32)
    new = np.ones(n, bool)
    sources: dict[str, int] = {}
    heldout = 0
    out = open(eval_path, "w", encoding="utf-8")

    def rows() -> Iterator[tuple[int, str, int]]:
        nonlocal heldout
        i = 0
        for path in paths:
            for _, ids, text_col, sizes, has_text, srcs in _batches(path):
                texts = text_col.to_pylist() if encoder is not None else None
                for j, (doc_id, b, nonblank, src) in enumerate(zip(ids, sizes.tolist(), has_text.tolist(), srcs)):
                    key[i] = xxhash.xxh64_intdigest(f"{seed}:order:{doc_id}".encode("utf-8"))
                    source[i] = sources.setdefault(src or kind, len(sources))
                    nbytes[i] = b
                    if split.is_heldout(doc_id, fraction, seed):
                        if nonblank:
                            text = texts[j] if texts is not None else text_col[j].as_py()
                            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                            heldout += 1
                    elif nonblank:
                        train[i] = True
                        new[i] = seen is None or doc_id not in seen
                        if encoder is not None and new[i]:
                            yield i, texts[j], b
                    i += 1

    try:
        if encoder is None:
            for _ in rows():
                pass
        else:
            _write_tokens(encoder.map(_batched(rows()), _text_bytes(paths)), tokens_out, tok_pos, tok_off, tok_len)
    finally:
        out.close()
    if heldout == 0:
        eval_path.unlink()
    return _Docs(key, nbytes, source, train, tok_off, tok_len, new, list(sources), heldout, fraction)


def _write_tokens(results: Iterator, tokens_out, tok_pos: list[int], tok_off: np.ndarray, tok_len: np.ndarray) -> None:
    for idx, lens, ids in results:
        starts = tok_pos[0] + np.concatenate([[0], np.cumsum(lens[:-1], dtype=np.int64)])
        tok_off[idx], tok_len[idx] = starts, lens
        ids.tofile(tokens_out)
        tok_pos[0] += int(ids.size)


def _tokenize_rows(docs: _Docs, paths: list[Path], select: np.ndarray, encoder: _Encoder, tokens_out, tok_pos: list[int]) -> None:
    """Tokenise the rows flagged in `select` (indices into docs), reading the Parquet files in order."""
    want = np.zeros(len(docs.train), bool)
    want[select] = True
    approx = int(docs.nbytes[select].sum())

    def rows() -> Iterator[tuple[int, str, int]]:
        i = 0
        for path in paths:
            for _, _, text_col, _, _, _ in _batches(path):
                n = len(text_col)
                sel = np.flatnonzero(want[i : i + n])
                if len(sel):
                    for j, text in zip(sel.tolist(), text_col.take(sel).to_pylist()):
                        yield i + j, text, int(docs.nbytes[i + j])
                i += n

    _write_tokens(encoder.map(_batched(rows()), approx), tokens_out, tok_pos, docs.tok_off, docs.tok_len)


def _batched(rows: Iterable[tuple[int, str, int]]) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Group (doc index, text, bytes) rows into tokenizer tasks of about BATCH_BYTES text or BATCH_DOCS documents."""
    texts: list[str] = []
    idx: list[int] = []
    size = 0
    for i, text, nbytes in rows:
        texts.append(text)
        idx.append(i)
        size += nbytes
        if size >= BATCH_BYTES or len(texts) >= BATCH_DOCS:
            yield np.array(idx, np.int64), texts
            texts, idx, size = [], [], 0
    if texts:
        yield np.array(idx, np.int64), texts


def _write_replay(texts: Iterable[str], path: Path) -> int:
    """Self-replay texts as a general corpus file (doc_id from position and text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    n = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal writer
        if not buf:
            return
        ids = [xxhash.xxh64_hexdigest(f"{n - len(buf) + k}:{t}".encode()) for k, t in enumerate(buf)]
        table = pa.table(
            {
                "doc_id": ids,
                "text": buf,
                "source": [REPLAY_SOURCE] * len(buf),
                "kind": ["general"] * len(buf),
                "file": [REPLAY_SOURCE] * len(buf),
                "position": list(range(n - len(buf), n)),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        buf.clear()

    for t in texts:
        buf.append(t)
        n += 1
        if len(buf) >= 1024:
            flush()
    flush()
    if writer is not None:
        writer.close()
    return n


# --------------------------------------------------------------------------- mixing


def _in_key_order(docs: _Docs, mask: np.ndarray) -> np.ndarray:
    """Indices of the documents selected by `mask`, in shuffle-key order (the seeded order every stream uses)."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(docs.key[idx], kind="stable")]


def _budget(docs_order: np.ndarray, lens: np.ndarray, budget: int) -> np.ndarray:
    """Tokens taken from each document of an ordered list until `budget` tokens (the last one cut, the rest 0)."""
    starts = np.concatenate([[0], np.cumsum(lens[docs_order], dtype=np.int64)[:-1]])
    return np.clip(budget - starts, 0, lens[docs_order]).astype(np.int64)


def _general_stream(docs: _Docs, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """General documents (indices) and tokens taken, epoch 0 in key order, later epochs re-permuted, until budget.

    The third value is the number of passes over the general training text (budget / its tokens) when all of it was
    tokenised, None when only a prefix of the shuffled order was (a subset: less than one pass)."""
    base = _in_key_order(docs, docs.train & (docs.tok_off >= 0))
    lens = docs.tok_len.astype(np.int64)
    pool = int(lens[base].sum())
    if budget == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0.0
    if pool == 0:
        raise PackError("the general corpus has no training documents (all empty or held out): add general text")
    parts, need, epoch = [], budget, 0
    while need > 0:
        order = base if epoch == 0 else base[np.random.default_rng([seed % (1 << 63), epoch]).permutation(len(base))]
        take = _budget(order, lens, need)
        keep = take > 0
        parts.append((order[keep], take[keep]))
        need -= int(take.sum())
        epoch += 1
    idx = np.concatenate([p[0] for p in parts])
    take = np.concatenate([p[1] for p in parts])
    everything = bool((docs.tok_off[docs.train] >= 0).all())
    return idx, take, (budget / pool if everything else None)


def _ensure_tokens(
    docs: _Docs,
    paths: list[Path],
    budget: int,
    bytes_per_token: float,
    encoder: _Encoder,
    tokens_out,
    tok_pos: list[int],
    mask: np.ndarray | None = None,
) -> int:
    """Tokenise training documents (those in `mask`, default all) in key order until `budget` tokens are available
    (or all are); returns passes. How the general stream and a refresh's replay of earlier domain documents tokenise
    only about what they use."""
    order = _in_key_order(docs, docs.train if mask is None else docs.train & mask)
    passes = 0
    while True:
        done = docs.tok_off[order] >= 0
        have = int(docs.tok_len[order][done].sum())
        k = int(done.sum())  # tokenised documents form a prefix of `order`
        if have >= budget or k == len(order):
            return passes
        if k:
            tokenised = order[:k]
            bytes_per_token = docs.nbytes[tokenised].sum() / max(1, docs.tok_len[tokenised].sum())
        need_bytes = (budget - have) * bytes_per_token * 1.25 + 16 * 1024
        cum = np.cumsum(docs.nbytes[order[k:]])
        extra = int(np.searchsorted(cum, need_bytes)) + 1
        _tokenize_rows(docs, paths, order[k : k + extra], encoder, tokens_out, tok_pos)
        passes += 1


# --------------------------------------------------------------------------- packing


def _write_shards(
    tokens: np.ndarray, off: np.ndarray, take: np.ndarray, seq_len: int, shard_sequences: int, out_dir: Path
) -> list[Path]:
    """Cut the stream (documents `off`/`take` back to back) into seq_len sequences, shard_sequences per Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_lengths", pa.list_(pa.int32()))])
    ends = np.cumsum(take)
    total = int(ends[-1]) if len(ends) else 0
    n_seq = total // seq_len
    assert n_seq * seq_len == total
    starts = ends - take
    shards = []
    per_shard = shard_sequences * seq_len
    if per_shard >= 1 << 31:
        raise PackError(
            f"mix.shard_sequences * mix.seq_len = {per_shard:,} tokens per shard overflows list offsets: "
            "lower mix.shard_sequences"
        )
    for k, a in enumerate(range(0, total, per_shard)):
        b = min(a + per_shard, total)
        i0 = int(np.searchsorted(ends, a, side="right"))
        i1 = int(np.searchsorted(ends, b, side="left"))
        pieces = []
        for i in range(i0, i1 + 1):
            lo, hi = max(a, int(starts[i])), min(b, int(ends[i]))
            if hi > lo:
                s = int(off[i]) + lo - int(starts[i])
                pieces.append(tokens[s : s + hi - lo])
        flat = np.concatenate(pieces).astype(np.int32, copy=False)
        n = (b - a) // seq_len
        cuts = np.union1d(ends[i0 : i1 + 1], np.arange(a + seq_len, b + 1, seq_len))
        cuts = cuts[(cuts > a) & (cuts <= b)]
        piece_lens = np.diff(np.concatenate([[a], cuts])).astype(np.int32)
        seq_of_piece = (cuts - 1 - a) // seq_len
        counts = np.bincount(seq_of_piece, minlength=n)
        table = pa.Table.from_arrays(
            [
                pa.ListArray.from_arrays(pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32)), pa.array(flat)),
                pa.ListArray.from_arrays(
                    pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), pa.array(piece_lens)
                ),
            ],
            schema=schema,
        )
        path = out_dir / f"train-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=min(n, 1024), compression="zstd")
        shards.append(path)
    return shards


def _write_general_sample(gen: _Docs, budget: int, seq_len: int, tokens: np.ndarray, out_dir: Path) -> Path | None:
    """The first general training documents in key order, cut into at most budget / seq_len sequences: the general
    text EWC estimates its Fisher on (replay is not marked in the mixed shards)."""
    order = _in_key_order(gen, gen.train & (gen.tok_off >= 0))
    lens = gen.tok_len.astype(np.int64)
    budget = min(budget, int(lens[order].sum())) // seq_len * seq_len
    if budget == 0:
        return None
    take = _budget(order, lens, budget)
    keep = take > 0
    (out_dir / "general-sample").mkdir(exist_ok=True)
    [path] = _write_shards(tokens, gen.tok_off[order[keep]], take[keep], seq_len, budget // seq_len, out_dir / "general-sample")
    return path


def pack_corpus(
    domain: Path | None,
    general: Path | None,
    tokenizer_dir: Path,
    cfg: MixConfig,
    out_dir: Path,
    replay_texts: Iterable[str] | None = None,
    refresh: RefreshSpec | None = None,
) -> PackResult:
    """Held-out eval files, token-exact domain/general mix, fixed-length packed Parquet shards (see module docstring).

    `replay_texts` (e.g. `replay.sample_self_replay(...)`) are general documents of source "self-replay", used in
    addition to `general`; they are only consumed when cfg.general_fraction > 0. `refresh`: pack the new domain
    documents plus a replay share of earlier ones (`RefreshSpec`); with nothing new, no sequence is packed.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    f = cfg.general_fraction
    if domain is None:
        raise PackError("no domain corpus to pack: data.domain produced no cleaned documents")
    if f > 0 and general is None and replay_texts is None:
        raise PackError(
            f"mix.general_fraction is {f:g} but there is no general text to replay: add data.general sources "
            "(e.g. a slice of a web or book corpus), or enable mix.self_replay to sample replay text from the base model, "
            "or set mix.general_fraction: 0 (no replay; expect forgetting)"
        )
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    for old in [
        *(out_dir / "train").glob("train-*.parquet"),
        *(out_dir / "general-sample").glob("*.parquet"),
        *(out_dir / "eval" / f"{k}.jsonl" for k in KINDS),
    ]:
        old.unlink(missing_ok=True)
    workers = cfg.workers or os.cpu_count() or 1
    timings: dict[str, float] = {}
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".pack-tmp-", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        text_bytes = _text_bytes([Path(domain)] + ([Path(general)] if general is not None and f > 0 else []))
        encoder = _Encoder(workers, start_pool=text_bytes >= INPROCESS_BYTES)
        try:
            encoder.spec, tok_info = _token_spec(Path(tokenizer_dir), tmp, cfg.document_separator)
            general_paths = [Path(general)] if general is not None else []
            replay_docs = 0
            if replay_texts is not None and f > 0:
                t0 = time.perf_counter()
                replay_docs = _write_replay(replay_texts, tmp / "replay.parquet")
                timings["self_replay_s"] = time.perf_counter() - t0
                if replay_docs:
                    general_paths.append(tmp / "replay.parquet")
            token_path = tmp / "tokens.int32"
            tok_pos = [0]
            fixed = refresh.heldout_fractions if refresh else {}
            seen = _doc_ids(refresh.seen) if refresh else None
            with open(token_path, "wb") as tokens_out:
                t0 = time.perf_counter()
                dom = _scan(
                    [Path(domain)], "domain", cfg, out_dir / "eval" / "domain.jsonl", encoder, tokens_out, tok_pos,
                    fraction=fixed.get("domain"), seen=seen,
                )
                timings["domain_tokenize_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                gen = (
                    _scan(
                        general_paths, "general", cfg, out_dir / "eval" / "general.jsonl", None, None, tok_pos,
                        fraction=fixed.get("general"),
                    )
                    if general_paths
                    else None
                )
                timings["general_scan_s"] = time.perf_counter() - t0
                heldout_fractions = {"domain": dom.fraction} | ({"general": gen.fraction} if gen is not None else {})

                if refresh is None:
                    d_order = _in_key_order(dom, dom.train)
                else:
                    d_order = _refresh_domain_order(dom, Path(domain), refresh.domain_replay, encoder, tokens_out, tok_pos)
                    if not len(d_order):
                        return _nothing_new(cfg, out_dir, heldout_fractions)
                d_lens = dom.tok_len.astype(np.int64)  # after the refresh's replay documents are tokenised
                d_pool = int(d_lens[d_order].sum())
                n_seq = int(d_pool / (1 - f)) // cfg.seq_len
                total = n_seq * cfg.seq_len
                g_budget = int(round(f * total))
                d_budget = total - g_budget
                if n_seq == 0:
                    raise PackError(
                        f"{d_pool:,} domain training tokens make no full sequence of mix.seq_len={cfg.seq_len}: "
                        "add domain text or lower mix.seq_len"
                    )
                t0 = time.perf_counter()
                passes = 0
                if g_budget > 0 and (gen is None or not gen.train.any()):
                    raise PackError(
                        "the general corpus has no training documents (all empty or held out): add data.general "
                        "text or enable mix.self_replay"
                    )
                sample_budget = cfg.general_sample_sequences * cfg.seq_len if gen is not None and gen.train.any() else 0
                if max(g_budget, sample_budget) > 0:
                    bpt = dom.nbytes[d_order].sum() / max(1, d_pool)
                    need = max(g_budget, sample_budget)
                    passes = _ensure_tokens(gen, general_paths, need, bpt, encoder, tokens_out, tok_pos)
                timings["general_tokenize_s"] = time.perf_counter() - t0

            # domain stream: key order until d_budget tokens
            d_take = _budget(d_order, d_lens, d_budget)
            keep = d_take > 0
            d_idx, d_take = d_order[keep], d_take[keep]
            dropped = d_pool - int(d_take.sum())
            if gen is not None and g_budget > 0:
                g_idx, g_take, epochs = _general_stream(gen, g_budget, cfg.seed)
            else:
                g_idx, g_take, epochs = np.empty(0, np.int64), np.empty(0, np.int64), 0.0

            # interleave: every document at the relative position of its midpoint within its kind
            def rel_mid(take: np.ndarray, budget: int) -> np.ndarray:
                return (np.cumsum(take) - take / 2) / max(budget, 1)

            pos = np.concatenate([rel_mid(d_take, d_budget), rel_mid(g_take, g_budget)])
            kind = np.concatenate([np.zeros(len(d_take), np.int8), np.ones(len(g_take), np.int8)])
            order = np.lexsort((kind, pos))
            off = np.concatenate([dom.tok_off[d_idx], gen.tok_off[g_idx] if len(g_idx) else np.empty(0, np.int64)])[order]
            take = np.concatenate([d_take, g_take])[order]

            t0 = time.perf_counter()
            mapped = np.memmap(token_path, dtype=np.int32, mode="r") if tok_pos[0] else None
            tokens = mapped.view(np.ndarray) if mapped is not None else np.empty(0, np.int32)  # cheap plain slices
            shards = _write_shards(tokens, off, take, cfg.seq_len, cfg.shard_sequences, out_dir / "train")
            general_sample = _write_general_sample(gen, sample_budget, cfg.seq_len, tokens, out_dir) if sample_budget else None
            del tokens, mapped
            timings["pack_write_s"] = time.perf_counter() - t0
        finally:
            encoder.close()

    general_tokens = int(g_take.sum())
    tokens_by_kind = {"domain": int(d_take.sum()), "general": general_tokens}
    by_source: dict[str, int] = {}
    for docs, idx, tk in ((dom, d_idx, d_take), (gen, g_idx, g_take)):
        if docs is None or not len(idx):
            continue
        sums = np.bincount(docs.source[idx], weights=tk, minlength=len(docs.sources))
        for name, s in zip(docs.sources, sums):
            if s:
                by_source[name] = by_source.get(name, 0) + int(s)
    realised = general_tokens / total
    if encoder.broken:
        warnings.append(encoder.broken)
    if general is None and replay_docs and gen is not None and gen.heldout:
        warnings.append(SELF_REPLAY_EVAL_WARNING)
    if epochs is not None and epochs > 1:
        warnings.append(
            f"general text is short: its {gen.tok_len[gen.train].sum():,} training tokens are repeated {epochs:.2f} times "
            "to reach the replay share; add general text if you can"
        )
    tokenized = int(tok_pos[0])
    elapsed = time.perf_counter() - t_start
    eval_files = _eval_files(out_dir)
    refresh_counts = None
    if refresh is not None:
        fresh = dom.new[d_idx]
        refresh_counts = RefreshCounts(
            new_documents=int(fresh.sum()), new_tokens=int(d_take[fresh].sum()),
            replayed_documents=int((~fresh).sum()), replayed_tokens=int(d_take[~fresh].sum()),
        )
    report = {
        "seq_len": cfg.seq_len,
        "sequences": n_seq,
        "training_tokens": total,
        "shards": len(shards),
        "general_fraction_target": f,
        "general_fraction_realised": realised,
        "general_fraction_error": realised - f,
        "tolerance": f"token-exact: |realised - target| <= 0.5 / {total} (absolute)",
        "within_half_percent_of_target": abs(realised - f) <= 0.005 * f if f else realised == 0,
        "tokens_by_kind": tokens_by_kind,
        "tokens_by_source": by_source,
        "domain": {
            "documents": int(len(dom.train)),
            "training_documents": int(dom.train.sum()),
            "heldout_documents": dom.heldout,
            "heldout_fraction": dom.fraction,
            "training_tokens_available": d_pool,
            "dropped_remainder_tokens": dropped,
        },
        "general": None
        if gen is None
        else {
            "documents": int(len(gen.train)),
            "training_documents": int(gen.train.sum()),
            "self_replay_documents": replay_docs,
            "heldout_documents": gen.heldout,
            "heldout_fraction": gen.fraction,
            "tokenised_documents": int((gen.tok_off >= 0).sum()),
            "tokenised_tokens": int(gen.tok_len[gen.tok_off >= 0].sum()),
            "tokenised_bytes_share": float(gen.nbytes[gen.tok_off >= 0].sum() / max(1, gen.nbytes[gen.train].sum())),
            "tokenize_passes": passes,
            "epochs": epochs,
            "packed_documents": int(len(g_idx)),
        },
        "dropped_tokens": dropped,
        "tokenizer": tok_info,
        "tokenization": {
            "mode": sorted(encoder.mode_used),
            "workers": workers,
            "tokens": tokenized,
            "seconds": round(timings.get("domain_tokenize_s", 0) + timings.get("general_tokenize_s", 0), 3),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"total": round(elapsed, 3)},
        "eval_files": {k: (p.name if p else None) for k, p in eval_files.items()},
        "eval_note": "lm-eval local tasks: dataset_path json, data_files <file>; a data_files string names the split 'train'",
        "seed": cfg.seed,
        "heldout_fractions": heldout_fractions,
        "refresh": refresh_counts.model_dump() if refresh_counts else None,
        "warnings": warnings,
    }
    return PackResult(
        train_shards=shards,
        eval_files=eval_files,
        tokens=by_source,
        tokens_by_kind=tokens_by_kind,
        general_fraction=realised,
        general_fraction_target=f,
        sequences=n_seq,
        seq_len=cfg.seq_len,
        dropped_tokens=dropped,
        general_sample=general_sample,
        heldout_fractions=heldout_fractions,
        refresh=refresh_counts,
        report=report,
    )


def _eval_files(out_dir: Path) -> dict[str, Path | None]:
    files = {k: out_dir / "eval" / f"{k}.jsonl" for k in KINDS}
    return {k: (p if p.exists() else None) for k, p in files.items()}


def _doc_ids(corpus: Path) -> set[str]:
    """The document ids of a cleaned corpus (what a refresh compares the new corpus with)."""
    import pyarrow.parquet as pq

    return {str(x) for x in pq.read_table(corpus, columns=["doc_id"]).column("doc_id").to_pylist()}


def _refresh_domain_order(
    dom: _Docs, path: Path, replay: float, encoder: _Encoder, tokens_out, tok_pos: list[int]
) -> np.ndarray:
    """The domain documents of a refresh, in key order: every new training document, then earlier ones (whole, in key
    order) until they are `replay` of the domain tokens. Empty when nothing is new. Only what is used is tokenised."""
    lens = dom.tok_len.astype(np.int64)
    fresh = _in_key_order(dom, dom.train & dom.new)
    new_tokens = int(lens[fresh].sum())
    if new_tokens == 0 or replay == 0:
        return fresh
    budget = int(round(replay / (1 - replay) * new_tokens))
    bytes_per_token = dom.nbytes[fresh].sum() / new_tokens
    _ensure_tokens(dom, [path], budget, bytes_per_token, encoder, tokens_out, tok_pos, mask=~dom.new)
    earlier = _in_key_order(dom, dom.train & ~dom.new & (dom.tok_off >= 0))
    count = int(np.searchsorted(np.cumsum(dom.tok_len[earlier], dtype=np.int64), budget)) + 1  # whole documents, the last one reaching budget
    chosen = np.zeros(len(dom.train), bool)
    chosen[fresh] = True
    chosen[earlier[:count]] = True
    return _in_key_order(dom, chosen)


def _nothing_new(cfg: MixConfig, out_dir: Path, heldout_fractions: dict[str, float]) -> PackResult:
    """A refresh whose cleaned corpus has no domain training document the lineage has not seen: nothing to pack."""
    nothing = RefreshCounts(new_documents=0, new_tokens=0, replayed_documents=0, replayed_tokens=0)
    return PackResult(
        train_shards=[], eval_files=_eval_files(out_dir), tokens={}, tokens_by_kind={"domain": 0, "general": 0},
        general_fraction=0.0, general_fraction_target=cfg.general_fraction, sequences=0, seq_len=cfg.seq_len,
        dropped_tokens=0, heldout_fractions=heldout_fractions, refresh=nothing,
        report={"refresh": nothing.model_dump(), "heldout_fractions": heldout_fractions, "sequences": 0, "warnings": []},
    )
