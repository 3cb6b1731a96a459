"""Continual pretraining (CPT) of a causal LM on the packed shards of `dapt pack`: one readable loop.

In the style of a torchtune recipe, everything happens in `train()`, top to bottom:

* **Data.** Parquet shards with `input_ids` (list<int32>, fixed seq_len), `doc_lengths` (list<int32>) and, for
  SFT, an optional `loss_mask` (list<int8>, 1 where the token is a training target), read memory-mapped. Epoch e visits the sequences in the permutation `default_rng([seed, e]).permutation(N)`; the data
  position is (epoch, index in that permutation), so the order is a pure function of the seed.
* **Method.** `full` trains every parameter; `lora` wraps the model with peft (`cfg.lora`: r, alpha, dropout,
  target_modules). After a tokenizer extension (`new_token_ids`) the new tokens' rows of the input embeddings and
  of an untied lm_head train too, and only those rows (`cfg.train_new_tokens`, peft trainable tokens);
  `cfg.train_embeddings` trains both matrices in full instead. `merge_lora(model)` folds it all into plain weights.
* **Optimisation.** AdamW (no weight decay on biases / norm weights), LR = linear warmup over
  round(warmup_ratio * steps) steps to the peak, then cosine to min_lr_ratio * peak at the last step (`lr_at`),
  gradient accumulation over `grad_accum` micro-batches, global grad-norm clipping. The loss is token-weighted
  over the whole optimizer step (all micro-batches and ranks), as HF Trainer: summed NLL / target tokens of the
  step, so response-only SFT masks, accumulation and DDP weigh every target token the same. fp32 on CPU, bf16 autocast
  on CUDA (weights and optimizer state stay fp32). Optional gradient checkpointing.
* **Documents.** With `block_cross_document_attention`, position ids restart at every document of a packed
  sequence (from `doc_lengths`) and no attention mask is passed: transformers then builds the block-diagonal
  causal mask from the position ids (eager / sdpa / flex) or runs varlen flash attention, so no token attends to
  another document. The label of each document's first token (predicted from the previous document) is ignored.
* **Distributed.** Launched by `torchrun`/`accelerate launch` (WORLD_SIZE > 1) the loop runs DDP: each rank takes
  its slice of every global micro-batch (batch_size sequences per rank, same permutation), gradients are averaged,
  rank 0 writes checkpoints and runs `on_checkpoint` while the others wait. One process is the same loop, unchanged.
* **Logging.** Every `cfg.log_every` steps rank 0 logs step, loss, LR, tokens/s and ETA (logger `dapt.train`, which
  reaches the Prefect flow-run logs) and hands a `StepProgress` to `on_progress` (the CLI bar, the UI's progress
  artifact); `cfg.report_to: [tensorboard]` also writes loss, LR, grad norm, EWC penalty and tokens/s to
  out_dir/tensorboard.
* **EWC.** `cfg.ewc.enabled` adds (lambda/2) * sum F_i (theta_i - theta*_i)^2 once per optimizer step (dapt_core/ewc.py); the Fisher is
  estimated once on `general_samples` at the start and saved as out_dir/ewc.safetensors (a resumed run reloads it).
* **Checkpoints.** Every `save_every` steps and at the end, out_dir/checkpoint-<step>/ holds `model.safetensors`
  (all weights for `full`, the trainable weights for `lora`), `config.json` (full: the directory loads with
  `from_pretrained`), `optimizer.pt`, `scheduler.pt`, `rng.pt` (python, numpy, torch, cuda) and
  `trainer_state.json` (step, epoch, index, loss history), written last. The three .pt files hold plain data only
  (tensors, numbers, lists, dicts) and are read with `torch.load(weights_only=True)` (`load_state`): a checkpoint
  downloaded from a shared store is never unpickled. The directory is written under a
  temporary name and renamed into place, so a checkpoint that exists is complete. `on_checkpoint(step, path)`
  is called after each one (evaluate, upload...); when it returns False training stops there (a rejected checkpoint:
  roll back instead of training further).
* **Stopping.** A stop request (dapt_core/stop.py: a signal or a cancel, set from the main thread) is honoured
  before the next optimizer step: the loop writes a checkpoint of the current step (unless that step was just
  checkpointed) and raises `StopRequested`; under DDP every rank stops at the same step (the flags are all-reduced).
* **Exact resume.** With `resume=True` the loop restarts from the latest complete checkpoint: weights, optimizer,
  scheduler, RNG states and data position are restored, so a run killed at any point (SIGKILL included) and resumed
  ends with the same weights as an uninterrupted run (bitwise on CPU; tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from dapt_core import stop
from dapt_core.config import TrainConfig
from dapt_core.stop import Stopped, StopRequested

log = logging.getLogger("dapt.train")

CHECKPOINT_PREFIX = "checkpoint-"
# Ranks != 0 wait while rank 0 writes, evaluates and uploads a checkpoint (a 7B full checkpoint with optimizer state
# to S3 takes well over NCCL's default 10 minutes).
DIST_TIMEOUT = timedelta(hours=4)
EWC_FILE = "ewc.safetensors"


# ----------------------------------------------------------------------------------------------------------- data
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
            mask = None
            if "loss_mask" in columns:
                m = table.column("loss_mask").combine_chunks()
                mask = m.values.to_numpy(zero_copy_only=False)[m.offsets[0].as_py() : m.offsets[-1].as_py()]
                if len(mask) != n * seq_len:
                    raise ValueError(f"{shard}: loss_mask must have one entry per token")
                mask = mask.reshape(n, seq_len)
            self._masks.append(mask)
        if seq_len is None:
            raise ValueError("no training sequences in the given shards")
        self.seq_len = seq_len
        self._starts = np.cumsum([0] + [len(a) for a in self._ids])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order sequences are visited in during `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def document_position_ids(doc_lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """Position ids restarting at 0 at each document of a packed sequence."""
    pos = np.concatenate([np.arange(int(d)) for d in doc_lengths if d > 0]) if len(doc_lengths) else np.arange(0)
    if len(pos) != seq_len:
        raise ValueError(f"doc_lengths sum to {len(pos)}, expected seq_len {seq_len}")
    return pos


def make_batch(items: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], block_documents: bool) -> dict[str, torch.Tensor]:
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
    """Next-token NLL summed over the target tokens (fp32), to be divided by the step's target count."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


# -------------------------------------------------------------------------------------------------- LR schedule
def warmup_steps_for(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup_ratio * total_steps))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to cfg.lr (reached at the last warmup step), then
    cosine from cfg.lr (first step after warmup) to min_lr_ratio * cfg.lr (last step, total_steps - 1)."""
    warmup = warmup_steps_for(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def total_steps_for(cfg: TrainConfig, num_sequences: int, world: int = 1) -> int:
    """Optimizer steps: cfg.max_steps, or cfg.epochs passes at batch_size * world * grad_accum sequences per step."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_sequences / (cfg.batch_size * world * cfg.grad_accum)))


# ------------------------------------------------------------------------------------------------------- LoRA
def apply_lora(model, cfg: TrainConfig, new_token_ids: Sequence[int] = ()):
    """Wrap `model` with LoRA adapters (peft). cfg.train_embeddings trains embed_tokens and lm_head in full; else, with
    cfg.train_new_tokens, the rows of `new_token_ids` (the tokenizer extension's tokens) train and no other row does:
    peft's trainable tokens on the input embeddings and, when untied, on the lm_head."""
    from peft import LoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    token_rows = None
    if new_token_ids and cfg.train_new_tokens and not cfg.train_embeddings:
        leaf = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        token_rows = {leaf[id(model.get_input_embeddings())]: sorted(new_token_ids)}
        if not tied:  # a tied lm_head follows the input rows (ensure_weight_tying)
            token_rows[leaf[id(model.get_output_embeddings())]] = sorted(new_token_ids)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
        modules_to_save=["embed_tokens", "lm_head"] if cfg.train_embeddings else None, bias="none", task_type="CAUSAL_LM",
        trainable_token_indices=token_rows,
        ensure_weight_tying=tied,  # tied embeddings stay one matrix (else merging unties them: a second copy)
    )
    return get_peft_model(model, lora)


def merge_lora(model):
    """Fold LoRA adapters into the base weights and return the plain transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------- checkpoints
def _trainable_state(model) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[n] = p.detach().contiguous().cpu()
    return out


def save_weights(model, path: Path, method: str) -> None:
    from safetensors.torch import save_file, save_model

    if method == "lora":
        save_file(_trainable_state(model), str(path))
    else:
        save_model(model, str(path))  # drops tied duplicates (embed_tokens / lm_head), loads back with load_model


def load_weights(model, path: Path, method: str) -> None:
    from safetensors.torch import load_file, load_model

    if method == "lora":
        state = load_file(str(path))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
    else:
        load_model(model, str(path), strict=True)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state.json), by step."""
    found = []
    for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_state() -> dict:
    """Every RNG's state as tensors, ints and floats only: resume reads it with torch.load(weights_only=True), so a
    checkpoint from the store is data and never unpickled (python's and numpy's own state objects would need pickle)."""
    version, mt, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state({
        "bit_generator": "MT19937", "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"], "gauss": npy["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path, map_location=None):
    """A checkpoint's optimizer / scheduler / RNG state, read as plain data (weights_only=True: tensors, numbers,
    strings, lists, dicts); a file that needs anything else is refused, never unpickled."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: it holds more than plain data (tensors, numbers, lists, dicts) "
            f"({str(e).splitlines()[0][:200]}). It was changed after it was written or comes from an older dapt. "
            f"Delete {path.parent} to resume from the checkpoint before it, or start the run afresh."
        ) from None


def _write_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, method: str, trainer_state: dict) -> Path:
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out_dir / f".tmp-{CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors", method)
    if method == "full" and hasattr(model, "config"):
        model.config.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-run over an old checkpoint of the same step: replace it
        old = out_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


# ------------------------------------------------------------------------------------------------------ train
@dataclass
class TrainResult:
    model: object  # the trained model (a peft model for method "lora": see merge_lora)
    step: int  # optimizer steps done
    total_steps: int
    final_loss: float | None  # mean LM loss of the last optimizer step
    history: list[dict] = field(default_factory=list)  # per step: step, lr, loss, grad_norm (pre-clip), ewc
    checkpoints: list[Path] = field(default_factory=list)  # written by this call
    resumed_from: Path | None = None


@dataclass(frozen=True)
class StepProgress:
    """Where training stands, every `log_every` steps: for the log, a progress bar, a UI."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float  # over the steps since the last report
    eta_seconds: float  # the remaining steps at that rate (checkpoint evaluations not included)

    def line(self) -> str:
        return (
            f"step {self.step}/{self.total_steps} loss {self.loss:.4f} lr {self.lr:.3g} "
            f"{self.tokens_per_second:,.0f} tokens/s eta {timedelta(seconds=round(self.eta_seconds))}"
        )


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun / accelerate launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def distributed() -> Distributed:
    """Join the process group torchrun set up (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=DIST_TIMEOUT)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Distributed(rank=torch.distributed.get_rank(), world=world, local_rank=local)


def tensorboard_writer(cfg: TrainConfig, out_dir: Path, dist: Distributed):
    """A TensorBoard writer on out_dir/tensorboard when cfg.report_to asks for one (rank 0 only), else None."""
    if "tensorboard" not in cfg.report_to or not dist.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _set_peak_lr(optimizer, scheduler, peak: float) -> None:
    """After loading a checkpoint's scheduler: the schedule's peak is this run's cfg.lr, at the loaded position. A plain
    resume keeps the same LR; a rollback continuing from an accepted checkpoint (dapt_core/continuation.py) lowers it
    on the same schedule (the loaded state carries the old peak as base_lrs)."""
    scheduler.base_lrs = [peak for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)


def train(
    model,
    shards: list[Path],
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = True,
    on_checkpoint: Callable[[int, Path], bool | None] | None = None,
    general_samples: Sequence[Sequence[int]] | None = None,
    new_token_ids: Sequence[int] = (),
    on_progress: Callable[[StepProgress], None] | None = None,
) -> TrainResult:
    """Continually pretrain `model` on the packed `shards`; checkpoints in `out_dir` (see module docstring).
    `on_progress` gets a `StepProgress` every cfg.log_every optimizer steps (and the last), on rank 0."""
    with stop.training(cfg.stop_grace_s):
        return _train(model, shards, cfg, Path(out_dir), resume, on_checkpoint, general_samples, new_token_ids, on_progress)


def _stop_agreed(dist: Distributed, device) -> bool:
    """Whether any rank was asked to stop (one tiny all-reduce per step under DDP, so all ranks stop together)."""
    if dist.world == 1:
        return stop.requested()
    flag = torch.tensor([int(stop.requested())], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _train(
    model, shards, cfg: TrainConfig, out_dir: Path, resume, on_checkpoint, general_samples, new_token_ids, on_progress
) -> TrainResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)

    # --- seeds (a resumed run overwrites them with the checkpoint's RNG states)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)

    # --- device, precision, process group
    dist = distributed()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # --- data
    data = PackedSequences(shards)
    n = len(data)
    total_steps = total_steps_for(cfg, n, dist.world)

    # --- EWC anchor and Fisher: computed on the model as given, before any adapter or update
    ewc = None
    if cfg.ewc.enabled:
        from dapt_core.ewc import EWC

        ewc_path = out_dir / EWC_FILE
        if resume and ewc_path.is_file():
            ewc = EWC.load(ewc_path, cfg.ewc.lambda_)
        else:
            if not general_samples:
                raise ValueError("train.ewc.enabled needs general_samples (token id sequences of general text)")
            if cfg.method == "lora":
                raise ValueError("train.ewc: EWC applies to full training (LoRA adapters start at zero: nothing to anchor)")
            ewc = EWC.from_model(model, general_samples, cfg.ewc.lambda_, max_samples=cfg.ewc.fisher_samples)
            if dist.main:
                tmp = out_dir / f".tmp-{EWC_FILE}"
                ewc.save(tmp)
                os.replace(tmp, ewc_path)
        ewc.to(device)

    # --- method
    if cfg.method == "lora" and not _is_peft(model):
        model = apply_lora(model, cfg, new_token_ids)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    trained = model  # what checkpoints save and the caller gets back; `model` may become its DDP wrapper
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    # --- optimizer, schedule
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)

    # --- resume
    step, epoch, index, history, resumed_from = 0, 0, 0, [], None
    checkpoints = list_checkpoints(out_dir) if resume else []
    if checkpoints:
        _, resumed_from = checkpoints[-1]
        state = json.loads((resumed_from / "trainer_state.json").read_text())
        load_weights(trained, resumed_from / "model.safetensors", cfg.method)
        optimizer.load_state_dict(load_state(resumed_from / "optimizer.pt", map_location=device))
        scheduler.load_state_dict(load_state(resumed_from / "scheduler.pt"))
        _set_peak_lr(optimizer, scheduler, cfg.lr)
        _set_rng_state(load_state(resumed_from / "rng.pt"))
        if state.get("world_size", 1) != dist.world:
            raise ValueError(
                f"{resumed_from} was written by {state.get('world_size', 1)} process(es) and this run has {dist.world}: "
                "the global batch would change mid-run. Resume with the same train.nproc_per_node, or start a new run."
            )
        step, epoch, index, history = state["step"], state["epoch"], state["index"], state["history"]

    order = epoch_order(n, cfg.seed, epoch)

    def next_micro_batch() -> dict[str, torch.Tensor]:
        """This rank's slice of the next global micro-batch (batch_size * world sequences of the data order)."""
        nonlocal epoch, index, order
        items = []
        for k in range(cfg.batch_size * dist.world):
            if index >= n:  # the stream continues into the next epoch's permutation
                epoch, index = epoch + 1, 0
                order = epoch_order(n, cfg.seed, epoch)
            if k // cfg.batch_size == dist.rank:
                items.append(data[int(order[index])])
            index += 1
        return {k: v.to(device) for k, v in make_batch(items, cfg.block_cross_document_attention).items()}

    params = [p for p in model.parameters() if p.requires_grad]
    written: list[Path] = []
    loss_value = history[-1]["loss"] if history else None
    writer = tensorboard_writer(cfg, out_dir, dist)
    tokens_per_step = cfg.batch_size * dist.world * cfg.grad_accum * data.seq_len
    last_saved = (step, resumed_from)  # the step the newest checkpoint holds

    def checkpoint() -> Path:
        trainer_state = {
            "step": step, "epoch": epoch, "index": index, "total_steps": total_steps, "seed": cfg.seed,
            "method": cfg.method, "world_size": dist.world, "history": history,
        }
        return _write_checkpoint(out_dir, step, trained, optimizer, scheduler, cfg.method, trainer_state)

    # --- the loop
    log.info("training steps %d to %d%s", step + 1, total_steps, f" (resumed from {resumed_from})" if resumed_from else "")
    window = {"steps": 0, "seconds": 0.0}  # since the last progress report
    while step < total_steps:
        if _stop_agreed(dist, device):
            path = last_saved[1]
            if last_saved[0] != step:
                path = out_dir / f"{CHECKPOINT_PREFIX}{step}"
                if dist.main:
                    path = checkpoint()
                dist.barrier()
            if writer is not None:
                writer.close()
            raise StopRequested(Stopped(step=step, checkpoint=str(path) if path else None, reason=stop.reason()))
        t0 = time.perf_counter()
        micro_batches = [next_micro_batch() for _ in range(cfg.grad_accum)]
        # Token-weighted loss, as HF Trainer: every target token of the optimizer step weighs the same, whichever
        # micro-batch or rank holds it (response-only SFT masks make the counts uneven). Each rank scales its summed
        # NLL by world / (target tokens of the whole step); DDP's gradient averaging divides the world back out.
        targets = torch.tensor([sum(target_tokens(b["labels"]) for b in micro_batches)], dtype=torch.float64, device=device)
        if dist.world > 1:
            torch.distributed.all_reduce(targets)
        step_targets = max(float(targets.item()), 1.0)
        nll_sum, ewc_value = 0.0, 0.0
        for micro, batch in enumerate(micro_batches):
            last = micro == cfg.grad_accum - 1
            # DDP: all-reduce gradients once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if dist.world == 1 or last else model.no_sync()
            with sync:
                labels = batch.pop("labels")
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(**batch, use_cache=False)
                summed = summed_token_nll(out.logits, labels)
                total = summed * (dist.world / step_targets)
                if ewc is not None and last:  # once per optimizer step, not once per micro-batch
                    penalty = ewc.penalty(trained)
                    ewc_value = float(penalty.detach())
                    total = total + penalty
                total.backward()
            nll_sum += float(summed.detach())
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if dist.world > 1:  # log the global batch's loss, not rank 0's share
            summed_all = torch.tensor([nll_sum], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(summed_all)
            nll_sum = float(summed_all.item())
        loss_value = nll_sum / step_targets
        seconds = time.perf_counter() - t0
        history.append(
            {"step": step, "lr": lr, "loss": loss_value, "grad_norm": grad_norm, "ewc": ewc_value if ewc else None,
             "seconds": seconds}
        )
        window["steps"] += 1
        window["seconds"] += seconds
        if dist.main and (step % cfg.log_every == 0 or step == total_steps):
            rate = window["steps"] / max(window["seconds"], 1e-9)
            progress = StepProgress(
                step=step, total_steps=total_steps, loss=loss_value, lr=lr, tokens_per_second=tokens_per_step * rate,
                eta_seconds=(total_steps - step) / rate,
            )
            window = {"steps": 0, "seconds": 0.0}
            log.info("%s", progress.line())
            if on_progress is not None:
                on_progress(progress)
        if writer is not None and (step % cfg.log_every == 0 or step == total_steps):
            for name, value in (("loss", loss_value), ("lr", lr), ("grad_norm", grad_norm), ("ewc_penalty", ewc_value if ewc else None)):
                if value is not None:
                    writer.add_scalar(f"train/{name}", value, step)
            writer.add_scalar("train/tokens_per_second", tokens_per_step / max(seconds, 1e-9), step)

        if step % cfg.save_every == 0 or step == total_steps:
            path, rejected = out_dir / f"{CHECKPOINT_PREFIX}{step}", False
            if dist.main:
                path = checkpoint()
                if writer is not None:
                    writer.flush()
                rejected = on_checkpoint is not None and on_checkpoint(step, path) is False
            written.append(path)
            last_saved = (step, path)
            if dist.world > 1:  # rank 0 decided (it ran on_checkpoint); every rank follows
                flag = torch.tensor([int(dist.main and rejected)], device=device)
                torch.distributed.broadcast(flag, src=0)
                rejected = bool(flag.item())
            if rejected:
                break

    if writer is not None:
        writer.close()
    return TrainResult(
        model=trained, step=step, total_steps=total_steps, final_loss=loss_value, history=history, checkpoints=written,
        resumed_from=resumed_from,
    )
