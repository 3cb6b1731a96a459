"""The training data of `dapt_core.train`: packed shards, the data order, micro-batches and their prefetching.

Parquet shards hold `input_ids` (list<int32>, fixed seq_len), `doc_lengths` (list<int32>) and, for SFT, an optional
`loss_mask` (list<int8>, 1 where the token is a training target), read memory-mapped. Epoch e visits the sequences in
the permutation `default_rng([seed, e]).permutation(N)`; the data position is one number, the sequences consumed so
far (epoch = position // N, index = position % N), so the order is a pure function of the seed and a resumed run
continues exactly where the checkpoint left off. Rank r of a world of W takes sequences r*B..(r+1)*B-1 of every
global micro-batch of B*W.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

Item = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def list_column(rows: Sequence[np.ndarray], dtype: type) -> pa.ListArray:
    """A Parquet list column of `rows` (1-D arrays of any lengths), built from one flat array and its offsets: a
    shard writer never turns tokens into Python ints."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(dtype, copy=False) if len(rows) else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class PackedSequences:
    """The packed shards as one indexable set of (input_ids [L] int64, doc_lengths [k] int64), memory-mapped."""

    def __init__(self, shards: Sequence[Path]):
        import pyarrow.parquet as pq

        self._ids: list[np.ndarray] = []
        self._docs: list[tuple[np.ndarray, np.ndarray]] = []
        self._masks: list[np.ndarray | None] = []
        seq_len = None
        for shard in shards:
            names = pq.read_schema(str(shard)).names
            columns = ["input_ids", "doc_lengths"] + (["loss_mask"] if "loss_mask" in names else [])
            table = pq.read_table(str(shard), columns=columns, memory_map=True)
            ids = table.column("input_ids").combine_chunks()
            if len(ids) == 0:
                continue
            values = ids.values.to_numpy(zero_copy_only=False)
            offsets = ids.offsets.to_numpy()
            n = len(ids)
            length = int(offsets[1] - offsets[0])
            if seq_len is None:
                seq_len = length
            if length != seq_len or int(offsets[-1] - offsets[0]) != n * seq_len:
                raise ValueError(f"{shard}: sequences must all have length {seq_len}")
            self._ids.append(values[offsets[0] : offsets[-1]].reshape(n, seq_len))
            docs = table.column("doc_lengths").combine_chunks()
            self._docs.append((docs.values.to_numpy(zero_copy_only=False), docs.offsets.to_numpy()))
            self._masks.append(_loss_mask(table, shard, n, seq_len) if "loss_mask" in columns else None)
        if seq_len is None:
            raise ValueError("no training sequences in the given shards")
        self.seq_len = seq_len
        self._starts = np.cumsum([0] + [len(a) for a in self._ids])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Item:
        """(input_ids, doc_lengths, loss_mask or None) of sequence i."""
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[s])
        values, offsets = self._docs[s]
        mask = self._masks[s]
        return (
            self._ids[s][j].astype(np.int64),
            values[offsets[j] : offsets[j + 1]].astype(np.int64),
            None if mask is None else mask[j].astype(bool),
        )


def _loss_mask(table: pa.Table, shard: Path, n: int, seq_len: int) -> np.ndarray:
    m = table.column("loss_mask").combine_chunks()
    mask = m.values.to_numpy(zero_copy_only=False)[m.offsets[0].as_py() : m.offsets[-1].as_py()]
    if len(mask) != n * seq_len:
        raise ValueError(f"{shard}: loss_mask must have one entry per token")
    return mask.reshape(n, seq_len)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order sequences are visited in during `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def document_position_ids(doc_lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """Position ids restarting at 0 at each document of a packed sequence."""
    pos = np.concatenate([np.arange(int(d)) for d in doc_lengths if d > 0]) if len(doc_lengths) else np.arange(0)
    if len(pos) != seq_len:
        raise ValueError(f"doc_lengths sum to {len(pos)}, expected seq_len {seq_len}")
    return pos


def make_batch(items: list[Item], block_documents: bool) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch: input_ids, labels (-100 where loss_mask is 0) and (block mode) per-document
    position_ids."""
    ids = torch.from_numpy(np.stack([a for a, _, _ in items]))
    labels = ids.clone()
    for row, (_, _, mask) in enumerate(items):
        if mask is not None:
            labels[row, torch.from_numpy(~mask)] = -100
    batch = {"input_ids": ids, "labels": labels}
    if block_documents:
        seq_len = ids.shape[1]
        pos = torch.from_numpy(np.stack([document_position_ids(d, seq_len) for _, d, _ in items]))
        batch["position_ids"] = pos
        # A document's first token would be predicted from the previous document: not a learnable target.
        starts = pos == 0
        starts[:, 0] = False
        labels[starts] = -100
    return batch


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch's labels train on: positions 1.. (the first has no prediction) that are not -100."""
    return int((labels[:, 1:] != -100).sum())


def summed_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL summed over the target tokens (fp32), to be divided by the step's target count.

    The labels are shifted, not the logits: `logits[:, :-1]` is not contiguous, so flattening it would copy the whole
    `[batch, length, vocab]` tensor (200 MB for 4 x 256 x 49k fp32). The last position's logits meet an ignored label.
    fp32 logits (CPU) are used as they are; only lower-precision logits (bf16 autocast) get an fp32 copy."""
    import torch.nn.functional as F

    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


class MicroBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from data position `start` on, endlessly (the stream runs on into the next epoch's
    permutation). It opens the shards itself, so DataLoader workers (forked or spawned) never copy the data. With
    several workers, worker w builds micro-batches w, w+k, ... and the DataLoader yields them back in order."""

    def __init__(
        self,
        shards: Sequence[Path],
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        start: int,
        block_documents: bool,
    ):
        super().__init__()
        self.shards, self.seed, self.batch_size, self.rank, self.world = list(shards), seed, batch_size, rank, world
        self.start, self.block_documents = start, block_documents

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        data = PackedSequences(self.shards)
        n, orders = len(data), {}
        per_step = self.batch_size * self.world
        k = worker
        while True:
            first = self.start + k * per_step + self.rank * self.batch_size
            items = []
            for position in range(first, first + self.batch_size):
                epoch = position // n
                if epoch not in orders:
                    orders = {epoch: epoch_order(n, self.seed, epoch)}
                items.append(data[int(orders[epoch][position % n])])
            yield make_batch(items, self.block_documents)
            k += workers


def micro_batch_loader(dataset: MicroBatches, workers: int, pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches, `workers` processes building them ahead of the step that needs them (0: in this process)."""
    if workers == 0:
        return iter(dataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4,
        persistent_workers=False,
    )
    return iter(loader)
