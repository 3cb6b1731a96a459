"""Supervised fine-tuning (SFT) on instruction pairs after CPT: loss on response tokens only.

Why our own collator instead of TRL's `SFTTrainer`: SFT then runs through the same `train()` loop as CPT
(dapt_core/train/), so it gets exact resume, atomic checkpoints with `on_checkpoint`, LoRA, EWC, TensorBoard and
DDP for free, and one loop is tested instead of two (TRL is not a dependency either). All SFT needs from the loop is
the optional `loss_mask` column of the training shards; everything SFT-specific lives here:

1. **Read** (`read_instructions`): JSONL (or .jsonl.gz) lines `{"prompt", "response"}`, TRL's `{"prompt",
   "completion"}` (strings, or lists of messages) or `{"messages": [...]}` whose last message is the assistant's
   response (earlier assistant turns are context). Bad input fails with file:line, the field and what to do. Every
   example has a content id, so duplicates land on the same side of the split.
2. **Split** (`split_examples`): held out by a hash of (seed, example id), the rule `dapt_core.split` uses for CPT.
3. **Tokenise** (`tokenize_example`): with the tokenizer's chat template when it has one (the prompt rendering with
   the generation prompt must be a token prefix of the full rendering; otherwise character offsets decide), else
   `prompt + "\\n" + response + eos`. The mask is 1 on the response and the end token after it: the model learns
   to stop.
4. **Shards** (`build_sft_shards`): `input_ids`, `doc_lengths`, `loss_mask`, every row exactly seq_len. Unpacked,
   one example per row, right-padded; the padding is its own document in `doc_lengths` and is never a target. No
   attention mask is needed: attention is causal, so real tokens never attend to the pads after them. Packed,
   examples are concatenated greedily (never split across rows); `train.block_cross_document_attention` (on by
   default for SFT) keeps them from attending to each other.
5. **Measure** (`response_metrics`): teacher-forced NLL and argmax accuracy on the held-out responses, and exact match
   (which teacher forcing gives for free, see there), before and after training (`run_sft`).
6. **Attempt** (`run_sft_attempt`, beside CPT's `run_attempt`): train, evaluate with the forgetting evaluation against
   the original base, judge by the same policy, save the model. Stopped by a signal or a cancel (dapt_core/stop.py),
   the checkpoint of the current step is uploaded to `<prefix>/checkpoints/` and journaled in `<prefix>/journal.json`;
   the next run resumes from it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import BaseModel

from dapt_core import layout
from dapt_core.attempt_events import AttemptObserver
from dapt_core.config import EvalConfig, SftConfig
from dapt_core.cpt import eval_files, serve_attempt
from dapt_core.evaluate import EvalResult, evaluate
from dapt_core.forgetting import Decision, ForgettingPolicy
from dapt_core.journal import journal_interrupted, read_journal, resume_from_journal
from dapt_core.manifest import DirRef, PackManifest, SftManifest
from dapt_core.model import adds_bos, load_from_dir
from dapt_core.model_card import ModelProvenance, write_model_card
from dapt_core.split import heldout_bucket, heldout_fraction
from dapt_core.stop import StopRequested
from dapt_core.store import ArtifactStore, open_store
from dapt_core.train import StepProgress, TrainResult, distributed, list_column, merge_lora, train

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("dapt.sft")

ROLES = ("system", "user", "assistant")
COUNTS_FILE = "counts.json"


# ------------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Example:
    """One instruction pair: the conversation before the response, and the response the model learns to give."""

    context: tuple[tuple[str, str], ...]  # (role, content): system, user and earlier assistant turns
    response: str
    origin: str = field(default="", compare=False)  # "file:line", for messages about this example

    @property
    def id(self) -> str:
        """sha256 of the content: stable across files and runs, equal for duplicates."""
        blob = json.dumps([list(self.context), self.response], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def messages(self, with_response: bool = True) -> list[dict[str, str]]:
        """The conversation as chat-template messages."""
        msgs = [{"role": r, "content": c} for r, c in self.context]
        return msgs + [{"role": "assistant", "content": self.response}] if with_response else msgs


def _non_empty_string(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _messages(messages: object, where: str, field: str) -> list[tuple[str, str]]:
    """(role, content) pairs of a chat-format field, each message checked."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: {field!r} must be a list of {{'role', 'content'}} messages")
    pairs = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: {field}[{k}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: {field}[{k}].role must be one of {', '.join(ROLES)} (got {m.get('role')!r})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: {field}[{k}].content must be a string")
        pairs.append((m["role"], m["content"]))
    return pairs


def _conversation(pairs: list[tuple[str, str]], where: str, field: str, response_at: str) -> Example:
    """The last message is the response the model learns; everything before it is context."""
    if len(pairs) < 2:
        raise ValueError(
            f"{where}: {field} must be a list of at least 2 messages (context, then the assistant's response)"
        )
    role, response = pairs[-1]
    if role != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's response (got role {role!r}): end with it")
    if not _non_empty_string(response):
        raise ValueError(f"{where}: {response_at}.content (the response) must be a non-empty string")
    return Example(context=tuple(pairs[:-1]), response=response, origin=where)


def _parse_line(record: object, where: str) -> Example:
    """One JSONL record in any of the accepted shapes: messages, prompt/response, or TRL's prompt/completion."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        pairs = _messages(record["messages"], where, "messages")
        return _conversation(pairs, where, "'messages'", f"messages[{len(pairs) - 1}]")
    if "completion" in record:  # TRL prompt-completion: two strings, or two lists of messages (conversational)
        prompt, completion = record.get("prompt"), record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            tail = _messages(completion, where, "completion")
            pairs = _messages(prompt, where, "prompt") + tail
            return _conversation(pairs, where, "'prompt' + 'completion'", f"completion[{len(tail) - 1}]")
        response_field = "completion"
    elif "prompt" in record or "response" in record:
        prompt, response_field = record.get("prompt"), "response"
    else:
        raise ValueError(
            f"{where}: expected {{'prompt': ..., 'response': ...}}, {{'prompt': ..., 'completion': ...}} or "
            f"{{'messages': [...]}}, got keys {sorted(record)}"
        )
    for name in ("prompt", response_field):
        if not _non_empty_string(record.get(name)):
            raise ValueError(f"{where}: {name!r} must be a non-empty string")
    return Example(context=(("user", prompt),), response=record[response_field], origin=where)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


def read_instructions(paths: Sequence[Path]) -> list[Example]:
    """Every example of the JSONL files, in file and line order; blank lines are skipped."""
    examples = []
    for path in map(Path, paths):
        for lineno, raw in _lines(path):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not valid UTF-8: save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}): write one JSON object per line") from None
            examples.append(_parse_line(record, where))
    return examples


def split_examples(
    examples: Sequence[Example], fraction: float, max_heldout: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held out): held out by `dapt_core.split`'s hash of (seed, example id), at most max_heldout of them.

    The hash rule makes the split independent of file order; when chance holds out more than the cap, those with the
    highest hash go back to training."""
    threshold = heldout_fraction(len(examples), fraction, max_heldout)
    buckets = [heldout_bucket(ex.id, seed) for ex in examples]
    chosen = sorted((b, i) for i, b in enumerate(buckets) if b < threshold)[:max_heldout]
    heldout_idx = {i for _, i in chosen}
    train_examples = [ex for i, ex in enumerate(examples) if i not in heldout_idx]
    return train_examples, [ex for i, ex in enumerate(examples) if i in heldout_idx]


# --------------------------------------------------------------------------------------------------- tokenising
def _plain(ex: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """`prompt + "\\n" + response + eos` (a conversation's context: its contents, one per line), prompt and response
    tokenised apart, as a caller would prompt the model."""
    prompt = "\n".join(content for _, content in ex.context) + "\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _templated(ex: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Chat template: targets are the tokens after the prompt rendering (with generation prompt)."""
    prompt = tokenizer.apply_chat_template(ex.messages(with_response=False), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(ex.messages(), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] == prompt_ids:
        return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    # Not a token prefix (e.g. the generation prompt ends in a space the response's first token absorbs, or the
    # template renders the prompt differently once the answer follows): targets are the tokens that reach past the
    # prompt text, or, when the full rendering does not even start with it, past where the response begins.
    if full.startswith(prompt):
        boundary = len(prompt)
    else:
        boundary = full.rfind(ex.response.strip())
        if boundary < 0:
            raise ValueError(
                f"{ex.origin}: the chat template does not render the response verbatim; cannot find it to train on"
            )
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return ids, [int(end > boundary) for _, end in offsets]


def tokenize_example(ex: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): mask 1 on the response and the end token after it, which the model must learn to emit.

    A chat template that ends the assistant turn without the tokenizer's eos gets eos appended (as a target), so
    generation stops at the model's configured eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (the model must learn to end its response)")
    if not getattr(tokenizer, "chat_template", None):
        return _plain(ex, tokenizer)
    ids, mask = _templated(ex, tokenizer)
    eos = tokenizer.eos_token_id
    if not any(m and t == eos for t, m in zip(ids, mask)):
        ids, mask = ids + [eos], mask + [1]
    return ids, mask


# ------------------------------------------------------------------------------------------------------- shards
def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


Row = tuple[list[int], list[int], list[int]]  # (input ids, loss mask, doc_lengths) of one training sequence


def _padded(examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> Row:
    """The examples back to back, then padding to seq_len as one more document that is never a target."""
    ids = [t for example_ids, _ in examples for t in example_ids]
    mask = [m for _, example_mask in examples for m in example_mask]
    tail = seq_len - len(ids)
    return ids + [pad] * tail, mask + [0] * tail, [len(i) for i, _ in examples] + ([tail] if tail else [])


def _rows(encoded: Sequence[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad: int) -> Iterator[Row]:
    """Rows of exactly seq_len: greedily as many whole examples as fit (packing), or one example each."""
    row: list[tuple[list[int], list[int]]] = []
    used = 0
    for example in encoded:
        if row and (not packing or used + len(example[0]) > seq_len):
            yield _padded(row, seq_len, pad)
            row, used = [], 0
        row.append(example)
        used += len(example[0])
    if row:
        yield _padded(row, seq_len, pad)


def _write_shard(rows: Sequence[Row], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "input_ids": list_column([r[0] for r in rows], np.int32),
            "doc_lengths": list_column([r[2] for r in rows], np.int32),
            "loss_mask": list_column([r[1] for r in rows], np.int8),
        }
    )
    pq.write_table(table, path, row_group_size=min(len(rows), 1024), compression="zstd")


def build_sft_shards(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    out_dir: Path,
    packing: bool,
    shard_sequences: int = 4096,
) -> dict:
    """Write out_dir/train-00000.parquet, ... (input_ids, doc_lengths, loss_mask; see module docstring) and return
    counts: examples (written), sequences, target_tokens, pad_tokens, truncated (cut to seq_len: the tail of the
    response, eos included, is lost), skipped (truncated ones whose prompt fills seq_len: no target left, not
    written), shards (paths).

    Deterministic: the same examples, tokenizer and settings give the same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("train-*.parquet"):  # a previous build with more shards
        stale.unlink()
    encoded, truncated, skipped = [], 0, 0
    for ex in examples:
        ids, mask = tokenize_example(ex, tokenizer)
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        if not any(mask[1:]):  # position 0 is never a target (nothing predicts it)
            skipped += 1
            continue
        encoded.append((ids, mask))
    if not encoded:
        raise ValueError(
            f"no SFT example has a response token within seq_len={seq_len} ({len(examples)} examples): "
            "raise sft.seq_len"
        )
    rows = list(_rows(encoded, seq_len, packing, _pad_id(tokenizer)))
    shards = []
    for k, start in enumerate(range(0, len(rows), shard_sequences)):
        path = out_dir / f"train-{k:05d}.parquet"
        _write_shard(rows[start : start + shard_sequences], path)
        shards.append(str(path))
    counts = {
        "examples": len(encoded),
        "sequences": len(rows),
        "target_tokens": sum(sum(m) for _, m in encoded),
        "pad_tokens": len(rows) * seq_len - sum(len(i) for i, _ in encoded),
        "truncated": truncated,
        "skipped": skipped,
        "shards": shards,
    }
    if truncated or skipped:
        log.warning(
            "SFT: %d of %d examples longer than seq_len=%d were cut, %d of them skipped (no response token left)",
            truncated,
            len(examples),
            seq_len,
            skipped,
        )
    return counts


# ------------------------------------------------------------------------------------------------------ metrics
def response_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    seq_len: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """Teacher-forced scores of the responses (cut to seq_len), on right-padded batches with an attention mask:

    * `sft/response_loss`: mean NLL per response token (eos included);
    * `sft/response_token_acc`: share of response tokens that are the argmax prediction;
    * `sft/exact_match`: share of examples with every response token the argmax. Greedy decoding reproduces the
      reference tokens (and stops at its eos) exactly when each argmax under teacher forcing is the reference token,
      so this is greedy-decoding exact match (on tokens; ties aside) without running generate.

    Empty when no example keeps a response token within seq_len. The model's train/eval mode is restored."""
    encoded = []
    for ex in examples:
        ids, mask = tokenize_example(ex, tokenizer)
        if any(mask[1:seq_len]):
            encoded.append((ids[:seq_len], mask[:seq_len]))
    if not encoded:
        return {}
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    was_training = model.training
    model.eval()
    nll, correct, targets, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), _pad_id(tokenizer), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            is_target = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (ids, mask) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                is_target[row, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
            input_ids, attention = input_ids.to(device), attention.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
            # Logits at position i predict token i + 1; only target positions are gathered (full-vocab fp32 log-probs
            # of a whole batch would not fit in memory for large vocabularies).
            predicts_target = is_target[:, 1:].to(device)
            picked = logits[:, :-1][predicts_target].float()
            labels = input_ids[:, 1:][predicts_target]
            nll += float(torch.nn.functional.cross_entropy(picked, labels, reduction="sum"))
            hits = picked.argmax(-1) == labels
            correct += int(hits.sum())
            targets += int(labels.numel())
            row_of_target = predicts_target.nonzero()[:, 0]
            misses_per_row = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(
                0, row_of_target, (~hits).long()
            )
            exact += int((misses_per_row == 0).sum())
    model.train(was_training)
    return {
        "sft/response_loss": nll / targets,
        "sft/response_token_acc": correct / targets,
        "sft/exact_match": exact / len(encoded),
    }


# ------------------------------------------------------------------------------------------------------- the run
@dataclass
class SftResult:
    """What run_sft hands to the next stage: the model to save, and the numbers to report."""

    model: PreTrainedModel  # the trained model, LoRA adapters merged
    counts: dict  # build_sft_shards counts of the training examples
    heldout: list[Example]
    before: dict[str, float]  # response_metrics of the input model on the held-out examples (empty: none to score)
    after: dict[str, float]  # the same for the trained model
    train: TrainResult


def run_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SftConfig,
    out_dir: Path,
    on_checkpoint: Callable[[int, Path], bool | None] | None = None,
    on_progress: Callable[[StepProgress], None] | None = None,
) -> SftResult:
    """Read cfg.data, hold out examples, build shards in out_dir/data, train (out_dir/train, resuming from its latest
    checkpoint), and score the held-out responses before and after.

    Under torchrun rank 0 builds the shards while the other ranks wait; every rank scores (same numbers)."""
    out_dir = Path(out_dir)
    examples = read_instructions([Path(p) for p in cfg.data])
    if not examples:
        raise ValueError("sft.data holds no instruction pairs: list JSONL files of {'prompt', 'response'} lines")
    train_examples, heldout = split_examples(examples, cfg.heldout_fraction, cfg.max_heldout, cfg.seed)
    if not train_examples:
        raise ValueError(f"all {len(examples)} SFT examples were held out: add examples or lower sft.heldout_fraction")
    if cfg.packing and not cfg.train.block_cross_document_attention:
        log.warning("sft.packing without train.block_cross_document_attention: packed examples attend to each other")

    dist = distributed()
    model.to(torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"))  # where train() puts it
    before = response_metrics(model, tokenizer, heldout, cfg.seq_len)

    data_dir = out_dir / "data"
    if dist.main:
        counts = build_sft_shards(train_examples, tokenizer, cfg.seq_len, data_dir, cfg.packing)
        (data_dir / COUNTS_FILE).write_text(json.dumps(counts, indent=1))
    dist.barrier()
    counts = json.loads((data_dir / COUNTS_FILE).read_text())
    log.info(
        "SFT: %d training examples in %d sequences of %d tokens (%d target tokens), %d held out",
        counts["examples"],
        counts["sequences"],
        cfg.seq_len,
        counts["target_tokens"],
        len(heldout),
    )

    result = train(
        model,
        [Path(p) for p in counts["shards"]],
        cfg.train,
        out_dir / "train",
        resume=True,
        on_checkpoint=on_checkpoint,
        on_progress=on_progress,
    )
    trained = merge_lora(result.model)
    after = response_metrics(trained, tokenizer, heldout, cfg.seq_len)
    if before:
        log.info(
            "SFT held-out response loss %.4f -> %.4f, token accuracy %.3f -> %.3f",
            before["sft/response_loss"],
            after["sft/response_loss"],
            before["sft/response_token_acc"],
            after["sft/response_token_acc"],
        )
    return SftResult(model=trained, counts=counts, heldout=heldout, before=before, after=after, train=result)


# ------------------------------------------------------------------------------------------------------ the attempt
class SftAttemptSpec(BaseModel):
    """Everything one SFT attempt needs (as `cpt.AttemptSpec` for CPT)."""

    start: DirRef  # the model (and tokenizer) SFT starts from: the promoted CPT model
    pack: PackManifest  # its held-out text is what the forgetting evaluation reads
    sft: SftConfig
    eval: EvalConfig
    reference: EvalResult  # what the SFT model is judged against: the original base's evaluation
    store: str
    prefix: str  # store key prefix of this attempt's outputs (layout.sft_attempt_prefix)
    provenance: ModelProvenance | None = None  # for the model card (README.md)
    code_version: str


def run_sft_attempt(spec: SftAttemptSpec, workdir: Path, observer: AttemptObserver | None = None) -> SftManifest:
    """Train (resuming from the attempt's journal) → evaluate → judge → save the model; see the module docstring."""
    store = open_store(spec.store)
    rows = read_journal(store, spec.prefix)
    model, tokenizer = load_from_dir(store.local_dir(spec.start))
    resume_from_journal(store, rows, workdir / "sft" / "train")
    try:
        result = run_sft(model, tokenizer, spec.sft, workdir / "sft", on_progress=observer.step if observer else None)
    except StopRequested as e:
        raise StopRequested(journal_interrupted(store, spec.prefix, rows, e.stopped)) from None
    if observer is not None:
        observer.evaluating(result.train.step)
    evaluated = evaluate(result.model, tokenizer, eval_files(store, spec.pack), workdir / "eval", spec.eval)
    decision = ForgettingPolicy.from_config(spec.eval).judge(spec.reference, evaluated)
    if observer is not None:
        observer.judged(result.train.step, decision.accepted, decision.reasons, evaluated.metrics)
        observer.done("passes the forgetting policy" if decision.accepted else "rejected by the forgetting policy")
    ref = _save_model(spec, store, result.model, tokenizer, evaluated, decision, workdir / "model")
    verdict = "ACCEPTED" if decision.accepted else "REJECTED: " + "; ".join(decision.reasons)
    log.info("SFT %s: response %s -> %s", verdict, result.before, result.after)
    return SftManifest(
        model=ref,
        examples=result.counts["examples"],
        heldout_examples=len(result.heldout),
        response_before=result.before,
        response_after=result.after,
        eval_metrics=dict(evaluated.metrics),
        accepted=decision.accepted,
        reasons=list(decision.reasons),
        numbers=dict(decision.numbers),
        code_version=spec.code_version,
    )


def _save_model(
    spec: SftAttemptSpec,
    store: ArtifactStore,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evaluated: EvalResult,
    decision: Decision,
    out: Path,
) -> DirRef:
    """The SFT model (with its tokenizer and, given provenance, a model card) in the store, accepted or not."""
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if spec.provenance is not None:
        verdict = "passes" if decision.accepted else "REJECTED: " + "; ".join(decision.reasons)
        write_model_card(
            out, spec.provenance, "supervised fine-tuning", evaluated.metrics, spec.reference.metrics, verdict
        )
    return store.put_dir(out, layout.sft_model_key(spec.prefix))


def main(argv: list[str]) -> None:
    """`python -m dapt_core.sft SPEC_JSON RESULT_JSON [WORKDIR]`: one SFT attempt in a fresh child process
    (sft.train.isolate, tasks/sft.py); stop handling as `dapt_core.cpt.serve_attempt`."""
    serve_attempt(
        argv, lambda text, workdir, watch: run_sft_attempt(SftAttemptSpec.model_validate_json(text), workdir, watch)
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
