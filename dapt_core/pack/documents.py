"""Documents: one kind's corpus read once from Parquet into O(documents) arrays (held-out decision, eval file,
shuffle key, sizes, token offsets), and the tokenising of chosen documents into the `TokenFile`.

Held-out split by document, before anything is packed: per kind, a document is held out when
`split.is_heldout(doc_id, split.heldout_fraction(n_rows_of_kind, ...), seed)`, the rule the tokenizer stage uses, so
neither trains on the evaluation documents. `n_rows_of_kind` counts every row of that kind's corpus (self-replay texts
count as general rows). Held-out documents go to `eval/<kind>.jsonl` (`{"text": ...}` per line) and are never
tokenised for training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import xxhash

from dapt_core import split
from dapt_core.pack.tokenise import Encoder, TokenFile, batched
from dapt_core.pack.types import REPLAY_SOURCE

if TYPE_CHECKING:
    from dapt_core.config import MixConfig


@dataclass
class Docs:
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


def _batches(path: Path) -> Iterator[tuple[int, list[str], Any, np.ndarray, np.ndarray, list]]:
    """(first row, doc ids, text column (Arrow), UTF-8 bytes per text, has-text mask, sources) per Parquet batch.

    Texts stay in Arrow until a caller needs them as Python strings (a general corpus is mostly only measured)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    cols = ["doc_id", "text"] + (["source"] if "source" in names else [])
    mean_bytes = text_bytes([path]) / max(1, pf.metadata.num_rows)
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


def text_bytes(paths: list[Path]) -> int:
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


def scan(
    paths: list[Path],
    kind: str,
    cfg: MixConfig,
    eval_path: Path,
    encoder: Encoder | None,
    token_file: TokenFile | None,
    fraction: float | None = None,
    seen: set[str] | None = None,
) -> Docs:
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

    def rows(out: TextIO) -> Iterator[tuple[int, str, int]]:
        nonlocal heldout
        i = 0
        for path in paths:
            for _, ids, text_col, sizes, has_text, srcs in _batches(path):
                texts = text_col.to_pylist() if encoder is not None else None
                for j, (doc_id, b, nonblank, src) in enumerate(zip(ids, sizes.tolist(), has_text.tolist(), srcs)):
                    key[i] = xxhash.xxh64_intdigest(f"{seed}:order:{doc_id}".encode())
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

    with open(eval_path, "w", encoding="utf-8") as out:
        if encoder is None:
            for _ in rows(out):
                pass
        else:
            token_file.append(encoder.map(batched(rows(out)), text_bytes(paths)), tok_off, tok_len)
    if heldout == 0:
        eval_path.unlink()
    return Docs(key, nbytes, source, train, tok_off, tok_len, new, list(sources), heldout, fraction)


def _tokenize_rows(docs: Docs, paths: list[Path], select: np.ndarray, encoder: Encoder, token_file: TokenFile) -> None:
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

    token_file.append(encoder.map(batched(rows()), approx), docs.tok_off, docs.tok_len)


def write_replay(texts: Iterable[str], path: Path) -> int:
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


def doc_ids(parts: list[Path]) -> set[str]:
    """The document ids of a cleaned corpus (what a refresh compares the new corpus with)."""
    import pyarrow.parquet as pq

    return {str(x) for p in parts for x in pq.read_table(p, columns=["doc_id"]).column("doc_id").to_pylist()}


def in_key_order(docs: Docs, mask: np.ndarray) -> np.ndarray:
    """Indices of the documents selected by `mask`, in shuffle-key order (the seeded order every stream uses)."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(docs.key[idx], kind="stable")]


def ensure_tokens(
    docs: Docs,
    paths: list[Path],
    budget: int,
    bytes_per_token: float,
    encoder: Encoder,
    token_file: TokenFile,
    mask: np.ndarray | None = None,
) -> int:
    """Tokenise training documents (those in `mask`, default all) in key order until `budget` tokens are available
    (or all are); returns passes. How the general stream and a refresh's replay of earlier domain documents tokenise
    only about what they use."""
    order = in_key_order(docs, docs.train if mask is None else docs.train & mask)
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
        _tokenize_rows(docs, paths, order[k : k + extra], encoder, token_file)
        passes += 1
