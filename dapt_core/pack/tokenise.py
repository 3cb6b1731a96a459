"""Tokenisation: every document becomes `[BOS] ids EOS`, encoded in-process or on spawned single-threaded workers,
its ids streamed to one flat int32 file (`TokenFile`) that packing reads back through a memmap.

BOS only when the tokenizer's own convention puts it in front of encoded text (`tokenizer("x")` starts with
`bos_token_id`, as with Llama 2/3); GPT-2/SmolLM/Qwen style tokenizers get no BOS. Text is encoded with the fast
tokenizer's Rust backend (added tokens included, `add_special_tokens=False`).

`workers > 1` means that many **spawned** processes (never fork: the parent may already run Rust/torch threads, and
fork-after-threads can deadlock), each with `TOKENIZERS_PARALLELISM=false`, started first thing so that their start-up
overlaps the tokenizer load; results come back in submission order (the output never depends on the worker count),
with at most 2 batches per worker in flight. Passes under `INPROCESS_BYTES` of text, and `workers=1`, run in-process
on the Rust thread pool. Why processes, and by how much they win: bench/README.md ("pack.py").

pyarrow and transformers are imported inside the functions that use them: worker processes import this module and
need only numpy and tokenizers (a spawned worker starts in ~0.1 s instead of ~0.3 s).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dapt_core.model import adds_bos
from dapt_core.pack.types import PackError

BATCH_BYTES = 256 * 1024  # text per tokenizer task
BATCH_DOCS = 2048
INPROCESS_BYTES = 1 << 20  # passes smaller than this are tokenised in-process


@dataclass(frozen=True)
class TokSpec:
    """How a worker encodes: the tokenizer file and the ids put around every document."""

    tokenizer_file: str  # the fast tokenizer's backend, serialised (a small path, not the JSON, crosses to workers)
    bos: int | None  # prepended to every document when not None
    eos: int


def token_spec(tokenizer_dir: Path, tmp: Path, separator: str | None) -> tuple[TokSpec, dict]:
    """The encoding spec (the backend tokenizer saved under `tmp`) and what the report says about it."""
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
        raise PackError(
            f"{tokenizer_dir}: the tokenizer has no eos_token; set mix.document_separator to separate documents"
        )
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
    return TokSpec(str(path), int(bos) if add_bos else None, int(tok.eos_token_id)), info


_worker_toks: dict = {}  # tokenizer file -> Tokenizer, in a spawned worker process


def _init_worker() -> None:
    """Runs first in every spawned worker: one Rust thread per process, imports done before the first batch."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers  # noqa: F401


def _warm() -> int:
    return os.getpid()


def _encode_in_worker(spec: TokSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = _worker_toks.get(spec.tokenizer_file)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _worker_toks[spec.tokenizer_file] = Tokenizer.from_file(spec.tokenizer_file)
    return _encode(tok, spec, texts)


def _encode(tok: Any, spec: TokSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
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


class Encoder:
    """Encodes text batches in order, in-process or on a pool of spawned single-threaded workers started once.

    If the pool breaks (a worker cannot start, e.g. `python - < script.py`, whose `__main__` spawn cannot re-import,
    or a worker is killed), the batches are encoded in-process instead and the report says so. The spawn payload is
    kept small (the tokenizer travels as a file path): CPython blocks forever writing a payload larger than a pipe
    buffer to a child that died before reading it.
    """

    def __init__(self, workers: int, start_pool: bool) -> None:
        self.spec: TokSpec | None = None  # set once the tokenizer is loaded (the pool starts before, in parallel)
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

    def _submit_raw(self, fn: Callable, *args: Any) -> Future | None:
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

    def _submit(self, texts: list[str]) -> Future | None:
        return None if self.broken else self._submit_raw(_encode_in_worker, self.spec, texts)

    def _result(self, texts: list[str], fut: Future | None) -> tuple[np.ndarray, np.ndarray]:
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

    def map(
        self, batches: Iterable[tuple[Any, list[str]]], approx_bytes: int
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
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


class TokenFile:
    """The ids of every tokenised document back to back in one int32 file; a document finds its own by offset.

    Memory stays O(documents): ids stream to disk, never to Python lists of the whole corpus."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # tokens written
        self._out = open(path, "wb")

    def append(
        self, results: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], tok_off: np.ndarray, tok_len: np.ndarray
    ) -> None:
        """Write (doc indices, lengths, ids) batches; record each document's offset and length at its index."""
        for idx, lens, ids in results:
            starts = self.size + np.concatenate([[0], np.cumsum(lens[:-1], dtype=np.int64)])
            tok_off[idx], tok_len[idx] = starts, lens
            ids.tofile(self._out)
            self.size += int(ids.size)

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> TokenFile:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def read(self) -> np.ndarray:
        """Every id written, as a read-only memmap (plain ndarray view: cheap slices); call after close()."""
        if not self.size:
            return np.empty(0, np.int32)
        return np.memmap(self.path, dtype=np.int32, mode="r").view(np.ndarray)


def batched(rows: Iterable[tuple[int, str, int]]) -> Iterator[tuple[np.ndarray, list[str]]]:
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
