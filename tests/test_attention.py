"""Per-document attention on every attention backend, refused combinations, and the launch / checkpoint-metadata
guards of dapt_core/train/: fast, one process."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from dapt_core.config import TrainConfig
from dapt_core.train import check_strategy, make_batch, train
from dapt_core.train.attention import check_attention, flatten_for_varlen, set_attention
from dapt_core.train.checkpoint import SafeShardReader
from dapt_core.train.data import target_tokens
from dapt_core.train.distributed import Distributed, torchrun_command
from tests.test_train import VOCAB, _cfg, domain_seq, general_seq, mixed_shards
from tests.tiny_model import tiny_llama

# Two packed rows of 32 tokens: documents of 10 + 22 and 7 + 13 + 12 tokens.
DOCS = [[10, 22], [7, 13, 12]]


def packed_rows() -> list[list[list[int]]]:
    rng = np.random.default_rng(0)
    return [[general_seq(rng, n) if k % 2 == 0 else domain_seq(rng, n) for k, n in enumerate(row)] for row in DOCS]


def packed_batch(rows) -> dict[str, torch.Tensor]:
    items = [(np.array([t for doc in docs for t in doc]), np.array([len(d) for d in docs]), None) for docs in rows]
    return make_batch(items, block_documents=True)


def model_with(attn: str):
    model = tiny_llama(VOCAB)
    set_attention(model, _cfg(attn_implementation=attn))
    return model.eval()


def assert_documents_stand_alone(model, logits: torch.Tensor, rows) -> None:
    """Every document's logits inside its packed row equal those of the document fed on its own."""
    for r, docs in enumerate(rows):
        start = 0
        for doc in docs:
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([doc]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[r, start : start + len(doc)], alone, rtol=0, atol=1e-5)
            start += len(doc)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone_at_batch_two(attn):
    model, rows = model_with(attn), packed_rows()
    batch = packed_batch(rows)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    assert_documents_stand_alone(model, logits, rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_flattened_micro_batch_is_the_same_computation(attn):
    """What flash-attention gets (one row, per-document position ids) gives the packed logits and the same targets."""
    model, rows = model_with(attn), packed_rows()
    batch = packed_batch(rows)
    flat = flatten_for_varlen(batch)
    assert flat["input_ids"].shape == (1, 64) and flat["position_ids"].shape == (1, 64)
    assert flat["labels"][0, 32] == -100  # row 2's first token, now after row 1's last: not a target
    assert target_tokens(flat["labels"]) == target_tokens(batch["labels"])
    with torch.no_grad():
        flat_logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits
    assert_documents_stand_alone(model, flat_logits.reshape(2, 32, -1), rows)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None, reason="flash-attn on a CUDA GPU"
)
def test_flash_attention_packed_equals_documents_alone():
    model = tiny_llama(VOCAB).to("cuda", torch.bfloat16)
    set_attention(model, _cfg(attn_implementation="flash_attention_2"))
    rows = packed_rows()
    flat = {k: v.cuda() for k, v in flatten_for_varlen(packed_batch(rows)).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**flat, use_cache=False).logits.reshape(2, 32, -1).float()
    for r, docs in enumerate(rows):
        start = 0
        for doc in docs:
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([doc], device="cuda"), use_cache=False).logits[0].float()
            torch.testing.assert_close(logits[r, start : start + len(doc)], alone, rtol=0, atol=2e-2)  # bf16
            start += len(doc)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_refused_before_training(tmp_path):
    cfg = _cfg(attn_implementation="flash_attention_2", block_cross_document_attention=True)
    with pytest.raises(
        ValueError, match="train.attn_implementation flash_attention_2: the flash-attn package is not installed"
    ):
        train(tiny_llama(VOCAB), mixed_shards(tmp_path / "d", n=8), cfg, tmp_path / "out")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_flash_attention_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU"):
        check_attention(_cfg(attn_implementation="flash_attention_2"), torch.device("cpu"))


def test_fsdp_with_ewc_is_refused():
    cfg = _cfg(strategy="fsdp", ewc={"enabled": True})
    with pytest.raises(ValueError, match="train.ewc with train.strategy fsdp"):
        check_strategy(cfg, Distributed(rank=0, world=2))
    check_strategy(cfg, Distributed())  # one process: no sharding, EWC runs as usual


def test_multi_node_settings():
    with pytest.raises(ValueError, match="train.nnodes > 1 needs train.rdzv_endpoint"):
        TrainConfig(nnodes=2)
    with pytest.raises(ValueError, match="train.node_rank 2 must be below train.nnodes 2"):
        TrainConfig(nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29500")
    one = torchrun_command(TrainConfig(nproc_per_node=8), ["spec.json", "result.json"], 60)
    assert (
        "--standalone" in one
        and "--nproc_per_node=8" in one
        and one[-3:] == ["dapt_core.cpt", "spec.json", "result.json"]
    )
    many = torchrun_command(TrainConfig(nproc_per_node=8, nnodes=4, rdzv_endpoint="10.0.0.1:29500"), [], 60)
    assert "--standalone" not in many and {
        "--nnodes=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29500",
    } <= set(many)
    assert not any(a.startswith("--node_rank") for a in many)  # c10d numbers the nodes: one config for every node


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_sharded_checkpoint_metadata_is_read_as_data_only(tmp_path):
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    good = tmp_path / "good"
    good.mkdir()
    tensor = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size([4, 2]),
        [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2]))],
    )
    with open(good / ".metadata", "wb") as fh:
        pickle.dump(Metadata(state_dict_metadata={"w": tensor, "step": BytesStorageMetadata()}), fh)
    assert SafeShardReader(str(good)).read_metadata().state_dict_metadata["w"].size == torch.Size([4, 2])
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "code-ran"
    with open(bad / ".metadata", "wb") as fh:
        pickle.dump(Metadata(state_dict_metadata={"w": _Payload(marker)}), fh)
    with pytest.raises(ValueError, match=r"bad/\.metadata: refused to load"):
        SafeShardReader(str(bad)).read_metadata()
    assert not marker.exists()
