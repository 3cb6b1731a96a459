"""`pack_corpus`: the pack stage as named steps (check, read and hold out, budget, tokenise, mix, write, report)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dapt_core.manifest import RefreshCounts
from dapt_core.pack import tokenise
from dapt_core.pack.documents import Docs, doc_ids, ensure_tokens, in_key_order, scan, text_bytes, write_replay
from dapt_core.pack.mix import MixBudget, Streams, interleave, refresh_domain_order, take_streams, tokens_by_source
from dapt_core.pack.shards import write_general_sample, write_shards
from dapt_core.pack.tokenise import Encoder, TokenFile, token_spec
from dapt_core.pack.types import KINDS, SELF_REPLAY_EVAL_WARNING, PackError, PackResult, RefreshSpec

if TYPE_CHECKING:
    from dapt_core.config import MixConfig


@dataclass(frozen=True)
class _Inputs:
    """What one pack call reads: the domain corpus and the general corpora (data.general, then self-replay)."""

    domain: list[Path]
    general: list[Path]
    replay_docs: int  # self-replay documents among the general ones
    has_data_general: bool


@dataclass
class _Run:
    """Everything the report needs from one pack call."""

    inputs: _Inputs
    dom: Docs
    gen: Docs | None
    budget: MixBudget
    streams: Streams
    shards: list[Path]
    general_sample: Path | None
    passes: int  # general tokenise passes
    tokenised: int  # tokens in the token file
    tok_info: dict
    encoder: Encoder
    workers: int
    timings: dict[str, float]


def pack_corpus(
    domain: list[Path],
    general: list[Path],
    tokenizer_dir: Path,
    cfg: MixConfig,
    out_dir: Path,
    replay_texts: Iterable[str] | None = None,
    refresh: RefreshSpec | None = None,
) -> PackResult:
    """Held-out eval files, token-exact domain/general mix, fixed-length packed Parquet shards (see the package doc).

    `domain`, `general`: the cleaned corpora's Parquet parts, in order (no general parts: no data.general).
    `replay_texts` (e.g. `replay.sample_self_replay(...)`) are general documents of source "self-replay", used in
    addition to `general`; they are only consumed when cfg.general_fraction > 0. `refresh`: pack the new domain
    documents plus a replay share of earlier ones (`RefreshSpec`); with nothing new, no sequence is packed.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    _check_inputs(domain, general, replay_texts, cfg.general_fraction)
    _clear_outputs(out_dir)
    workers = cfg.workers or os.cpu_count() or 1
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=".pack-tmp-", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        encoder = _start_encoder(domain, general, cfg.general_fraction, workers)
        try:
            encoder.spec, tok_info = token_spec(Path(tokenizer_dir), tmp, cfg.document_separator)
            inputs = _inputs(domain, general, replay_texts, cfg.general_fraction, tmp, timings)
            with TokenFile(tmp / "tokens.int32") as token_file:
                dom, gen = _read_and_hold_out(inputs, cfg, refresh, out_dir, encoder, token_file, timings)
                if refresh is None:
                    d_order = in_key_order(dom, dom.train)
                else:
                    d_order = refresh_domain_order(dom, inputs.domain, refresh.domain_replay, encoder, token_file)
                    if not len(d_order):
                        return _nothing_new(cfg, out_dir, _heldout_fractions(dom, gen))
                budget = MixBudget.of(dom, d_order, gen, cfg)
                with _timed(timings, "general_tokenize_s"):
                    passes = _tokenise_general(gen, inputs, budget, dom, d_order, encoder, token_file)
            streams = take_streams(dom, d_order, gen, budget, cfg.seed)
            with _timed(timings, "pack_write_s"):
                shards, general_sample = _write_outputs(token_file, streams, dom, gen, budget, cfg, out_dir)
        finally:
            encoder.close()
    run = _Run(
        inputs,
        dom,
        gen,
        budget,
        streams,
        shards,
        general_sample,
        passes,
        token_file.size,
        tok_info,
        encoder,
        workers,
        timings,
    )
    return _result(run, cfg, out_dir, refresh, time.perf_counter() - t_start)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _check_inputs(domain: list[Path], general: list[Path], replay_texts: Iterable[str] | None, f: float) -> None:
    if not domain:
        raise PackError("no domain corpus to pack: data.domain produced no cleaned documents")
    if f > 0 and not general and replay_texts is None:
        raise PackError(
            f"mix.general_fraction is {f:g} but there is no general text to replay: add data.general sources "
            "(e.g. a slice of a web or book corpus), or enable mix.self_replay to sample replay text from the base "
            "model, "
            "or set mix.general_fraction: 0 (no replay; expect forgetting)"
        )


def _clear_outputs(out_dir: Path) -> None:
    """Create the output folders and remove what an earlier call left in them."""
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    for old in [
        *(out_dir / "train").glob("train-*.parquet"),
        *(out_dir / "general-sample").glob("*.parquet"),
        *(out_dir / "eval" / f"{k}.jsonl" for k in KINDS),
    ]:
        old.unlink(missing_ok=True)


def _start_encoder(domain: list[Path], general: list[Path], f: float, workers: int) -> Encoder:
    """The encoder, its worker pool started now (before the tokenizer loads) when there is enough text for it."""
    paths = domain + (general if f > 0 else [])
    return Encoder(workers, start_pool=text_bytes(paths) >= tokenise.INPROCESS_BYTES)


def _inputs(
    domain: list[Path],
    general: list[Path],
    replay_texts: Iterable[str] | None,
    f: float,
    tmp: Path,
    timings: dict[str, float],
) -> _Inputs:
    """The corpora to read; self-replay texts (only with f > 0) are written as one more general corpus file."""
    general_paths = list(general)
    replay_docs = 0
    if replay_texts is not None and f > 0:
        with _timed(timings, "self_replay_s"):
            replay_docs = write_replay(replay_texts, tmp / "replay.parquet")
        if replay_docs:
            general_paths.append(tmp / "replay.parquet")
    return _Inputs(domain, general_paths, replay_docs, bool(general))


def _read_and_hold_out(
    inputs: _Inputs,
    cfg: MixConfig,
    refresh: RefreshSpec | None,
    out_dir: Path,
    encoder: Encoder,
    token_file: TokenFile,
    timings: dict[str, float],
) -> tuple[Docs, Docs | None]:
    """Read both kinds once: held-out eval files written, domain training documents tokenised (in a refresh only the
    new ones), general ones only measured (they are tokenised as far as the budget needs)."""
    fixed = refresh.heldout_fractions if refresh else {}
    seen = doc_ids(refresh.seen) if refresh else None
    eval_dir = out_dir / "eval"
    with _timed(timings, "domain_tokenize_s"):
        dom = scan(
            inputs.domain,
            "domain",
            cfg,
            eval_dir / "domain.jsonl",
            encoder,
            token_file,
            fraction=fixed.get("domain"),
            seen=seen,
        )
    with _timed(timings, "general_scan_s"):
        gen = (
            scan(inputs.general, "general", cfg, eval_dir / "general.jsonl", None, None, fraction=fixed.get("general"))
            if inputs.general
            else None
        )
    return dom, gen


def _heldout_fractions(dom: Docs, gen: Docs | None) -> dict[str, float]:
    return {"domain": dom.fraction} | ({"general": gen.fraction} if gen is not None else {})


def _tokenise_general(
    gen: Docs | None,
    inputs: _Inputs,
    budget: MixBudget,
    dom: Docs,
    d_order: np.ndarray,
    encoder: Encoder,
    token_file: TokenFile,
) -> int:
    """Tokenise general documents in key order until the mix and the EWC sample have enough; returns passes."""
    need = max(budget.general, budget.general_sample)
    if need <= 0:
        return 0
    bytes_per_token = dom.nbytes[d_order].sum() / max(1, budget.domain_pool)
    return ensure_tokens(gen, inputs.general, need, bytes_per_token, encoder, token_file)


def _write_outputs(
    token_file: TokenFile,
    streams: Streams,
    dom: Docs,
    gen: Docs | None,
    budget: MixBudget,
    cfg: MixConfig,
    out_dir: Path,
) -> tuple[list[Path], Path | None]:
    """The training shards (the interleaved stream) and the general sample for EWC."""
    off, take = interleave(streams, dom, gen, budget)
    tokens = token_file.read()
    shards = write_shards(tokens, off, take, cfg.seq_len, cfg.shard_sequences, out_dir / "train")
    if not budget.general_sample:
        return shards, None
    return shards, write_general_sample(gen, budget.general_sample, cfg.seq_len, tokens, out_dir)


def _eval_files(out_dir: Path) -> dict[str, Path | None]:
    files = {k: out_dir / "eval" / f"{k}.jsonl" for k in KINDS}
    return {k: (p if p.exists() else None) for k, p in files.items()}


def _warnings(run: _Run) -> list[str]:
    warnings = [run.encoder.broken] if run.encoder.broken else []
    gen, epochs = run.gen, run.streams.epochs
    if not run.inputs.has_data_general and run.inputs.replay_docs and gen is not None and gen.heldout:
        warnings.append(SELF_REPLAY_EVAL_WARNING)
    if epochs is not None and epochs > 1:
        warnings.append(
            f"general text is short: its {gen.tok_len[gen.train].sum():,} training tokens are repeated "
            f"{epochs:.2f} times "
            "to reach the replay share; add general text if you can"
        )
    return warnings


def _refresh_counts(run: _Run) -> RefreshCounts:
    fresh = run.dom.new[run.streams.d_idx]
    d_take = run.streams.d_take
    return RefreshCounts(
        new_documents=int(fresh.sum()),
        new_tokens=int(d_take[fresh].sum()),
        replayed_documents=int((~fresh).sum()),
        replayed_tokens=int(d_take[~fresh].sum()),
    )


def _result(run: _Run, cfg: MixConfig, out_dir: Path, refresh: RefreshSpec | None, elapsed: float) -> PackResult:
    f = cfg.general_fraction
    tokens_by_kind = {"domain": int(run.streams.d_take.sum()), "general": run.streams.general_tokens}
    by_source = tokens_by_source(run.dom, run.gen, run.streams)
    realised = run.streams.general_tokens / run.budget.total
    eval_files = _eval_files(out_dir)
    refresh_counts = _refresh_counts(run) if refresh is not None else None
    heldout_fractions = _heldout_fractions(run.dom, run.gen)
    warnings = _warnings(run)
    report = {
        "seq_len": cfg.seq_len,
        "sequences": run.budget.sequences,
        "training_tokens": run.budget.total,
        "shards": len(run.shards),
        "general_fraction_target": f,
        "general_fraction_realised": realised,
        "general_fraction_error": realised - f,
        "tolerance": f"token-exact: |realised - target| <= 0.5 / {run.budget.total} (absolute)",
        "within_half_percent_of_target": abs(realised - f) <= 0.005 * f if f else realised == 0,
        "tokens_by_kind": tokens_by_kind,
        "tokens_by_source": by_source,
        "domain": _domain_report(run),
        "general": _general_report(run),
        "dropped_tokens": run.streams.dropped,
        "tokenizer": run.tok_info,
        "tokenization": _tokenization_report(run),
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()} | {"total": round(elapsed, 3)},
        "eval_files": {k: (p.name if p else None) for k, p in eval_files.items()},
        "eval_note": "lm-eval local tasks: dataset_path json, data_files <file>; "
        "a data_files string names the split 'train'",
        "seed": cfg.seed,
        "heldout_fractions": heldout_fractions,
        "refresh": refresh_counts.model_dump() if refresh_counts else None,
        "warnings": warnings,
    }
    return PackResult(
        train_shards=run.shards,
        eval_files=eval_files,
        tokens=by_source,
        tokens_by_kind=tokens_by_kind,
        general_fraction=realised,
        general_fraction_target=f,
        sequences=run.budget.sequences,
        seq_len=cfg.seq_len,
        dropped_tokens=run.streams.dropped,
        general_sample=run.general_sample,
        heldout_fractions=heldout_fractions,
        refresh=refresh_counts,
        warnings=warnings,
        report=report,
    )


def _domain_report(run: _Run) -> dict:
    dom = run.dom
    return {
        "documents": int(len(dom.train)),
        "training_documents": int(dom.train.sum()),
        "heldout_documents": dom.heldout,
        "heldout_fraction": dom.fraction,
        "training_tokens_available": run.budget.domain_pool,
        "dropped_remainder_tokens": run.streams.dropped,
    }


def _general_report(run: _Run) -> dict | None:
    gen = run.gen
    if gen is None:
        return None
    tokenised = gen.tok_off >= 0
    return {
        "documents": int(len(gen.train)),
        "training_documents": int(gen.train.sum()),
        "self_replay_documents": run.inputs.replay_docs,
        "heldout_documents": gen.heldout,
        "heldout_fraction": gen.fraction,
        "tokenised_documents": int(tokenised.sum()),
        "tokenised_tokens": int(gen.tok_len[tokenised].sum()),
        "tokenised_bytes_share": float(gen.nbytes[tokenised].sum() / max(1, gen.nbytes[gen.train].sum())),
        "tokenize_passes": run.passes,
        "epochs": run.streams.epochs,
        "packed_documents": int(len(run.streams.g_idx)),
    }


def _tokenization_report(run: _Run) -> dict:
    return {
        "mode": sorted(run.encoder.mode_used),
        "workers": run.workers,
        "tokens": run.tokenised,
        "seconds": round(run.timings.get("domain_tokenize_s", 0) + run.timings.get("general_tokenize_s", 0), 3),
    }


def _nothing_new(cfg: MixConfig, out_dir: Path, heldout_fractions: dict[str, float]) -> PackResult:
    """A refresh whose cleaned corpus has no domain training document the lineage has not seen: nothing to pack."""
    nothing = RefreshCounts(new_documents=0, new_tokens=0, replayed_documents=0, replayed_tokens=0)
    return PackResult(
        train_shards=[],
        eval_files=_eval_files(out_dir),
        tokens={},
        tokens_by_kind={"domain": 0, "general": 0},
        general_fraction=0.0,
        general_fraction_target=cfg.general_fraction,
        sequences=0,
        seq_len=cfg.seq_len,
        dropped_tokens=0,
        heldout_fractions=heldout_fractions,
        refresh=nothing,
        report={
            "refresh": nothing.model_dump(),
            "heldout_fractions": heldout_fractions,
            "sequences": 0,
            "warnings": [],
        },
    )
