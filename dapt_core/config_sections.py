"""The sections of the YAML config (dapt_core/config.py): one pydantic model per stage, every field described.

Defaults encode the rules of thumb of domain-adaptive pretraining (see README, "Defaults and why").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Names that become part of store keys (runs/<project>/..., ingest/<kind>/<source>/...): a letter or digit, then
# letters, digits, '_', '.', '-'; never '..', so no name can lead out of the store.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


def _no_parent_reference(name: str) -> str:
    if ".." in name:
        raise ValueError(f"must not contain '..' (names become part of store paths); got {name!r}")
    return name


StoreName = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_no_parent_reference)]


class Section(BaseModel):
    """A config section: an unknown key is an error (with a "did you mean" hint from load_config)."""

    model_config = ConfigDict(extra="forbid")


class SourceConfig(Section):
    """One named corpus: local paths/globs and/or s3:// prefixes."""

    name: StoreName = Field(
        description="Source name, kept as lineage on every document and part of store keys (e.g. 'pubmed'): a letter "
        "or digit, then letters, digits, '_', '.', '-' (no '..')."
    )
    paths: list[str] = Field(min_length=1, description="Files, directories, globs (**/*.txt) or s3://bucket/prefix.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.parquet inputs.")


class DataConfig(Section):
    domain: list[SourceConfig] = Field(min_length=1, description="Domain corpora to adapt to.")
    general: list[SourceConfig] = Field(
        default_factory=list, description="General 'replay' corpora that protect against forgetting."
    )
    eval: list[SourceConfig] = Field(
        default_factory=list,
        description="Evaluation sets to decontaminate against: training docs sharing an n-gram with them are dropped.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.domain + self.general + self.eval]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique across domain, general and eval, repeated: {dupes}")
        return self


class IngestConfig(Section):
    max_doc_bytes: int = Field(
        8_000_000, gt=0, description="Documents (or JSON lines) larger than this are quarantined, not loaded."
    )
    shard_docs: int = Field(20_000, gt=0, description="Documents per Parquet row group written by ingest.")
    batch_bytes: int = Field(4_000_000, gt=0, description="Input bytes per ingest task and shard, about.")
    batch_files: int = Field(
        1_000, gt=0, description="Input files per ingest task and shard, about, when files are small."
    )


class PrepareConfig(Section):
    """Where the data stages run (dapt_core/engine.py); both engines give the same decisions and corpora."""

    engine: Literal["local", "ray"] = Field("local", description="local: this process. ray: tasks on a Ray cluster.")
    ray_address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or host:6379); default RAY_ADDRESS."
    )
    ray_max_retries: int = Field(3, ge=0, description="Times Ray re-runs a task whose worker process or node died.")
    rehash_inputs: bool = Field(
        False,
        description="sha256 every local input file on every run. Default: a file whose size, mtime and inode are "
        "those of its last hashing keeps that fingerprint (trusting mtime, as rsync and make do).",
    )


class NormalizeConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = Field("NFKC", description="Unicode normalisation form.")
    collapse_whitespace: bool = Field(
        True, description="Collapse runs of spaces/tabs, trim lines, squeeze 3+ newlines to 2."
    )


class QualityConfig(Section):
    """Gopher (Rae et al. 2021) and C4 style document filters; set a threshold to null to disable it."""

    min_words: int | None = Field(50, description="Drop documents with fewer words.")
    max_words: int | None = Field(200_000, description="Drop documents with more words.")
    min_mean_word_length: float | None = Field(3.0, description="Gopher: mean word length lower bound.")
    max_mean_word_length: float | None = Field(10.0, description="Gopher: mean word length upper bound.")
    max_symbol_word_ratio: float | None = Field(0.1, description="Gopher: ('#' + '...' + '…') per word.")
    max_ellipsis_line_fraction: float | None = Field(
        0.3, description="Gopher: fraction of lines ending in an ellipsis."
    )
    max_bullet_line_fraction: float | None = Field(0.9, description="Gopher: fraction of lines starting with a bullet.")
    min_alpha_word_fraction: float | None = Field(
        0.8, description="Gopher: fraction of words with an alphabetic character."
    )
    max_duplicate_line_fraction: float | None = Field(
        0.3, description="Gopher: fraction of lines that repeat an earlier line."
    )
    max_top_ngram_char_fraction: float | None = Field(
        0.2,
        description="Gopher: characters covered by the most frequent word 2-gram (3- and 4-grams use 0.18/0.16 scaled "
        "alike).",
    )
    max_duplicate_ngram_char_fraction: float | None = Field(
        0.15,
        description="Gopher: characters in repeated word 5-grams (6..10-grams use a linearly lower bound down to 2/3 "
        "of it).",
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop exact duplicates of the normalised text (first occurrence kept).")
    near: bool = Field(True, description="Drop near duplicates found with MinHash LSH.")
    shingle_size: int = Field(5, ge=1, le=64, description="Words per shingle.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    bands: int = Field(16, ge=1, description="LSH bands (bands * rows <= num_perm).")
    rows: int = Field(8, ge=1, description="LSH rows per band.")
    jaccard_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity at which a candidate pair is a duplicate."
    )
    seed: int = Field(1, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows ({self.bands}*{self.rows}) must be <= num_perm ({self.num_perm})")
        return self


class DecontaminationConfig(Section):
    ngram: int = Field(
        13,
        ge=4,
        le=64,
        description="Drop a training doc sharing any word n-gram of this size with the eval texts (n-grams without a "
        "letter are ignored).",
    )


class CleanConfig(Section):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    duckdb_memory_limit: str = Field(
        "512MB", description="DuckDB memory limit; it spills to disk beyond it (peak RSS is about 0.5 GB plus this)."
    )


class ModelConfig(Section):
    base: str | None = Field(None, description="Base model: local HF directory (or hub id when online).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `base` to load from.")
    tokenizer: str | None = Field(None, description="Tokenizer directory (defaults to `base`).")
    params: float | None = Field(
        None, gt=0, description="Parameter count, for `dapt plan` when no model is given (e.g. 7e9)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint; off unless you trust it."
    )


NewRowInit = Literal["mean", "seqprob", "last_piece", "last_piece_seqprob"]  # dapt_core/embedding.py


class TokenizerConfig(Section):
    """Extend the base tokenizer with frequent domain terms it splits into several pieces."""

    enabled: bool = Field(
        True, description="Turn tokenizer extension on or off (worth it for terminology-dense domains)."
    )
    domain_vocab_size: int = Field(
        16_000, ge=256, description="Vocabulary size of the domain BPE trained on the kept domain docs."
    )
    max_new_tokens: int = Field(1_000, ge=0, description="Cap on tokens added to the base tokenizer.")
    min_frequency: int = Field(20, ge=1, description="Minimum occurrences of a candidate in the domain corpus.")
    min_chars: int = Field(4, ge=2, description="Minimum length of a candidate (without the leading-space marker).")
    init: NewRowInit = Field(
        "seqprob",
        description="New rows: mean of the pieces' rows; seqprob (the measured best on SmolLM2, never worse than mean "
        "on the tiny models): output rows raised toward the base's probability of the piece sequence; last_piece: "
        "input rows from the base's state at the term's last piece; last_piece_seqprob: both. Measured in "
        "bench/extension.py (bench/README.md).",
    )
    init_layer: int = Field(
        0, ge=0, description="last_piece init: residual-stream layer (0: the last piece's own input row)."
    )
    on_no_gain: Literal["report", "retry_without_extension"] = Field(
        "report",
        description="When CPT of the extended model promotes nothing (no checkpoint beats the original base on the "
        "domain, or none passed the forgetting policy): report it and promote nothing, or run packing and CPT again "
        "with the base tokenizer and promote that model if it beats the original. Not part of the tokenizer stage's "
        "cache key.",
    )


class SelfReplayConfig(Section):
    """Replay text sampled from the base model itself, for users without a general corpus."""

    tokens: int = Field(200_000, ge=0, description="Tokens of text to sample.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=16, description="Tokens per sampled document.")
    batch_size: int = Field(16, ge=1)


class MixConfig(Section):
    general_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Token share of general replay text: 0.05 is near the Pareto frontier, ~0.15 for distant domains.",
    )
    seq_len: int = Field(1024, ge=16, description="Tokens per packed training sequence.")
    seed: int = Field(0, description="Seed of the document shuffle and the held-out split.")
    heldout_fraction: float = Field(
        0.02, ge=0, lt=0.5, description="Share of documents held out (per kind) for evaluation."
    )
    max_heldout_docs: int = Field(500, ge=1, description="Cap on held-out documents per kind.")
    document_separator: str | None = Field(
        None,
        description="Token after each document (default: the tokenizer's eos_token). Instruct models often use a chat "
        "end token as eos (SmolLM2: <|im_end|>); set the pretraining end-of-text token (e.g. <|endoftext|>) for CPT.",
    )
    shard_sequences: int = Field(8_192, ge=1, description="Packed sequences per output shard.")
    general_sample_sequences: int = Field(
        1000, ge=0, description="General training sequences written aside for the EWC Fisher estimate (train.ewc)."
    )
    workers: int = Field(0, ge=0, description="Tokenizer worker processes (0: one per CPU core).")
    refresh_domain_replay: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Nightly refresh: share of the domain tokens taken from earlier documents; the rest are the newly "
        "kept documents (a refresh trains on what is new, not on the whole corpus again).",
    )
    self_replay: SelfReplayConfig | None = Field(
        None, description="Sample replay text from the base model when data.general is empty (see README: trade-offs)."
    )


class PlanConfig(Section):
    gpu: str = Field(
        "A100",
        description="GPU for the compute estimate: A100, H100, H200, L4, A10G, RTX4090, or a number of bf16 TFLOP/s.",
    )
    mfu: float = Field(0.4, gt=0, le=1, description="Model FLOPs utilisation assumed for the estimate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the mixed corpus.")
    method: Literal["full", "lora"] = Field("full", description="Training method for the estimate.")


class LoraTrainConfig(Section):
    """LoRA adapters for `train.method: lora` (rank 64 on all projections, alpha 128, dropout 0: see README)."""

    r: int = Field(64, ge=1, description="Adapter rank.")
    alpha: float = Field(128.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters (all attention and MLP projections of Llama-style models).",
    )


class EWCConfig(Section):
    """Elastic weight consolidation: loss + (lambda/2) * sum_i F_i (theta_i - theta*_i)^2, F = diagonal Fisher on
    general text."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = Field(
        False, description="Add the EWC penalty (an option; replay mixing is the default protection)."
    )
    lambda_: float = Field(
        10.0,
        ge=0,
        alias="lambda",
        description="Penalty strength; F is per-sample (summed log-likelihood), 10 from the sweep in bench/ewc.py "
        "(bench/README.md).",
    )
    fisher_samples: int = Field(
        1000, ge=1, description="General sequences used to estimate the diagonal Fisher (1,000-5,000)."
    )


class TrainConfig(Section):
    """Continual pretraining (dapt_core/train/). `dapt plan` warns when lr is outside the usual CPT range 1e-5..5e-5."""

    # Fields that say where and how the training runs, not what it trains: left out of the CPT and SFT cache keys and
    # of DaptConfig.result_hash (every node of a multi-node launch must compute the same key). nproc_per_node and
    # nnodes stay in: batch_size is per process, so they set the global batch.
    NOT_TRAINED: ClassVar[frozenset[str]] = frozenset(
        {"stop_grace_s", "isolate", "node_rank", "rdzv_endpoint", "rdzv_id", "data_workers"}
    )

    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA adapters.")
    lr: float = Field(2e-5, ge=1e-6, le=1e-3, description="Peak learning rate (CPT: 1e-5 to 5e-5).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this fraction of the peak LR.")
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to biases and norm weights).")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (null: no clipping).")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; null: derived from `epochs`.")
    epochs: float = Field(1.0, gt=0, description="Passes over the packed sequences when max_steps is null.")
    save_every: int = Field(500, ge=1, description="Checkpoint every this many optimizer steps (and at the end).")
    seed: int = Field(0, description="Seed of the data order and of torch/numpy/python RNGs.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    block_cross_document_attention: bool = Field(
        False,
        description="Per-document position ids and a block-diagonal causal mask from `doc_lengths` (no attention "
        "across documents).",
    )
    train_embeddings: bool = Field(
        False,
        description="LoRA: also train embed_tokens and lm_head in full (every row; each checkpoint stores both "
        "matrices).",
    )
    train_new_tokens: bool = Field(
        True,
        description="LoRA: train the rows of the tokens the tokenizer extension added (input embeddings and an untied "
        "lm_head), and only those rows.",
    )
    lora: LoraTrainConfig = Field(default_factory=LoraTrainConfig)
    save_adapter: bool = Field(
        False, description="LoRA: also store the promoted adapter on its own (peft format), beside the merged model."
    )
    ewc: EWCConfig = Field(default_factory=EWCConfig)
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Training loggers: TensorBoard event files in <attempt>/tensorboard of the store ([] for none).",
    )
    log_every: int = Field(10, ge=1, description="Log loss / LR / grad norm / tokens per second every this many steps.")
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="GPUs per node: > 1 launches the CPT attempt with torchrun (train.strategy, one process per GPU).",
    )
    isolate: bool = Field(
        False,
        description="Run the attempt in a fresh child process (`python -m dapt_core.cpt`; SFT: `dapt_core.sft`), so "
        "the memory of earlier stages (libraries' heap, evaluations) is not under the training peak; it is all "
        "returned at its end.",
    )
    stop_grace_s: float = Field(
        60.0,
        gt=0,
        description="On SIGTERM / SIGINT / a cancel: seconds to finish the current optimizer step and save a "
        "resumable checkpoint before the process exits anyway (a spot preemption gives 30-120 s; Prefect's runner "
        "30 s).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several processes: ddp replicates the model and AdamW state on every GPU (~16 bytes per "
        "parameter); fsdp (FSDP2) shards them over the GPUs, bf16 compute with fp32 reduction on CUDA (what 7B+ "
        "full CPT needs).",
    )
    nnodes: int = Field(1, ge=1, description="Nodes of the torchrun launch (> 1: c10d rendezvous at rdzv_endpoint).")
    node_rank: int | None = Field(
        None,
        ge=0,
        description="Pin this node's index 0..nnodes-1 (null: the c10d rendezvous numbers the nodes as they join, "
        "so every node runs the same config; torchrun's PET_NODE_RANK also sets it).",
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]+$",
        description="host:port every node reaches for the c10d rendezvous (node 0's address), when nnodes > 1.",
    )
    rdzv_id: str = Field(
        "dapt-cpt", pattern=r"^[A-Za-z0-9_.\-]+$", description="Rendezvous id: unique per concurrent multi-node run."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel. flash_attention_2 needs the flash-attn package and a CUDA GPU; with "
        "block_cross_document_attention its micro-batch is flattened into one row (varlen), so documents stay apart.",
    )
    compile: bool = Field(False, description="torch.compile the model (faster steps on GPU after a compile warm-up).")
    data_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes preparing micro-batches ahead of the step (null: 2 on CUDA, 0 on "
        "CPU).",
    )

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainConfig:
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank {self.node_rank} must be below train.nnodes {self.nnodes} (0-based)")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                "train.nnodes > 1 needs train.rdzv_endpoint: host:port of node 0, reachable from every node"
            )
        return self


class BenchmarkConfig(Section):
    """A multiple-choice benchmark: a local JSONL/Parquet file read through a field mapping, or an lm-eval task name
    (needs the dataset in the HF cache or a network). Scored like lm-eval's multiple_choice: acc and acc_norm."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$",
        description="Benchmark name in metrics and reports (letters, digits, '_').",
    )
    kind: Literal["general", "domain"] = Field(
        description="general: a drop past eval.max_general_benchmark_drop that is significant rejects a checkpoint; "
        "domain: reported."
    )
    path: str | None = Field(None, description="Local .jsonl or .parquet file (one item per line/row).")
    task: str | None = Field(None, description="Or an lm-eval task name (a multiple-choice task with acc / acc_norm).")
    question_field: str = Field("question", description="Field with the question (or the context to complete).")
    passage_field: str | None = Field(None, description="Optional field with a passage shown before the question.")
    choices_field: str | None = Field(
        "choices",
        description="Field with the choices: a list of strings, or one string of lettered options 'A. …\\nB. …'.",
    )
    choices: list[str] | None = Field(
        None, min_length=2, description="Fixed choices for every item (e.g. [yes, no, maybe]); replaces choices_field."
    )
    answer_field: str = Field("answer", description="Field with the right answer.")
    answer_format: Literal["auto", "letter", "index", "text"] = Field(
        "auto",
        description="The answer as a letter ('B', 'B. text'), a 0-based index, or the choice's text; auto: whichever "
        "fits.",
    )
    prompt: Literal["question_answer", "completion"] = Field(
        "question_answer",
        description="question_answer: '[passage\\n]Question: <question>\\nAnswer:' then each choice; completion: the "
        "choice continues the question text directly (sentence-completion sets such as HellaSwag).",
    )
    limit: int | None = Field(200, ge=1, description="Items evaluated: a seeded random subsample (null: all).")
    seed: int = Field(0, description="Seed of the subsample.")

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkConfig:
        if (self.path is None) == (self.task is None):
            raise ValueError(
                f"benchmark {self.name}: set exactly one of path (a local file) or task (an lm-eval task name)"
            )
        return self


class EvalConfig(Section):
    """Forgetting evaluation (dapt_core/evaluate.py), its gate and rollback (dapt_core/forgetting.py); thresholds from
    DAPT-FACTS."""

    max_general_ppl_increase: float = Field(
        0.15,
        ge=0,
        description="Reject a checkpoint whose general perplexity rose more than this fraction over the original base.",
    )
    max_general_probe_drop: float = Field(
        3.0, ge=0, description="Reject (diagnose) when a general probe lost more than this many points."
    )
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list,
        description="Multiple-choice benchmarks (general and domain); their items are also added to decontamination.",
    )
    max_general_benchmark_drop: float = Field(
        3.0,
        ge=0,
        description="Reject a checkpoint when a general benchmark lost more than this many points AND the drop is "
        "significant at alpha.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level of the paired (exact McNemar) test of a benchmark drop."
    )
    benchmark_metric: Literal["acc", "acc_norm"] = Field(
        "acc_norm",
        description="Per-item score the gate compares: acc_norm divides each choice's log-likelihood by its bytes.",
    )
    primary_metric: str = Field(
        "domain/bits_per_byte", description="Domain metric that picks the best accepted checkpoint."
    )
    primary_higher_is_better: bool = Field(
        False, description="Direction of primary_metric (bits per byte: lower is better)."
    )
    general_ppl_metric: str = Field("general/word_perplexity", description="Perplexity the increase limit applies to.")
    general_probe_metrics: list[str] | None = Field(
        None,
        description="Probe accuracies (0..1) checked against max_general_probe_drop; null: general/probe_acc when no "
        "general benchmark is configured, none otherwise (benchmarks are the general signal).",
    )
    extra_tasks: list[str] = Field(
        default_factory=list, description="Further lm-eval task names (must be available offline)."
    )
    limit: int | None = Field(None, ge=1, description="Documents per eval task (null: all held-out documents).")
    backend: Literal["auto", "lm-eval", "native"] = Field(
        "auto",
        description="lm-eval (HFLM on the loaded model), native (dapt_core.metrics and the built-in choice scorer, "
        "no lm-eval needed) or auto (lm-eval when importable, else native).",
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    max_length: int = Field(
        1024,
        ge=16,
        description="Context window of the perplexity tasks (longer documents are scored in rolling windows); "
        "it bounds eval memory: measured on SmolLM2-135M, 4.3 GB peak at 1024 vs 6.9 GB at the model's 8192, and "
        "2x faster.",
    )
    max_probes: int = Field(200, ge=0, description="Cloze probes built per held-out split.")
    probe_choices: int = Field(4, ge=2, le=10, description="Choices per cloze probe (true word + distractors).")
    max_attempts: int = Field(3, ge=1, description="CPT attempts in all (the first run plus rollbacks).")
    min_general_fraction: float = Field(
        0.05, gt=0, lt=1, description="Replay fraction a rollback starts from when mix.general_fraction is 0."
    )
    max_general_fraction: float = Field(
        0.3, gt=0, lt=1, description="Cap on the replay fraction a rollback doubles to."
    )

    def primary_key(self, metrics: Mapping[str, float]) -> float:
        """`metrics`' primary metric turned so that lower is better: the one ordering of every "best checkpoint"
        choice (the best accepted step, attempt, rollback point and the domain gain's best accepted)."""
        value = metrics[self.primary_metric]
        return -value if self.primary_higher_is_better else value

    def primary_beats(self, value: float, than: float) -> bool:
        """Whether primary-metric `value` is strictly better than `than`."""
        return value > than if self.primary_higher_is_better else value < than

    @model_validator(mode="after")
    def _unique_benchmarks(self) -> EvalConfig:
        names = [b.name for b in self.benchmarks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"benchmark names must be unique, repeated: {dupes}")
        return self


# SFT's own defaults where they differ from CPT's; a user's `sft.train` is merged onto them field by field.
SFT_TRAIN_DEFAULTS: dict[str, object] = {
    "lr": 2e-5,
    "epochs": 2.0,
    "warmup_ratio": 0.03,
    "save_every": 1_000_000,
    "block_cross_document_attention": True,
    "report_to": [],
}


def _sft_train_defaults() -> TrainConfig:
    return TrainConfig(**SFT_TRAIN_DEFAULTS)


class SftConfig(Section):
    """Supervised fine-tuning on instruction pairs after CPT (dapt_core/sft.py); loss on response tokens only."""

    data: list[str] = Field(
        default_factory=list,
        description="JSONL files of instruction pairs: {'prompt', 'response'}, TRL's {'prompt', 'completion'} or "
        "{'messages': [{'role', 'content'}...]}. "
        "Empty: no SFT stage.",
    )
    seq_len: int = Field(
        1024, ge=16, description="Tokens per training sequence; longer examples are cut (the cut is logged)."
    )
    packing: bool = Field(
        False,
        description="Pack several examples per sequence (block-diagonal attention keeps them apart); else pad each.",
    )
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of instruction pairs held out for response loss/accuracy."
    )
    max_heldout: int = Field(200, ge=1, description="Cap on held-out instruction pairs.")
    seed: int = Field(0, description="Seed of the held-out split.")
    train: TrainConfig = Field(
        default_factory=_sft_train_defaults,
        description="Optimiser settings of the SFT run (one process); fields you set replace SFT's defaults one by "
        "one.",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _merge_sft_defaults(cls, v: object) -> object:
        """`sft.train: {lr: 1e-5}` keeps SFT's other defaults (2 epochs, 3% warmup, per-document attention)."""
        return {**SFT_TRAIN_DEFAULTS, **v} if isinstance(v, dict) else v

    @field_validator("train")
    @classmethod
    def _one_process(cls, v: TrainConfig) -> TrainConfig:
        if v.nproc_per_node != 1:
            raise ValueError("sft.train.nproc_per_node: SFT runs in one process (it is short); remove the setting")
        if v.nnodes != 1:
            raise ValueError("sft.train.nnodes: SFT runs in one process (it is short); remove the setting")
        return v


class DeployConfig(Section):
    """The deployments of `dapt serve` and `dapt deploy`, built from this config."""

    cron: str = Field("0 2 * * *", description="When nightly-refresh runs (cron syntax).")
    timezone: str = Field("UTC", description="IANA time zone of the cron schedule.")
    concurrency_limit: int = Field(1, ge=1, description="Refresh runs allowed at once (1: refreshes never overlap).")
    cpt_deployment: str | None = Field(
        None,
        description="Run the CPT stage as this deployment (e.g. 'dapt-cpt/gpu') on a GPU work pool via run_deployment.",
    )
    lineage: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Refresh lineage: runs that share it continue from each other's promoted model. Default: the "
        "Prefect deployment a run belongs to ('<flow>-<deployment>'), or 'local' outside a deployment.",
    )
