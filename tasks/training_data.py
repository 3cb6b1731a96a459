"""Prefect tasks that turn the cleaned corpora into training data: tokenizer extension, then packing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

import dapt_core.pack as pack
import dapt_core.replay as replay
import dapt_core.tokenizer_ext as tokenizer_ext
from dapt.tasks.caching import check_result_record
from dapt_core import layout, leftovers, split
from dapt_core.config import MixConfig, ModelConfig, TokenizerConfig
from dapt_core.hashing import code_version, stable_hash
from dapt_core.manifest import CleanManifest, PackManifest, RefreshBasis, TokenizerManifest
from dapt_core.model import load_model, load_tokenizer
from dapt_core.store import open_store

# The task module itself is part of each code version: a custom cache key replaces Prefect's task-source hash.
TOKENIZER_CODE = code_version(split.split_texts, tokenizer_ext.extend, load_model, task_module=sys.modules[__name__])
PACK_CODE = code_version(pack.pack_corpus, replay.sample_self_replay, load_model, task_module=sys.modules[__name__])


def _split_params(mix: MixConfig) -> tuple:
    return (mix.heldout_fraction, mix.max_heldout_docs, mix.seed)


def tokenizer_key(
    clean: CleanManifest, fingerprint: str, model: ModelConfig, cfg: TokenizerConfig, mix: MixConfig
) -> str:
    domain = clean.domain.sha256 if clean.domain else None
    return "tokenizer-" + stable_hash(
        domain,
        fingerprint,
        model.trust_remote_code,
        cfg.model_dump(mode="json", exclude={"on_no_gain"}),
        _split_params(mix),
        TOKENIZER_CODE,
    )


@task(
    name="extend-tokenizer",
    cache_key_fn=lambda ctx, p: tokenizer_key(p["clean"], p["fingerprint"], p["model_cfg"], p["cfg"], p["mix"]),
    persist_result=True,
    result_serializer="json",
)
def extend_tokenizer_task(
    clean: CleanManifest, fingerprint: str, model_cfg: ModelConfig, cfg: TokenizerConfig, mix: MixConfig, store_uri: str
) -> TokenizerManifest:
    """Add frequent domain terms to the tokenizer, resize and initialise the model (tokenizer.init), report the
    effect and the extension's initial cost on held-out domain and general text."""
    key = tokenizer_key(clean, fingerprint, model_cfg, cfg, mix)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    train, heldout = split.split_texts(store.local_parts(clean.domain), *_split_params(mix))
    general_heldout = split.split_texts(store.local_parts(clean.general), *_split_params(mix))[1]
    result = tokenizer_ext.extend(
        load_model(model_cfg), load_tokenizer(model_cfg), train, heldout, cfg, general_heldout_texts=general_heldout
    )
    with leftovers.temp_dir("tokenizer") as tmp:
        out = Path(tmp) / "model"
        result.model.save_pretrained(out, safe_serialization=True)
        result.tokenizer.save_pretrained(out)
        model_ref = store.put_dir(out, layout.tokenizer_model_key(key))
    report_json = store.put_text(
        json.dumps(result.report, indent=2, default=str), layout.tokenizer_report_key(key, "json")
    )
    report_md = store.put_text(result.report_markdown, layout.tokenizer_report_key(key, "md"))
    return TokenizerManifest(
        model=model_ref,
        base_fingerprint=fingerprint,
        new_tokens=len(result.report.get("new_tokens", [])),
        new_token_ids=sorted(result.tokenizer.convert_tokens_to_ids(result.new_tokens)),
        report_json=report_json,
        report_md=report_md,
        code_version=TOKENIZER_CODE,
    )


def pack_key(clean: CleanManifest, tok: TokenizerManifest, mix: MixConfig, refresh: RefreshBasis | None = None) -> str:
    shards = [r.sha256 if r else None for r in (clean.domain, clean.general)]
    output_settings = mix.model_dump(exclude={"workers"})  # worker count changes speed, not the shards
    basis = (refresh.seen_domain.sha256, refresh.heldout_fractions) if refresh else None
    return "pack-" + stable_hash(shards, tok.model.sha256, tok.base_fingerprint, output_settings, basis, PACK_CODE)


@task(
    name="pack-mixed-corpus",
    cache_key_fn=lambda ctx, p: pack_key(p["clean"], p["tok"], p["mix"], p.get("refresh")),
    persist_result=True,
    result_serializer="json",
)
def pack_task(
    clean: CleanManifest,
    tok: TokenizerManifest,
    mix: MixConfig,
    model_cfg: ModelConfig,
    store_uri: str,
    refresh: RefreshBasis | None = None,
) -> PackManifest:
    """Tokenise, hold out eval documents, mix domain and replay text by token share, pack fixed-length sequences.
    With `refresh`: only what is new to the lineage plus a replay share of earlier documents."""
    key = pack_key(clean, tok, mix, refresh)
    check_result_record(store_uri, key)
    store = open_store(store_uri)
    model_dir = store.local_dir(tok.model)
    replay_texts = None
    if clean.general is None and mix.self_replay is not None and mix.general_fraction > 0:
        # Replay preserves the BASE model's distribution: sample before any tokenizer or weight change.
        replay_texts = replay.sample_self_replay(
            load_model(model_cfg), load_tokenizer(model_cfg), mix.self_replay, mix.seed
        )
    with leftovers.temp_dir("pack") as tmp:
        result = pack.pack_corpus(
            store.local_parts(clean.domain),
            store.local_parts(clean.general),
            model_dir,
            mix,
            Path(tmp),
            replay_texts=replay_texts,
            refresh=pack.RefreshSpec(
                seen=store.local_parts(refresh.seen_domain),
                heldout_fractions=refresh.heldout_fractions,
                domain_replay=mix.refresh_domain_replay,
            )
            if refresh
            else None,
        )
        shards = [store.put_file(p, layout.pack_train_shard_key(key, p.name)) for p in result.train_shards]
        evals = {
            kind: store.put_file(p, layout.pack_eval_file_key(key, kind)) if p else None
            for kind, p in result.eval_files.items()
        }
        sample = (
            store.put_file(result.general_sample, layout.pack_general_sample_key(key))
            if result.general_sample
            else None
        )
    report_json = store.put_text(json.dumps(result.report, indent=2, default=str), layout.pack_report_key(key))
    for w in result.warnings:
        get_run_logger().warning("%s", w)
    return PackManifest(
        train_shards=shards,
        eval_domain=evals.get("domain"),
        eval_general=evals.get("general"),
        general_sample=sample,
        seq_len=mix.seq_len,
        sequences=result.sequences,
        tokens=result.tokens,
        general_fraction_target=mix.general_fraction,
        general_fraction_realised=result.general_fraction,
        heldout_fractions=result.heldout_fractions,
        refresh=result.refresh,
        warnings=result.warnings,
        report_json=report_json,
        code_version=PACK_CODE,
    )


def publish_tokenizer_report(tok: TokenizerManifest, store_uri: str) -> None:
    create_markdown_artifact(key="dapt-tokenizer-extension", markdown=open_store(store_uri).read_text(tok.report_md))
