"""The markdown report, built from pandas DataFrames: header, summary, latency, then every question.

Every cell goes through ``escape_cell`` so that pipes, newlines, HTML and code fences in model
answers cannot break a table.
"""

from __future__ import annotations

import pandas as pd

from jobs.history import Comparison
from jobs.results import format_sources
from jobs.scoring.summary import MODES, OVERALL


def escape_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    text = str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip().replace("\n", "<br>")
    return text


def _table(df: pd.DataFrame) -> str:
    safe = df.copy()
    safe.columns = [escape_cell(c) for c in safe.columns]
    for col in safe.columns:
        safe[col] = safe[col].map(escape_cell)
    return safe.to_markdown(index=False, disable_numparse=True)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    return f"{a - b:+.2f}"


def summary_table(summary: dict) -> pd.DataFrame:
    rows = []
    groups = [(cat, v) for cat, v in sorted(summary["by_category"].items())] + [(OVERALL, summary[OVERALL])]
    for name, by_mode in groups:
        bare, rag = by_mode.get("bare", {}), by_mode.get("rag", {})
        rows.append({
            "category": f"**{name}**" if name == OVERALL else name,
            "n": rag.get("n", bare.get("n")),
            "keyword hit (bare)": _fmt(bare.get("keyword_hit_rate")),
            "keyword hit (RAG)": _fmt(rag.get("keyword_hit_rate")),
            "Δ": _delta(rag.get("keyword_hit_rate"), bare.get("keyword_hit_rate")),
            "all keywords (bare)": _fmt(bare.get("all_keywords_hit")),
            "all keywords (RAG)": _fmt(rag.get("all_keywords_hit")),
            "abstained (bare)": _fmt(bare.get("abstention")),
            "abstained (RAG)": _fmt(rag.get("abstention")),
            "hit@1": _fmt(rag.get("hit_at_1")),
            "hit@3": _fmt(rag.get("hit_at_3")),
            "hit@5": _fmt(rag.get("hit_at_5")),
            "MRR": _fmt(rag.get("mrr")),
        })
    return pd.DataFrame(rows)


def latency_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for mode in MODES:
        sub = df[df["mode"] == mode]
        if sub.empty:
            continue
        for stage in ("retrieve_s", "generate_s"):
            values = pd.to_numeric(sub[stage], errors="coerce").dropna()
            if stage == "retrieve_s" and mode == "bare":
                continue
            rows.append({
                "mode": mode, "stage": stage.removesuffix("_s"),
                "mean s": _fmt(values.mean()), "p50 s": _fmt(values.quantile(0.5)),
                "p95 s": _fmt(values.quantile(0.95)), "total s": _fmt(values.sum(), 1),
            })
        rows.append({
            "mode": mode, "stage": "tokens (prompt → answer, mean)",
            "mean s": f"{sub['prompt_tokens'].mean():.0f} → {sub['answer_tokens'].mean():.0f}",
            "p50 s": "", "p95 s": "", "total s": "",
        })
    return pd.DataFrame(rows)


def _error(row: pd.Series) -> str:
    value = row.get("error")
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _outcome(row: pd.Series) -> str:
    if _error(row):
        return f"failed: {_error(row)}"
    if row["category"] == "negative":
        return "abstained" if row["abstained"] else "answered"
    if pd.isna(row["keyword_hit_rate"]):
        return ""
    return f"{row['keyword_hit_rate']:.2f}" + (" ✓" if row["all_keywords_hit"] else "")


def _failed(row: pd.Series) -> bool:
    if row["category"] == "negative":
        return not bool(row["abstained"])
    return not bool(row["all_keywords_hit"])


def questions_table(df: pd.DataFrame) -> pd.DataFrame:
    bare = df[df["mode"] == "bare"].set_index("id")
    rag = df[df["mode"] == "rag"].set_index("id")
    rows = []
    for qid in rag.index.union(bare.index, sort=False):
        b = bare.loc[qid] if qid in bare.index else None
        r = rag.loc[qid] if qid in rag.index else None
        first = r if r is not None else b
        rows.append({
            "_failed": _failed(r) if r is not None else True,
            "id": qid,
            "category": first["category"],
            "question": first["question"],
            "expected": "(abstain)" if first["category"] == "negative"
            else ", ".join(k for k in str(first["expected_keywords"] or "").split("|") if k and k != "nan") or "–",
            "bare answer": b["answer"] if b is not None else "",
            "bare": _outcome(b) if b is not None else "",
            "RAG answer": r["answer"] if r is not None else "",
            "RAG": _outcome(r) if r is not None else "",
            "top sources (score)": format_sources(r["retrieved"]) if r is not None else "",
        })
    table = pd.DataFrame(rows)
    # Failures first (RAG missed a keyword or failed to abstain), then by id.
    table = table.sort_values(["_failed", "id"], ascending=[False, True], kind="stable")
    return table.drop(columns="_failed")


def stale_sources_section(df: pd.DataFrame) -> list[str]:
    """Questions whose expected sources the store does not hold (their retrieval scores are misses)."""
    if "missing_sources" not in df:
        return []
    rows = df[(df["mode"] == "rag") & (df["missing_sources"].fillna("").astype(str) != "")]
    if rows.empty:
        return []
    table = pd.DataFrame({"id": rows["id"], "question": rows["question"],
                          "expected sources not in the store": rows["missing_sources"].str.replace("|", "\n")})
    return [f"## Expected sources not in the store ({len(rows)})", "",
            "These files are named by the question set but the store has no such file (renamed or removed "
            "upstream?): retrieval cannot hit them, so hit@k and MRR count these as misses. Update the "
            "question set.", "", _table(table), ""]


def header_table(info: dict) -> pd.DataFrame:
    return pd.DataFrame([{"": k, "value": v} for k, v in info.items()])


def comparison_section(comp: Comparison) -> list[str]:
    lines = [f"## Since the last run ({comp.baseline})", ""]
    if comp.differences:
        lines += ["Settings that differ (results may move for these reasons):", ""]
        lines += [f"- {escape_cell(d)}" for d in comp.differences] + [""]
    else:
        lines += ["Same profile, models, corpus and prompts as the baseline.", ""]
    if not comp.deltas.empty:
        deltas = comp.deltas.copy()
        for col in deltas.columns[2:]:
            deltas[col] = deltas[col].map(lambda v: "–" if v is None or pd.isna(v) else f"{v:+.2f}")
        lines += ["Change in each metric (now minus then):", "", _table(deltas), ""]
    lines += [f"### Regressions ({len(comp.regressions)}): passed then, fail now", ""]
    lines += [_table(comp.regressions) if len(comp.regressions) else "None.", ""]
    lines += [f"### Fixed ({len(comp.fixed)}): failed then, pass now", ""]
    lines += [_table(comp.fixed) if len(comp.fixed) else "None.", ""]
    return lines


def render(run_info: dict, header: dict, summary: dict, df: pd.DataFrame, comparison: Comparison | None = None,
           figures: dict[str, str] | None = None) -> str:
    n_questions = int(df["id"].nunique()) if not df.empty else 0
    n_fail = sum(1 for _, r in df[df["mode"] == "rag"].iterrows() if _failed(r))
    since = comparison_section(comparison) if comparison else ["## Since the last run", "",
                                                               "No earlier finished run over these questions.", ""]
    plots = [f"![{title}]({name})" for title, name in (figures or {}).items()]
    parts = [
        f"# RAG regression report · {run_info['run_id']}",
        "",
        "How much retrieval improves the model's answers about the XTuner docs. Keyword hit = share of a "
        "question's expected keywords found in the answer (NFKC, case-folded); negatives are scored on "
        "abstention; retrieval hit@k/MRR are file-level against the expected sources.",
        "",
        "## Run",
        _table(header_table(header)),
        "",
        "## Summary: bare vs RAG",
        _table(summary_table(summary)),
        "",
        *plots[:1],
        "",
        *since,
        *plots[1:],
        "",
        "## Latency",
        _table(latency_table(df)),
        "",
        *stale_sources_section(df),
        f"## Questions ({n_fail} of {n_questions} fail with RAG; failures first)",
        _table(questions_table(df)),
        "",
    ]
    return "\n".join(parts)
