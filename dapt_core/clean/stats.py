"""Per-source statistics of the clean stage, computed in DuckDB, and their Markdown report."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from dapt_core.clean.duck import literal
from dapt_core.manifest import NewDocuments, SourceStats

TOKEN_ESTIMATE = "kept UTF-8 bytes / 4 (no tokenizer involved)"
_WORD_STATS = ("min", "p10", "p50", "p90", "max", "mean")
MAX_QUARANTINE_ROWS = 200  # the Markdown report lists this many quarantined inputs; stats.json lists them all


def corpus_stats(con: duckdb.DuckDBPyConnection) -> dict:
    """Stats per (source, kind) and in total, and every quarantined input with its details, from the table
    `decided(source, kind, file, position, status, reason, detail, words, bytes, cluster_id)` of every input
    document."""
    rows = con.execute("""
        SELECT source, kind,
            count(*) AS input_docs,
            count(*) FILTER (WHERE status = 'kept') AS kept_docs,
            coalesce(sum(bytes) FILTER (WHERE status = 'kept'), 0) AS kept_bytes,
            min(words) FILTER (WHERE status = 'kept'),
            quantile_disc(words, [0.1, 0.5, 0.9]) FILTER (WHERE status = 'kept'),
            max(words) FILTER (WHERE status = 'kept'),
            avg(words) FILTER (WHERE status = 'kept'),
            count(DISTINCT cluster_id) AS duplicate_clusters,
            count(cluster_id) AS docs_in_duplicate_clusters
        FROM decided
        GROUP BY GROUPING SETS ((source, kind), ())
        ORDER BY source IS NULL, kind = 'general', source""").fetchall()
    drops = con.execute("""
        SELECT source, kind, reason, count(*) FROM decided WHERE status = 'dropped'
        GROUP BY GROUPING SETS ((source, kind, reason), (reason))
        ORDER BY ALL""").fetchall()
    dropped: dict[tuple, dict[str, int]] = {}
    for source, kind, reason, n in drops:
        dropped.setdefault((source, kind), {})[reason] = n
    entries = []
    for source, kind, input_docs, kept_docs, kept_bytes, w_min, w_q, w_max, w_mean, clusters, clustered in rows:
        entries.append(
            {
                "source": source,
                "kind": kind,
                "input_docs": input_docs,
                "kept_docs": kept_docs,
                "kept_bytes": int(kept_bytes),
                "kept_est_tokens": int(kept_bytes) // 4,
                "kept_words": dict(
                    zip(_WORD_STATS, [w_min, *(w_q or [None] * 3), w_max, None if w_mean is None else round(w_mean, 1)])
                ),
                "dropped": dropped.get((source, kind), {}),
                "duplicate_clusters": clusters,
                "docs_in_duplicate_clusters": clustered,
            }
        )
    total = entries.pop()
    del total["source"], total["kind"]
    quarantined = con.execute("""
        SELECT source, kind, file, position, substr(reason, length('quarantine:') + 1) AS reason,
            coalesce(detail, '') AS detail
        FROM decided WHERE reason LIKE 'quarantine:%'
        ORDER BY kind = 'general', source, file, length(position), position""").fetchall()
    columns = ("source", "kind", "file", "position", "reason", "detail")
    return {
        "token_estimate": TOKEN_ESTIMATE,
        "total": total,
        "sources": entries,
        "quarantined": [dict(zip(columns, row)) for row in quarantined],
    }


def source_stats(stats: dict) -> list[SourceStats]:
    return [SourceStats(**{k: s[k] for k in SourceStats.model_fields}) for s in stats["sources"]]


def stats_markdown(stats: dict) -> str:
    """A readable report: volumes, kept document lengths, drops per reason, duplicate clusters."""
    total, sources = stats["total"], stats["sources"]
    rows = [*sources, {**total, "source": "**total**", "kind": ""}]
    out = ["# Clean stage report", "", f"Estimated tokens: {stats['token_estimate']}. Words: whitespace-separated.", ""]
    out += _table(
        ["source", "kind", "input docs", "kept docs", "kept %", "kept bytes", "est. tokens"],
        [
            [
                r["source"],
                r["kind"],
                r["input_docs"],
                r["kept_docs"],
                _percent(r["kept_docs"], r["input_docs"]),
                r["kept_bytes"],
                r["kept_est_tokens"],
            ]
            for r in rows
        ],
        text_columns=2,
    )
    out += ["", "## Kept document length (words)", ""]
    out += _table(["source", *_WORD_STATS], [[r["source"], *(r["kept_words"][k] for k in _WORD_STATS)] for r in rows])
    out += ["", "## Dropped documents", ""]
    reasons = sorted(total["dropped"])
    if reasons:
        out += _table(
            ["reason", *(r["source"] for r in rows)],
            [[why, *(r["dropped"].get(why, 0) for r in rows)] for why in reasons],
        )
    else:
        out.append("Nothing was dropped.")
    out += ["", "## Quarantined inputs", ""]
    quarantined = stats["quarantined"]
    if quarantined:
        shown = quarantined[:MAX_QUARANTINE_ROWS]
        out += _table(
            ["source", "file", "position", "reason", "detail"],
            [[q["source"], _cell_text(q["file"]), q["position"], q["reason"], _cell_text(q["detail"])] for q in shown],
            text_columns=5,
        )
        if len(quarantined) > len(shown):
            out += [
                "",
                f"… and {len(quarantined) - len(shown):,} more: all are listed in stats.json and decisions.parquet.",
            ]
    else:
        out.append("No input was quarantined.")
    out += [
        "",
        "## Duplicate clusters",
        "",
        "A cluster is a kept document with the exact and near duplicates dropped in its favour.",
        "",
    ]
    out += _table(
        ["source", "clusters", "docs in clusters"],
        [[r["source"], r["duplicate_clusters"], r["docs_in_duplicate_clusters"]] for r in rows],
    )
    return "\n".join(out) + "\n"


def _cell_text(text: str) -> str:
    """Free text (an error message, a path) made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def _table(header: list[str], rows: list[list], text_columns: int = 1) -> list[str]:
    """A Markdown table; the first `text_columns` columns are left-aligned, the numbers right-aligned."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:,}" if isinstance(v, int) else str(v)

    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def new_documents(decisions: Path, new_files: set[str]) -> NewDocuments:
    """What the input documents of `new_files` (those a refresh read) brought: how many there were, and how many of
    them were dropped as duplicates of a document of an earlier file."""
    con = duckdb.connect()
    try:
        con.register("new_files", pa.table({"file": sorted(new_files)}, schema=pa.schema([("file", pa.string())])))
        docs, near, exact = con.execute(f"""
            WITH d AS (SELECT * FROM read_parquet({literal(decisions)}))
            SELECT count(*),
                count(*) FILTER (WHERE d.reason = 'near_duplicate' AND o.file NOT IN (SELECT file FROM new_files)),
                count(*) FILTER (WHERE d.reason = 'exact_duplicate' AND o.file NOT IN (SELECT file FROM new_files))
            FROM d LEFT JOIN d o ON o.doc_uid = d.duplicate_of
            WHERE d.file IN (SELECT file FROM new_files)""").fetchone()
    finally:
        con.close()
    return NewDocuments(
        files=len(new_files), docs=docs, near_duplicates_of_earlier=near, exact_duplicates_of_earlier=exact
    )
