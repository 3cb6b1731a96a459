"""Where everything lives in the artifact store: one function per key, so that no other module spells a store path.

Keys are relative to the store's root (a local directory or an s3:// prefix). A stage's outputs live under its
content key (`<stage>-<sha256>` hashes of its inputs, config and code), so a changed input writes somewhere new and a
finished stage is never overwritten; `runs/<project>/` holds the small run manifests that point into them.

    <store>/
    ├── ingest/<kind>/<source>/<batch key>.parquet     ingest_shard_key: one ingest batch's documents
    ├── ingest/<kind>/<source>/<batch key>.files.parquet   ingest_files_key: its per-file records
    ├── clean/<clean key>/                             clean_prefix: the clean stage's report
    │   └── decisions.parquet, stats.json, stats.md
    ├── clean/parts/<part hash>/                       clean_part_prefix: a shard's clean parts, its dedup scatter,
    │                                                  a run's near-duplicate clusters, or a shard's part of the kept
    │                                                  corpus (kept.parquet, listed in order by CleanManifest)
    ├── tokenizer/<tokenizer key>/                     tokenizer_prefix
    │   ├── model/                                     tokenizer_model_key: extended tokenizer (+ resized model)
    │   └── report.json, report.md                     tokenizer_report_key
    ├── pack/<pack key>/                               pack_prefix
    │   ├── train/train-00000.parquet, ...             pack_train_shard_key: packed training sequences
    │   ├── eval/domain.jsonl, eval/general.jsonl      pack_eval_file_key: held-out evaluation text
    │   ├── general-sample.parquet                     pack_general_sample_key: general text for the EWC Fisher
    │   └── report.json                                pack_report_key
    ├── cpt/<cpt key>/                                 cpt_attempt_prefix: one CPT attempt
    │   ├── journal.json                               journal_key: decisions so far (what a resume trusts)
    │   ├── spec.json                                  attempt_spec_key: the attempt, for the other nodes of a launch
    │   ├── checkpoints/checkpoint-<step>/             checkpoint_key: every judged or interrupted checkpoint
    │   ├── continuation/                              continuation_shard_key: a rollback's unseen data + replay
    │   ├── tensorboard/                               tensorboard_key
    │   ├── promoted/, promoted-adapter/               promoted_key, promoted_adapter_key: the accepted model
    │   └── report/<file>                              attempt_report_key: the forgetting report
    ├── sft/<sft key>/                                 sft_attempt_prefix: journal.json and checkpoints/ as CPT's
    │   └── model/                                     sft_model_key
    ├── runs/<project>/
    │   ├── <stage>-latest.json                        latest_manifest_key: last success of a flow (`dapt verify`)
    │   ├── lineages/<lineage>/last-success.json       lineage_state_key: what a lineage's next refresh builds on
    │   ├── cpt-results/<hash>.json                    cpt_result_key: CPT's manifest when it runs as a deployment
    │   └── reports/<run key>/<file>                   run_report_key: the pipeline report
    └── prefect-results/<stage>-<sha256>               result_record_key: Prefect's cached task results
"""

from __future__ import annotations

RESULTS_PREFIX = "prefect-results"


def ingest_shard_key(kind: str, source: str, key: str) -> str:
    return f"ingest/{kind}/{source}/{key}.parquet"


def ingest_files_key(kind: str, source: str, key: str) -> str:
    return f"ingest/{kind}/{source}/{key}.files.parquet"


def clean_prefix(key: str) -> str:
    return f"clean/{key}"


def clean_part_prefix(part_hash: str) -> str:
    """Files kept for a refresh: a shard's per-document clean pass (docs, MinHash signatures, LSH band keys) or its
    dedup scatter (`dapt_core/clean/parts.py`), the near-duplicate clusters of a run's shards
    (`dapt_core/clean/dedup.py`), or a shard's part of the kept corpus (`dapt_core/clean/pipeline.py`)."""
    return f"clean/parts/{part_hash}"


def tokenizer_prefix(key: str) -> str:
    return f"tokenizer/{key}"


def tokenizer_model_key(key: str) -> str:
    return f"{tokenizer_prefix(key)}/model"


def tokenizer_report_key(key: str, suffix: str) -> str:
    """`suffix`: "json" or "md"."""
    return f"{tokenizer_prefix(key)}/report.{suffix}"


def pack_prefix(key: str) -> str:
    return f"pack/{key}"


def pack_train_shard_key(key: str, name: str) -> str:
    return f"{pack_prefix(key)}/train/{name}"


def pack_eval_file_key(key: str, kind: str) -> str:
    return f"{pack_prefix(key)}/eval/{kind}.jsonl"


def pack_general_sample_key(key: str) -> str:
    return f"{pack_prefix(key)}/general-sample.parquet"


def pack_report_key(key: str) -> str:
    return f"{pack_prefix(key)}/report.json"


def cpt_attempt_prefix(key: str) -> str:
    return f"cpt/{key}"


def sft_attempt_prefix(key: str) -> str:
    return f"sft/{key}"


def journal_key(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/journal.json"


def attempt_spec_key(attempt_prefix: str) -> str:
    """The AttemptSpec node 0 writes when train.nnodes > 1; the other nodes' torchrun reads it (`<store>#<key>`)."""
    return f"{attempt_prefix}/spec.json"


def checkpoint_key(attempt_prefix: str, name: str) -> str:
    """`name`: the checkpoint's folder name (`checkpoint-<step>`)."""
    return f"{attempt_prefix}/checkpoints/{name}"


def continuation_shard_key(attempt_prefix: str, name: str) -> str:
    """A rollback's training data: what its checkpoint had not seen plus replay (dapt_core/continuation.py)."""
    return f"{attempt_prefix}/continuation/{name}"


def tensorboard_key(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/tensorboard"


def promoted_key(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/promoted"


def promoted_adapter_key(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/promoted-adapter"


def attempt_report_key(attempt_prefix: str, name: str) -> str:
    return f"{attempt_prefix}/report/{name}"


def sft_model_key(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/model"


def project_prefix(project: str) -> str:
    return f"runs/{project}"


def input_fingerprints_key(project: str) -> str:
    """The input files' fingerprints at the project's last discovery, with their size, mtime and inode."""
    return f"{project_prefix(project)}/input-fingerprints.parquet"


def latest_manifest_key(project: str, stage: str) -> str:
    """The manifest of the project's last successful run of a stage's flow (what `dapt verify` checks)."""
    return f"{project_prefix(project)}/{stage}-latest.json"


def lineages_prefix(project: str) -> str:
    return f"{project_prefix(project)}/lineages"


def lineage_state_key(project: str, lineage: str) -> str:
    return f"{lineages_prefix(project)}/{lineage}/last-success.json"


def cpt_results_prefix(project: str) -> str:
    return f"{project_prefix(project)}/cpt-results"


def cpt_result_key(project: str, content_hash: str) -> str:
    return f"{cpt_results_prefix(project)}/{content_hash}.json"


def run_report_key(project: str, run_key: str, name: str) -> str:
    return f"{project_prefix(project)}/reports/{run_key}/{name}"


def result_record_key(cache_key: str) -> str:
    return f"{RESULTS_PREFIX}/{cache_key}"
