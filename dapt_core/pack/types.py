"""What packing takes and returns: the refresh it may be asked for, its result, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dapt_core.manifest import RefreshCounts

KINDS = ("domain", "general")
REPLAY_SOURCE = "self-replay"
SELF_REPLAY_EVAL_WARNING = (
    "no data.general: the general held-out set is the base model's own samples (mix.self_replay), so general "
    "bits-per-byte and perplexity measure drift from the base model's own distribution, not general knowledge; "
    "add data.general text for a real forgetting signal"
)


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
    warnings: list[str] = field(default_factory=list)  # what the user should know (also in the report)
    report: dict = field(default_factory=dict)  # every figure, for report.json


@dataclass(frozen=True)
class RefreshSpec:
    """A refresh packs what is new, not the whole corpus again: the domain documents absent from `seen` (the cleaned
    domain corpus of the lineage's last success) plus `domain_replay` of the domain tokens from earlier documents
    (key order, so the replayed ones rotate with the seed only), with the lineage's held-out thresholds, so that no
    document ever moves between training and held-out."""

    seen: list[Path]  # its Parquet parts
    heldout_fractions: dict[str, float]
    domain_replay: float
