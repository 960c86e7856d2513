"""Aggregates per category and overall, per mode, from the per-question results table."""

from __future__ import annotations

import math

import pandas as pd

from jobs.eval.scoring import metrics as M

MODES = M.BOTH
# The metrics summarise() gives a mean of, per mode (jobs.eval.scoring.metrics: all but pass/fail).
METRICS = M.names(summarised=True)
# Better when lower: a threshold or a verdict reads these the other way round.
LOWER_BETTER = M.names(higher_is_better=False)
OVERALL = "overall"


def _mean(series: pd.Series) -> float | None:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def _aggregate(rows: pd.DataFrame) -> dict[str, float | int | None]:
    negatives = rows[rows["category"] == "negative"]
    out: dict[str, float | int | None] = {"n": int(rows["id"].nunique())}
    for name in METRICS:
        if name == "abstention":  # measured on negative questions only, from their abstained flag
            out[name] = _mean(negatives["abstained"]) if len(negatives) else None
        else:
            # strict_keyword_hit_rate and passage_dump come from jobs.eval.scoring.copying.annotate: absent
            # from frames it did not annotate.
            out[name] = _mean(rows[name]) if name in rows else None
    return out


def summarise(df: pd.DataFrame) -> dict:
    """{"overall": {mode: metrics}, "by_category": {category: {mode: metrics}}}."""
    out: dict = {OVERALL: {}, "by_category": {}}
    for mode in MODES:
        rows = df[df["mode"] == mode]
        out[OVERALL][mode] = _aggregate(rows)
        for cat, group in rows.groupby("category", sort=True):
            out["by_category"].setdefault(cat, {})[mode] = _aggregate(group)
    return out


def metric(summary: dict, key: str) -> float | None:
    """`rag.keyword_hit_rate`, `bare.abstention`, or `gain.keyword_hit_rate` (RAG minus bare), overall."""
    mode, _, name = key.partition(".")
    if mode == "gain":
        a, b = metric(summary, f"rag.{name}"), metric(summary, f"bare.{name}")
        return None if a is None or b is None else a - b
    value = summary[OVERALL].get(mode, {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarise_run(df: pd.DataFrame) -> dict:
    """``summarise`` plus how sure each number is (intervals), the paired RAG-vs-bare tests, and the stage
    that failed for each RAG answer, counted (``df`` annotated by jobs.eval.scoring.attribution)."""
    from jobs.eval.scoring import attribution
    from jobs.eval.scoring import statistics as stats

    summary = summarise(df)
    summary["intervals"] = stats.intervals(df)
    summary["rag_vs_bare"] = [c.as_dict() for c in stats.rag_vs_bare(df)]
    if "stage" in df:
        summary["stages"] = attribution.stage_counts(df).to_dict(orient="records")
    return summary
