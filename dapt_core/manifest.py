"""Small pydantic manifests passed between stages: uris, content hashes and counts, never bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field, model_validator

Kind = Literal["domain", "general", "eval"]


class ArtifactRef(BaseModel):
    """An object in the artifact store, with the sha256 that is verified on every read."""

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # also names cached copies: hex only, never a path
    bytes: int


class DirRef(BaseModel):
    """A directory in the artifact store (a model, a tokenizer): its files, each with its own sha256."""

    uri: str
    files: dict[str, ArtifactRef]

    @property
    def sha256(self) -> str:
        """One hash for the whole directory (a cache key for stages that read it)."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}\0{self.files[name].sha256}\n".encode())
        return h.hexdigest()


# Marks a field whose artifacts no later stage reads (kept for resume or inspection): deleting them to free space must
# not make a cached stage run again.
NOT_HANDED_ON = {"handed_on": False}


def artifacts(value: object) -> Iterator[ArtifactRef]:
    """Every stored file a manifest hands on to later stages (a directory by its files), in field order, each once
    (the files of an ingest batch share one shard)."""
    seen: set[str] = set()
    for ref in _all_artifacts(value):
        if ref.uri not in seen:
            seen.add(ref.uri)
            yield ref


def _all_artifacts(value: object) -> Iterator[ArtifactRef]:
    if isinstance(value, ArtifactRef):
        yield value
    elif isinstance(value, DirRef):
        yield from value.files.values()
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            if field.json_schema_extra != NOT_HANDED_ON:
                yield from _all_artifacts(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _all_artifacts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _all_artifacts(item)


class InputFile(BaseModel):
    """One raw input file and the fingerprint that keys its ingest cache."""

    uri: str = Field(description="Local path or s3:// uri.")
    source: str
    kind: Kind
    text_field: str = "text"
    fingerprint: str = Field(description="sha256 of the bytes (local) or the ETag+size (S3).")
    bytes: int


class QuarantineRecord(BaseModel):
    """An input unit (file, line, record) that could not be read as a document, and why."""

    file: str
    source: str = ""
    kind: Kind = "domain"
    position: str = Field(description="Where in the file: 'line 12', 'byte 4096', 'row 7', 'file'.")
    reason: str = Field(description="Machine-readable reason, e.g. malformed_json, invalid_utf8, truncated_gzip.")
    detail: str = ""


class IngestManifest(BaseModel):
    stage: Literal["ingest"] = "ingest"
    input: InputFile
    shard: ArtifactRef | None = Field(None, description="Parquet of the documents read; None when none were.")
    docs: int
    quarantined: list[QuarantineRecord] = Field(default_factory=list)
    code_version: str
    cache_key: str = Field(
        "", description="Per-file cache key (content, settings, code): a later batch reuses the rows."
    )


class FileIngest(BaseModel):
    """One input file of an ingest batch: its documents are the rows of the batch shard whose `file` is its uri."""

    input: InputFile
    docs: int
    quarantined: list[QuarantineRecord] = Field(default_factory=list)
    cache_key: str
    read: bool = Field(description="Read from the input in this batch's run (False: copied from an earlier shard).")


class IngestBatchManifest(BaseModel):
    """One ingest batch. Its per-file records are a Parquet table in the store, not a list here: Prefect walks every
    object a task or flow hands on (~7 us a field), and a manifest of 10,000 file records costs seconds to walk,
    validate and copy at each step of a refresh that reads none of them (`dapt_core.ingest_batches.file_records`)."""

    stage: Literal["ingest-batch"] = "ingest-batch"
    shard: ArtifactRef | None = Field(
        None, description="Parquet of the documents of all files; None when none were read."
    )
    files: ArtifactRef = Field(description="Parquet of the per-file records (FileIngest), one row per input file.")
    file_count: int
    first_uri: str | None = Field(
        None,
        description="The batch's first file in uri order: a later batch looks for a file's earlier record only "
        "in the batches whose uri range holds it. None (a manifest from before): look in this batch's table.",
    )
    last_uri: str | None = Field(None, description="The batch's last file in uri order.")
    docs: int
    quarantined: list[QuarantineRecord] = Field(
        default_factory=list, description="Every unit of the batch's files that could not be read as a document."
    )
    code_version: str


class SourceStats(BaseModel):
    source: str
    kind: Kind
    input_docs: int
    kept_docs: int
    kept_bytes: int
    kept_est_tokens: int
    dropped: dict[str, int]


class KeptCorpus(BaseModel):
    """The kept documents of one kind: Parquet parts (doc_id, text, source, kind, file, position) that read in order
    are the corpus in input order, one part per ingest shard that kept any. Parts, not one file, so that a refresh
    writes the parts of its new shards and reuses the others instead of rewriting the whole corpus."""

    parts: list[ArtifactRef] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_one_file(cls, value: object) -> object:
        """Manifests and lineage states written before the corpus had parts name one file: read it as one part, so an
        existing lineage refreshes after an upgrade."""
        return {"parts": [value]} if isinstance(value, dict) and "uri" in value else value

    @property
    def sha256(self) -> str:
        """One hash for the corpus (a cache key for the stages that read it): its parts' hashes, in order."""
        import hashlib

        h = hashlib.sha256()
        for part in self.parts:
            h.update(f"{part.sha256}\n".encode())
        return h.hexdigest()


class CleanManifest(BaseModel):
    stage: Literal["clean"] = "clean"
    domain: KeptCorpus | None = Field(None, description="Kept domain documents; None when none were kept.")
    general: KeptCorpus | None = Field(None, description="Kept general documents; None when none were kept.")
    decisions: ArtifactRef = Field(description="One row per input document: kept, or dropped with a reason (Parquet).")
    stats_json: ArtifactRef
    stats_md: ArtifactRef
    input_docs: int
    kept_docs: int
    dropped: dict[str, int] = Field(description="Dropped documents per reason; input_docs == kept_docs + sum(dropped).")
    sources: list[SourceStats]
    quarantined: list[QuarantineRecord] = Field(
        default_factory=list,
        description="Every quarantined training input (a file refused at discovery, a line, a record) with where "
        "and why.",
    )
    code_version: str


class NewDocuments(BaseModel):
    """The input files a prepare run read (new or changed since the cache was filled) and what came of them."""

    files: int
    docs: int = Field(description="Input documents of those files.")
    near_duplicates_of_earlier: int = Field(
        description="Of them, dropped as near duplicates of an earlier file's document."
    )
    exact_duplicates_of_earlier: int = Field(
        description="Of them, dropped as exact copies of an earlier file's document."
    )


class PrepareManifest(BaseModel):
    """What `dapt prepare` returns: the clean manifest and what ran vs came from cache."""

    stage: Literal["prepare"] = "prepare"
    store: str
    ingested: list[IngestBatchManifest] = Field(
        description="The training files' ingest batches (per-file records: `ingest_batches.file_records`)."
    )
    evals: list[IngestBatchManifest] = Field(
        default_factory=list, description="The eval sets' ingest batches, ingested for decontamination."
    )
    clean: CleanManifest
    new: NewDocuments | None = Field(None, description="What this run read (None when it read no file).")
    files_read: int = Field(
        0,
        description="Input files (training and eval) this run read; which ones: the `read` flag of the per-file "
        "records. Counts, not lists: the flow's result is walked by Prefect, ~10 us an item.",
    )
    files_reused: int = Field(0, description="Input files whose rows came from earlier work.")
    computed: list[str] = Field(description="Stages that did work in this run: 'ingest' (a file was read), 'clean'.")
    cached: list[str] = Field(description="Stages answered from earlier work: 'ingest' (a file's rows), 'clean'.")


class ExtensionCost(BaseModel):
    """What the tokenizer extension costs before any training: bits per byte of the original base (base tokenizer)
    and of the extended, untrained model on the same held-out texts (bpb does not depend on the tokenizer)."""

    init: str = Field(description="How the new rows were initialised (tokenizer.init).")
    domain_docs: int
    domain_bpb_original: float
    domain_bpb_extended: float
    general_docs: int = 0
    general_bpb_original: float | None = Field(None, description="None when there is no general held-out text.")
    general_bpb_extended: float | None = None

    @property
    def domain_ratio(self) -> float:
        """Extended / original domain bpb: 1.0 means the extension costs nothing before training."""
        return self.domain_bpb_extended / self.domain_bpb_original


class TokenizerManifest(BaseModel):
    """The (possibly extended) tokenizer and the resized, initialised model, saved together as one HF directory."""

    stage: Literal["tokenizer"] = "tokenizer"
    model: DirRef
    base_fingerprint: str
    new_tokens: int
    new_token_ids: list[int] = Field(
        default_factory=list,
        description="Ids of every vocabulary entry the extension added (intermediate merge tokens included): the "
        "rows LoRA trains.",
    )
    report_json: ArtifactRef
    report_md: ArtifactRef
    code_version: str


class RefreshCounts(BaseModel):
    """What a refresh packed: the domain documents new to its lineage, and earlier ones replayed beside them."""

    new_documents: int = Field(description="Packed domain documents that are not in the lineage's last corpus.")
    new_tokens: int
    replayed_documents: int = Field(description="Earlier domain documents packed again (mix.refresh_domain_replay).")
    replayed_tokens: int


class RefreshBasis(BaseModel):
    """What a refresh packs against: the lineage's last cleaned domain corpus and its held-out thresholds."""

    seen_domain: KeptCorpus = Field(description="Cleaned domain corpus of the lineage's last success.")
    heldout_fractions: dict[str, float] = Field(description="Held-out threshold per kind, fixed for the lineage.")


class PackManifest(BaseModel):
    stage: Literal["pack"] = "pack"
    train_shards: list[ArtifactRef] = Field(
        description="Parquet shards: input_ids and document boundaries per sequence."
    )
    eval_domain: ArtifactRef | None = Field(None, description="Held-out domain documents, JSONL {'text': ...}.")
    eval_general: ArtifactRef | None = Field(None, description="Held-out general documents, JSONL {'text': ...}.")
    general_sample: ArtifactRef | None = Field(
        None, description="General training sequences (Parquet) for the EWC Fisher."
    )
    seq_len: int
    sequences: int
    tokens: dict[str, int] = Field(description="Training tokens per source (after upsampling/subsetting).")
    general_fraction_target: float
    general_fraction_realised: float
    heldout_fractions: dict[str, float] = Field(default_factory=dict, description="Held-out threshold used per kind.")
    refresh: RefreshCounts | None = Field(None, description="A refresh: new vs replayed domain documents and tokens.")
    warnings: list[str] = Field(
        default_factory=list, description="What the user should know about the data (e.g. self-replay eval)."
    )
    report_json: ArtifactRef
    code_version: str


class TrainingDataManifest(BaseModel):
    """What `dapt pack` returns: the data, tokenizer and packing manifests, and what ran vs came from cache."""

    stage: Literal["training-data"] = "training-data"
    prepare: PrepareManifest
    tokenizer: TokenizerManifest
    pack: PackManifest
    refresh_basis: RefreshBasis | None = Field(
        None, description="A refresh packed against this (a rollback re-packs the same way)."
    )
    computed: list[str]
    cached: list[str]


class CheckpointDecision(BaseModel):
    """The forgetting policy's verdict on one checkpoint of a CPT attempt, with the numbers it was judged on."""

    attempt: int
    step: int
    accepted: bool
    reasons: list[str] = Field(default_factory=list, description="Why it was rejected (empty when accepted).")
    numbers: dict[str, float] = Field(
        default_factory=dict,
        description="The policy's numbers: reference and checkpoint values, increases, benchmark drops, p-values.",
    )
    metrics: dict[str, float] = Field(
        description="The checkpoint's evaluation (dapt_core.evaluate.EvalResult.metrics)."
    )
    backend: str = Field(description="Evaluation backend: lm-eval or native.")
    checkpoint: str = Field(description="Store uri of the checkpoint (weights, optimizer, scheduler, data position).")
    trails_original: list[str] = Field(
        default_factory=list,
        description="Why it does not beat the original base on the domain (dapt_core/gain.py); empty when it does. "
        "Only a checkpoint that is accepted AND beats the original can be promoted.",
    )

    def p_values(self) -> dict[str, float]:
        """{benchmark name: p-value of the paired test of its difference from the reference}."""
        return {k.split("/", 1)[1]: v for k, v in self.numbers.items() if k.startswith("p_value bench/")}


class AttemptSummary(BaseModel):
    """One attempt of a CPT flow run (the first run, or a rollback continuing from the best accepted checkpoint)."""

    attempt: int
    lr: float
    general_fraction: float
    accepted: bool
    best_step: int | None = None
    stopped_at: int | None = None
    start_model: str
    continued_from: str | None = None
    promoted: str | None = None
    without_extension: bool = Field(False, description="A tokenizer.on_no_gain retry with the base tokenizer.")
    decisions: list[CheckpointDecision]
    report_md: str


class Continuation(BaseModel):
    """Where a rollback attempt continues from: the best accepted checkpoint so far (dapt_core/continuation.py)."""

    checkpoint: DirRef = Field(
        description="The best accepted checkpoint: weights, optimizer, scheduler, RNG, data position."
    )
    data: list[ArtifactRef] = Field(
        description="The shards the checkpoint's data position indexes (what it trained on)."
    )
    data_general_fraction: float = Field(ge=0, lt=1, description="Replay share of `data`.")
    general_fraction: float = Field(ge=0, lt=1, description="The raised replay share of the data not yet seen.")
    source: str = Field(description="'attempt <a> step <s>', for logs and the report.")


class ContinuationData(BaseModel):
    """What the continuation trains on, counted."""

    unseen_sequences: int = Field(description="Sequences of the earlier data after the checkpoint's data position.")
    replay_sequences: int = Field(description="General-only sequences added to raise the replay share.")
    resume_step: int
    total_steps: int


class DomainGain(BaseModel):
    """Whether CPT beat the original base on the domain (dapt_core/gain.py), what the tokenizer extension cost, and when
    training paid it back."""

    metric: str = Field(description="eval.primary_metric (domain bits per byte by default).")
    original: float | None = Field(description="The original base model, before tokenizer extension.")
    extended_base: float | None = Field(None, description="The extended model before training (None: no extension).")
    extension_cost: float | None = Field(
        None, description="extended_base - original: what the extension costs before any training."
    )
    best_accepted: float | None = Field(None, description="The best checkpoint that passed the forgetting policy.")
    promoted: float | None = Field(None, description="The promoted checkpoint (None: nothing promoted).")
    break_even_attempt: int | None = None
    break_even_step: int | None = Field(
        None, description="First checkpoint (oldest first) whose metric beats the original base."
    )
    verdict: Literal["gain", "no gain", "nothing accepted"]
    reasons: list[str] = Field(default_factory=list, description="Why nothing was promoted, with the numbers.")


class CptManifest(BaseModel):
    """One CPT attempt (train, evaluate every checkpoint against the original base, promote the best accepted one that
    beats the original base on the domain); the flow adds every attempt of a rollback sequence in `attempts`."""

    stage: Literal["cpt"] = "cpt"
    accepted: bool = Field(description="True when at least one checkpoint passed the forgetting policy.")
    promoted: DirRef | None = Field(None, description="Best accepted checkpoint, LoRA merged: a loadable HF directory.")
    adapter: DirRef | None = Field(None, description="The promoted LoRA adapter alone (train.save_adapter).")
    best_step: int | None = None
    stopped_at: int | None = Field(None, description="Step of the first rejected checkpoint, where training stopped.")
    decisions: list[CheckpointDecision] = Field(description="Every judged checkpoint of this attempt, oldest first.")
    checkpoints: list[DirRef] = Field(default_factory=list, json_schema_extra=NOT_HANDED_ON)
    base_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="The model CPT starts from (the extended base) on the same evaluation: reported.",
    )
    reference_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="The forgetting policy's reference: the original base model before tokenizer extension.",
    )
    report_json: ArtifactRef
    report_md: ArtifactRef
    report_png: ArtifactRef
    tensorboard: DirRef | None = Field(
        None,
        description="TensorBoard event files (train loss/LR, eval metrics per checkpoint).",
        json_schema_extra=NOT_HANDED_ON,
    )
    start_model: str = Field(
        "", description="The model this attempt started from: the extended base or a rolled-back-to checkpoint."
    )
    attempt: int
    lr: float
    general_fraction: float
    attempts: list[AttemptSummary] = Field(
        default_factory=list, description="Every attempt of the flow run, oldest first."
    )
    gain: DomainGain | None = Field(
        None, description="Against the original base on the domain: promoted only on a gain."
    )
    trained_on: list[ArtifactRef] = Field(
        default_factory=list,
        description="The shards this attempt trained on (the pack's, or a rollback's continuation data).",
        json_schema_extra=NOT_HANDED_ON,
    )
    continued_from: str | None = Field(
        None, description="A rollback: 'attempt <a> step <s>', the checkpoint it continued from."
    )
    continuation: ContinuationData | None = Field(None, description="A rollback: what it trained on, counted.")
    warnings: list[str] = Field(
        default_factory=list, description="What to know before trusting the verdict (e.g. a self-replay run)."
    )
    without_extension: TrainingDataManifest | None = Field(
        None,
        description="tokenizer.on_no_gain retry_without_extension ran: the training data (base tokenizer) this "
        "result was trained on, which later stages (SFT, the lineage's state) use instead of the extended one.",
    )
    code_version: str

    def decision_at(self, step: int | None) -> CheckpointDecision | None:
        """This attempt's decision of checkpoint `step` (None for None or a step it did not judge)."""
        return next((d for d in self.decisions if d.step == step), None)

    @property
    def best(self) -> CheckpointDecision | None:
        """The decision of the promoted checkpoint (None when nothing was promoted)."""
        return self.decision_at(self.best_step) if self.promoted is not None else None


class SftManifest(BaseModel):
    """Supervised fine-tuning of the promoted CPT model, judged by the same forgetting policy plus response metrics."""

    stage: Literal["sft"] = "sft"
    model: DirRef = Field(description="The SFT model (LoRA merged): a loadable HF directory with its tokenizer.")
    examples: int
    heldout_examples: int
    response_before: dict[str, float] = Field(description="Held-out response loss / token accuracy of the CPT model.")
    response_after: dict[str, float] = Field(description="The same after SFT.")
    eval_metrics: dict[str, float] = Field(description="Forgetting evaluation of the SFT model (same tasks as CPT).")
    accepted: bool = Field(description="The SFT model passes the forgetting policy against the original base.")
    reasons: list[str] = Field(default_factory=list)
    numbers: dict[str, float] = Field(
        default_factory=dict, description="The policy's numbers (benchmark drops and p-values)."
    )
    code_version: str


class PipelineManifest(BaseModel):
    """One run of the whole DAG: what each stage produced, the model to use, and the final report."""

    stage: Literal["pipeline"] = "pipeline"
    project: str
    data: TrainingDataManifest
    cpt: CptManifest
    sft: SftManifest | None = None
    final_model: DirRef | None = Field(
        None, description="SFT model when SFT ran and passed, else the promoted CPT model."
    )
    report_md: ArtifactRef
    report_json: ArtifactRef
    plots: dict[str, ArtifactRef] = Field(default_factory=dict)
    refresh_of: str | None = Field(None, description="Nightly refresh: the promoted model this run continued from.")


class RunState(BaseModel):
    """The last success of a lineage (runs/<project>/lineages/<lineage>/last-success.json): what its next refresh
    compares against and continues from. Only runs of that lineage advance it, and never to an older model."""

    lineage: str
    generation: int = Field(0, description="0 for a full run from the base; each refresh that trained adds 1.")
    inputs: dict[str, str] = Field(
        description="Input uri -> content fingerprint (domain, general, eval) of the last successful run."
    )
    config_hash: str = Field(description="Hash of the config sections that change results; a change means a full run.")
    tokenizer: TokenizerManifest = Field(description="The tokenizer (and extended base) every refresh keeps.")
    promoted: DirRef = Field(description="The last promoted CPT model: the next refresh continues from it.")
    refresh_basis: RefreshBasis | None = Field(
        None, description="The corpus and held-out thresholds the next refresh packs against."
    )
    report_md: ArtifactRef
