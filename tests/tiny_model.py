"""Tiny models and tokenizers built on the fly, so tests and benchmarks never download weights: the one place that
builds them (tests/ and bench/ import from here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def byte_level_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A byte-level BPE (GPT-2/Llama-3 conventions) trained on `texts`, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    t.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_llama(
    vocab_rows: int,
    tied: bool = True,
    seed: int = 0,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    kv_heads: int = 2,
    max_positions: int = 512,
    **config: int,
):
    """A randomly initialised Llama (weights fixed by `seed`); `config`: further LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama_config = LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        **config,
    )
    return LlamaForCausalLM(llama_config)


def trained_tiny_llama(tok, texts: list[str], tied: bool, steps: int = 60):
    """A tiny Llama trained `steps` AdamW steps (lr 3e-3, 16 rows of 128 tokens, seed 0) on `texts` with `tok`: a
    base that has learnt the text's statistics, for measuring what a tokenizer extension costs it."""
    import torch

    model = tiny_llama(len(tok), tied)
    ids = [i for d in texts for i in [tok.bos_token_id, *tok(d)["input_ids"]]]
    data = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def save_tiny_model_dir(path: Path, texts: list[str], tied: bool = True, vocab_size: int = 1000) -> Path:
    """A local HF model directory (safetensors + tokenizer) usable as `model.base`."""
    tok = byte_level_tokenizer(texts, vocab_size)
    tiny_llama(len(tok), tied).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def pretrained_general_base(root: Path, seq_len: int, steps: int = 60, domain_docs: int = 0) -> Path:
    """A tiny model trained `steps` steps on general prose (texts unlike the corpus' held-out docs), saved as an HF dir.
    With `domain_docs`, it also reads that many domain documents (other seeds than the corpus'): a base that already
    knows the domain through its general-text tokenizer, as a real LLM knows legal or medical English."""
    from dapt_core.config import TrainConfig
    from dapt_core.train import train
    from tests.corpus import prose

    texts = [prose(i, "general") for i in range(100)]
    tok = byte_level_tokenizer(texts, 1000)
    texts += [prose(5000 + i, "domain") for i in range(domain_docs)]
    shard = write_packed_shard(root / "pretrain" / "shard.parquet", packed_rows(tok, texts, seq_len))
    cfg = TrainConfig(lr=1e-3, max_steps=steps, batch_size=8, save_every=steps, warmup_ratio=0.05, report_to=[])
    res = train(tiny_llama(len(tok)), [shard], cfg, root / "pretrain" / "out", resume=False)
    base = root / "base"
    res.model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    return base


def packed_rows(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """The texts' tokens back to back, an EOS after each, cut into whole `seq_len` rows (as the packer streams them;
    the tail short of a row is dropped)."""
    import numpy as np

    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len).tolist()


def write_packed_shard(
    path: Path, rows: Sequence[Sequence[int]], doc_lengths: Sequence[Sequence[int]] | None = None
) -> Path:
    """`rows` as one training shard in the packer's columns (`input_ids`, `doc_lengths`: list<int32>); a row is one
    document unless `doc_lengths` (the lengths of its documents, per row) splits it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "input_ids": pa.array(rows, pa.list_(pa.int32())),
            "doc_lengths": pa.array(doc_lengths or [[len(r)] for r in rows], pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path)
    return path
