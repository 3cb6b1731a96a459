"""Small, varied English corpora for tests: clinical-style domain prose and general prose, built from a seed."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from dapt_core.ingest import INGEST_SCHEMA

if TYPE_CHECKING:
    from dapt_core.clean.pipeline import CleanOutput
    from dapt_core.manifest import ArtifactRef

_DOMAIN = [
    "The patient was started on {drug} {dose} mg twice daily after the {organ} biopsy showed {finding}.",
    "Serum creatinine rose to {num}.{num2} mg/dL on day {day}, so the {drug} dose was reduced.",
    "Trough levels of {drug} were monitored weekly because of the risk of {finding}.",
    "A follow-up {organ} ultrasound in week {day} showed no evidence of {finding}.",
    "Given the history of {finding}, the team discussed switching from {drug} to {drug2}.",
    "The {organ} transplant recipient reported mild tremor, a known adverse effect of {drug}.",
    "Blood pressure was {num}0/{num2}0 mmHg and the patient remained afebrile throughout the admission.",
    "Discharge medications included {drug2} {dose} mg and a tapering course of prednisone.",
    "Liver enzymes normalised by week {day}, although {finding} could not be excluded on imaging alone.",
    "Her {organ} graft had functioned well for {num} years before the episode of {finding}.",
    "Pharmacy advised that grapefruit juice raises {drug} exposure and should be avoided.",
    "An infectious disease consult recommended prophylaxis with {drug2} for {num} months.",
    "Biopsy cores were reviewed by two pathologists who graded the {finding} as moderate.",
    "Renal replacement therapy was not required, and urine output recovered within {num} days.",
]
_GENERAL = [
    "The {adj} river runs past the old mill where the town held its market every {weekday}.",
    "Early trains left the station at {num} o'clock, carrying workers toward the {adj} city.",
    "Her grandmother kept a notebook of recipes, each one written in {adj} blue ink.",
    "The library reopened in {year} after the roof was repaired by volunteers from the village.",
    "On {weekday} evenings the choir practised in the hall beside the {adj} church.",
    "Farmers in the valley grew barley and apples, and sold cider at the {adj} fair.",
    "The bridge was built of stone in {year} and widened a century later for motor traffic.",
    "Children walked to school along the canal, counting the {adj} boats moored by the lock.",
    "A travelling circus camped on the common each summer until {year}, when the field was sold.",
    "Fishermen mended their nets on the {adj} quay while gulls circled the harbour wall.",
    "The museum displays a clock that has not stopped since it was wound on a {weekday} in {year}.",
    "Snow closed the mountain pass for {num} weeks, so letters arrived by sledge from the valley.",
    "Local historians argue about whether the {adj} tower was a lighthouse or a granary.",
    "Tea rooms on the high street served scones to walkers returning from the {adj} hills.",
]
FILL = {
    "drug": ["tacrolimus", "cyclosporine", "mycophenolate", "sirolimus", "everolimus", "azathioprine"],
    "drug2": ["belatacept", "basiliximab", "valganciclovir", "amlodipine", "furosemide"],
    "organ": ["renal", "hepatic", "cardiac", "pulmonary", "pancreatic"],
    "finding": ["acute rejection", "nephrotoxicity", "cytomegalovirus infection", "fibrosis", "thrombosis"],
    "adj": ["quiet", "narrow", "famous", "crowded", "ancient", "windy", "green", "busy"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
}


EVAL_QUESTION = (
    "A 54-year-old kidney transplant recipient presents with a fine hand tremor and a rising creatinine three weeks "
    "after her calcineurin inhibitor dose was increased; which laboratory test best guides the next dose change?"
)


def prose(seed: int, kind: str = "domain", sentences: int = 12) -> str:
    """A paragraph of `sentences` varied sentences; different seeds give clearly different documents."""
    rng = random.Random(seed)
    bank = _DOMAIN if kind == "domain" else _GENERAL
    out = []
    for template in rng.sample(bank, min(sentences, len(bank))):  # no template twice: no repeated n-grams
        fill = {k: rng.choice(v) for k, v in FILL.items()}
        fill.update(
            dose=rng.choice([1, 2, 5, 10, 250, 500]),
            num=rng.randint(1, 9),
            num2=rng.randint(1, 9),
            day=rng.randint(2, 60),
            year=rng.randint(1850, 1990),
        )
        out.append(template.format(**fill))
    return " ".join(out)


def write_corpus(root: Path, n_domain: int = 12, n_general: int = 6, seed: int = 0) -> dict[str, Path]:
    """domain/ (txt + jsonl), general/ (jsonl) and eval/ (jsonl) folders; returns their paths."""
    dirs = {name: root / name for name in ("domain", "general", "eval")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n_domain // 2):
        (dirs["domain"] / f"note{i}.txt").write_text(prose(seed * 1000 + i, "domain"))
    with open(dirs["domain"] / "notes.jsonl", "w") as f:
        for i in range(n_domain - n_domain // 2):
            f.write(json.dumps({"text": prose(seed * 1000 + 500 + i, "domain")}) + "\n")
    with open(dirs["general"] / "general.jsonl", "w") as f:
        for i in range(n_general):
            f.write(json.dumps({"text": prose(seed * 1000 + 900 + i, "general")}) + "\n")
    with open(dirs["eval"] / "eval.jsonl", "w") as f:
        f.write(json.dumps({"text": EVAL_QUESTION}) + "\n")
    return dirs


def write_config(root: Path, dirs: dict[str, Path], store: str | None = None, extra: str = "") -> Path:
    cfg = root / "config.yaml"
    cfg.write_text(
        f"""project: test
store: {store or root / "store"}
data:
  domain: [{{name: notes, paths: ["{dirs["domain"]}"]}}]
  general: [{{name: general, paths: ["{dirs["general"]}"]}}]
  eval: [{{name: evalset, paths: ["{dirs["eval"]}"]}}]
{extra}"""
    )
    return cfg


def general_multiple_choice(path: Path, n: int = 300) -> Path:
    """A multiple-choice benchmark (JSONL: question, choices, answer index) from the general prose tests pretrain on
    (`prose(i, "general")`, i < 100): a sentence without its last four words, then its true ending against the endings
    of three sentences of other templates. For `prompt: completion`."""
    general = [s.strip().rstrip(".") for i in range(100) for s in prose(i, "general").split(". ") if len(s.split()) > 8]
    rng = random.Random(0)
    with open(path, "w") as f:
        for i, s in enumerate(general[:n]):
            words = s.split()
            others = [o for o in rng.sample(general, 12) if o.split()[:3] != words[:3]][:3]
            choices = [" ".join(o.split()[-4:]) for o in others]
            choices.insert(i % 4, " ".join(words[-4:]))
            f.write(json.dumps({"question": " ".join(words[:-4]), "choices": choices, "answer": i % 4}) + "\n")
    return path


def write_shard(path: Path, texts: list[str], source: str = "notes", kind: str = "domain") -> Path:
    """A shard as ingest writes it (its schema), doc_id = blake2b-128 of the raw text, one document a line."""
    n = len(texts)
    table = pa.table(
        {
            "doc_id": [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts],
            "text": texts,
            "source": [source] * n,
            "kind": [kind] * n,
            "file": [path.stem + ".txt"] * n,
            "position": [f"line {i + 1}" for i in range(n)],
            "format": ["txt"] * n,
        },
        schema=INGEST_SCHEMA,
    )
    pq.write_table(table, path)
    return path


def near_copy(text: str, k: int) -> str:
    """The text with one word in a few hundred changed: well above the near-duplicate Jaccard threshold."""
    words = text.split()
    words[len(words) // 2] = f"changed{k}"
    return " ".join(words)


def kept_table(parts: list[ArtifactRef]) -> pa.Table:
    """The documents of a kept corpus's parts (local files, or a local store's), in order."""
    return pq.read_table([p.uri for p in parts])


def assert_same_clean_outputs(a: CleanOutput, b: CleanOutput) -> None:
    """Two clean runs ended in the same place: byte-identical decisions and kept corpora (or no corpus of a kind in
    either), and the same stats."""
    assert a.decisions_path.read_bytes() == b.decisions_path.read_bytes(), "the decisions differ"
    for name in ("domain_parts", "general_parts"):
        x, y = ([Path(p.uri).read_bytes() for p in getattr(run, name)] for run in (a, b))
        assert x == y, f"{name}: {getattr(a, name)} and {getattr(b, name)} differ"
    assert a.stats == b.stats
