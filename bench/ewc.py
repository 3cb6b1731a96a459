#!/usr/bin/env python
"""EWC lambda sweep: how much forgetting EWC (dapt_core/ewc.py) removes, and what it costs in domain gain.

Setup (the tests' tiny setup, offline): a byte-level BPE and a random-init tiny Llama (hidden 64, 2 layers) are
pretrained on general prose (tests/corpus.py), then continually pretrained on domain prose with NO replay, once per
lambda, from the same base with the same data order. The Fisher is estimated on general training sequences of the
pretraining corpus, as the product estimates it on `general-sample.parquet`. Metrics are bits per byte
(dapt_core.metrics) on held-out general and domain documents:

* forgetting = general bpb after CPT - general bpb of the base (plain CPT: the reference);
* domain gain = domain bpb of the base - domain bpb after CPT;
* forgetting reduction = 1 - forgetting(lambda) / forgetting(plain); domain-gain reduction likewise.

EWC is worth its cost at a lambda where the forgetting reduction is large and the domain-gain reduction is smaller.
The default `train.ewc.lambda` is chosen from this table (bench/README.md).

    .venv/bin/python bench/ewc.py                 # 3 seeds x 8 lambdas, ~30 min on 2 busy cores
    .venv/bin/python bench/ewc.py --seeds 1       # one seed
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEQ_LEN = 64
LAMBDAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass(frozen=True)
class SweepRow:
    lambda_: float
    general_bpb: float
    domain_bpb: float
    forgetting: float  # general bpb rise over the base
    domain_gain: float  # domain bpb fall below the base
    forgetting_reduction: float  # vs plain CPT (lambda 0)
    domain_gain_reduction: float


def sweep(
    lambdas=LAMBDAS,
    seed: int = 0,
    pretrain_steps: int = 150,
    cpt_steps: int = 40,
    cpt_lr: float = 1e-3,
    fisher_samples: int = 64,
    workdir: Path | None = None,
) -> list[SweepRow]:
    """Pretrain once on general prose, then one no-replay domain CPT per lambda; one row per lambda (see module doc)."""
    import torch

    from dapt_core.config import TrainConfig
    from dapt_core.metrics import bits_per_byte
    from dapt_core.train import train
    from tests.corpus import prose
    from tests.tiny_model import byte_level_tokenizer, packed_rows, tiny_llama, write_packed_shard

    with tempfile.TemporaryDirectory(prefix="dapt-ewc-") as tmp_s:
        tmp = Path(workdir or tmp_s)
        offset = 10_000 * seed  # each seed its own documents
        general = [prose(offset + i, "general") for i in range(120)]
        domain = [prose(offset + i, "domain") for i in range(120)]
        general_eval = [prose(offset + 5000 + i, "general") for i in range(16)]
        domain_eval = [prose(offset + 5000 + i, "domain") for i in range(16)]
        tok = byte_level_tokenizer(general + domain, 1000)
        general_rows = packed_rows(tok, general, SEQ_LEN)
        write_packed_shard(tmp / "general" / "shard.parquet", general_rows)
        write_packed_shard(tmp / "domain" / "shard.parquet", packed_rows(tok, domain, SEQ_LEN))

        pre_cfg = TrainConfig(
            lr=1e-3,
            max_steps=pretrain_steps,
            batch_size=8,
            save_every=10**6,
            warmup_ratio=0.05,
            seed=seed,
            report_to=[],
        )
        base = train(
            tiny_llama(len(tok), seed=seed),
            [tmp / "general" / "shard.parquet"],
            pre_cfg,
            tmp / "pretrain",
            resume=False,
        ).model

        def measure(model) -> tuple[float, float]:
            return bits_per_byte(model, tok, general_eval), bits_per_byte(model, tok, domain_eval)

        base_general, base_domain = measure(base)
        results: list[tuple[float, float, float]] = []
        for lam in lambdas:
            cfg = TrainConfig(
                lr=cpt_lr,
                max_steps=cpt_steps,
                batch_size=8,
                save_every=10**6,
                warmup_ratio=0.0,
                seed=seed,
                report_to=[],
                ewc={"enabled": lam > 0, "lambda": lam, "fisher_samples": fisher_samples},
            )
            torch.manual_seed(seed)
            out = train(
                copy.deepcopy(base),
                [tmp / "domain" / "shard.parquet"],
                cfg,
                tmp / f"cpt-{lam:g}",
                resume=False,
                general_samples=general_rows if lam > 0 else None,
            ).model
            results.append((lam, *measure(out)))

    plain = next((g, d) for lam, g, d in results if lam == 0)
    plain_forgetting, plain_gain = plain[0] - base_general, base_domain - plain[1]
    return [
        SweepRow(
            lambda_=lam,
            general_bpb=g,
            domain_bpb=d,
            forgetting=g - base_general,
            domain_gain=base_domain - d,
            forgetting_reduction=1 - (g - base_general) / plain_forgetting,
            domain_gain_reduction=1 - (base_domain - d) / plain_gain,
        )
        for lam, g, d in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lambdas", type=float, nargs="*", default=list(LAMBDAS))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    lambdas = sorted({0.0, *args.lambdas})
    by_lambda: dict[float, list[SweepRow]] = {lam: [] for lam in lambdas}
    for seed in range(args.seeds):
        for row in sweep(lambdas, seed=seed):
            by_lambda[row.lambda_].append(row)
            print(
                f"seed {seed} lambda {row.lambda_:<6g} general bpb {row.general_bpb:.4f} (+{row.forgetting:.4f}) "
                f"domain bpb {row.domain_bpb:.4f} (-{row.domain_gain:.4f})",
                flush=True,
            )
    print(
        "\n| lambda | forgetting (general bpb rise) | domain gain "
        "(bpb fall) | forgetting reduction | domain-gain reduction |"
    )
    print("| --- | --- | --- | --- | --- |")
    for lam, rows in by_lambda.items():

        def mean(f, rows=rows):
            return sum(f(r) for r in rows) / len(rows)

        print(
            f"| {lam:g} | {mean(lambda r: r.forgetting):.4f} | {mean(lambda r: r.domain_gain):.4f} | "
            f"{mean(lambda r: r.forgetting_reduction):.0%} | {mean(lambda r: r.domain_gain_reduction):.0%} |"
        )


if __name__ == "__main__":
    main()
