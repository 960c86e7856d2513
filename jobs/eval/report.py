"""The markdown report, built from pandas DataFrames, answers first: the verdict (RAG against bare, since
the last run, the stage to fix first, the questions that moved, what the set can detect), then the answer
and retrieval scores with intervals, why RAG answers failed, which copied their passages, what changed
since the last run (and what a docs update did), latency, every question, and the run's settings last.

Every cell goes through ``escape_cell`` so that pipes, newlines, HTML and code fences in model
answers cannot break a table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from jobs.common.files import atomic_write
from jobs.eval.drift import DocsChange
from jobs.eval.history import Comparison, run_outcome
from jobs.eval.results import SUMMARY, RunDir, format_sources
from jobs.eval.scoring import attribution, copying
from jobs.eval.scoring import metrics as M
from jobs.eval.scoring import statistics as stats
from jobs.eval.scoring.summary import MODES, OVERALL

# Spans a renderer could turn into a link by themselves (GFM's autolinks, linkify): scheme:..., www...., e-mail.
_LINKISH = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{0,31}:[^\s<>|]+|\bwww\.[^\s<>|]+|[^\s<>|@]+@[^\s<>|@]+\.[a-z]{2,}")
_DEFANG = str.maketrans({":": "&#58;", "/": "&#47;", ".": "&#46;", "@": "&#64;"})


def escape_cell(value: object) -> str:
    """Model answers, retrieved passages and questions as inert text: no HTML, no table breaks, and no live
    link or image (retrieved pages can steer what a model writes, and an image URL in a report is fetched
    by whoever views it). Markdown link syntax loses its brackets and URLs their punctuation to character
    references: they read the same, but no renderer sees a link in them."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    text = str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _LINKISH.sub(lambda m: m.group(0).translate(_DEFANG), text)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    text = text.replace("[", "&#91;").replace("]", "&#93;")
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


def _with_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    """``0.48 (0.36–0.60)``, or signed ``+0.27 (+0.10…+0.44)`` (a dash between signed numbers reads as a minus)."""
    if value is None or pd.isna(value):
        return "–"
    number = f"{value:+.2f}" if signed else f"{value:.2f}"
    if not ci:
        return number
    if signed:
        return f"{number} ({ci[0]:+.2f}…{ci[1]:+.2f})"
    return f"{number} ({ci[0]:.2f}–{ci[1]:.2f})"


def _intervals_whole(df: pd.DataFrame) -> pd.DataFrame:
    """A score table for the report: a word joiner (invisible) after each interval's dash, so a narrow rendered
    table wraps a cell between the number and its interval, never inside the interval. (Not for a terminal:
    tabulate counts the joiner as a column.)"""
    return df.map(lambda v: v.replace("–", "–\u2060").replace("…", "…\u2060") if isinstance(v, str) and "(" in v
                  else v)


# The report's two score tables (jobs.eval.scoring.metrics, ``report``): the answers' scores, and retrieval's
# (the metrics measured against expected sources, RAG only).
ANSWER_METRICS = tuple(m.name for m in M.TABLE if m.report and m.needs != M.SOURCES)
RETRIEVAL_METRICS = tuple(m.name for m in M.TABLE if m.report and m.needs == M.SOURCES)
_MODE_NAMES = {"bare": "bare", "rag": "RAG", "gain": "gain"}


def _score_groups(summary: dict) -> list[tuple[str, dict]]:
    return [(cat, v) for cat, v in sorted(summary["by_category"].items())] + [(OVERALL, summary[OVERALL])]


def scores_table(summary: dict, metrics: tuple[str, ...], *, mode_in_header: bool = True) -> pd.DataFrame:
    """Per category and overall, one column per metric and mode the metric table puts in the report; each
    number with its 95% interval over questions, where there are 2 or more. Gain = RAG minus bare, paired."""
    rows = []
    intervals = summary.get("intervals", {})
    for name, by_mode in _score_groups(summary):
        ci = intervals.get(name, {})
        row = {"category": f"**{name}**" if name == OVERALL else name,
               "n": by_mode.get("rag", {}).get("n", by_mode.get("bare", {}).get("n"))}
        for metric in metrics:
            m = M.get(metric)
            for mode in m.report:
                if mode == "gain":
                    rag, bare = by_mode.get("rag", {}).get(metric), by_mode.get("bare", {}).get(metric)
                    value = None if rag is None or bare is None else rag - bare
                else:
                    value = by_mode.get(mode, {}).get(metric)
                column = f"{m.label} ({_MODE_NAMES[mode]})" if mode_in_header else m.label
                row[column] = _with_ci(value, ci.get(mode, {}).get(metric), signed=mode == "gain")
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(summary: dict) -> pd.DataFrame:
    """The answers' scores, bare and RAG (what ``python -m jobs.eval`` prints): keyword hit and its gain, the
    keyword hit not crediting passage dumps, dumps, all keywords, abstention."""
    return scores_table(summary, ANSWER_METRICS)


def retrieval_table(summary: dict) -> pd.DataFrame:
    """Retrieval's scores (RAG answers only): file-level hit@k and MRR against the expected sources."""
    return scores_table(summary, RETRIEVAL_METRICS, mode_in_header=False)


def changes_table(changes: list[dict] | list[stats.Change], *, then: str = "then", now: str = "now") -> pd.DataFrame:
    rows = []
    for c in changes:
        c = c if isinstance(c, dict) else c.as_dict()
        ci = "–" if c["low"] is None else f"{c['low']:+.2f}…{c['high']:+.2f}"
        rows.append({"category": c["group"], "mode": c["mode"], "metric": M.label(c["metric"]),
                     "n": c["n"], then: f"{c['then']:.2f}", now: f"{c['now']:.2f}", "change": f"{c['delta']:+.2f}",
                     "95% CI": ci, "p": f"{c['p']:.3g}", "test": c["test"],
                     "": "**significant**" if c["significant"] else "within noise"})
    return pd.DataFrame(rows)


def _detectable(n: int) -> str:
    """What a set of ``n`` scored questions can detect, as one sentence."""
    detectable = stats.smallest_detectable(n)
    return (f"On these {n} questions a pass rate must move by at least {detectable:.2f} "
            f"({stats.min_same_way()} questions the same way, none back) to be significant."
            if detectable else f"{n} questions are too few for any difference to be significant (a paired test "
            f"needs at least {stats.min_same_way()} questions moving the same way, none back).")


def testable_categories(summary: dict) -> tuple[list[str], dict[str, int]]:
    """(categories with enough questions for a paired test to reach significance, {the others: their size})."""
    enough, too_few = [], {}
    for cat, by_mode in sorted(summary.get("by_category", {}).items()):
        n = int(by_mode.get("rag", by_mode.get("bare", {})).get("n") or 0)
        if n >= stats.min_same_way():
            enough.append(cat)
        else:
            too_few[cat] = n
    return enough, too_few


def rag_vs_bare_section(summary: dict, n: int) -> list[str]:
    """The paired tests of RAG against bare: overall, and for each category with enough questions to test."""
    changes = summary.get("rag_vs_bare") or []
    if not changes:
        return []
    enough, too_few = testable_categories(summary)
    shown = [c for c in changes if c["group"] == OVERALL or c["group"] in enough]
    shown.sort(key=lambda c: c["group"] != OVERALL)  # overall first (stable: metrics in table order)
    table = changes_table(shown, then="bare", now="RAG").drop(columns="mode")
    lines = ["### Is RAG better than bare? (paired, same questions)", "", _table(table), ""]
    if too_few:
        lines += [f"Not tested per category, fewer than {stats.min_same_way()} questions each (no difference "
                  "could be significant): " + ", ".join(f"{escape_cell(c)} ({k})" for c, k in too_few.items())
                  + ".", ""]
    return lines + ["Intervals: 95% paired bootstrap over questions. Tests: exact McNemar on pass/fail, Wilcoxon "
                    f"signed-rank on per-question rates; significant = p < {stats.ALPHA}. " + _detectable(n), ""]


def _change_line(change: dict | None, what: str) -> str:
    """``keyword hit 0.21 → 0.48: +0.27 (95% CI +0.10…+0.44, p = 0.031), **significant**``."""
    if change is None:
        return f"{what}: not measured"
    ci = "" if change["low"] is None else f"95% CI {change['low']:+.2f}…{change['high']:+.2f}, "
    verdict = "**significant**" if change["significant"] else "within noise"
    return (f"{what} {change['then']:.2f} → {change['now']:.2f}: **{change['delta']:+.2f}** "
            f"({ci}p = {change['p']:.2g}), {verdict}")


def _ids(flips: pd.DataFrame, most: int = 15) -> str:
    if not len(flips):
        return "none"
    names = [f"{escape_cell(r['id'])} ({_MODE_NAMES.get(r['mode'], escape_cell(r['mode']))})"
             for _, r in flips.iterrows()]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def verdict_section(summary: dict, df: pd.DataFrame, comparison: Comparison | None) -> list[str]:
    """The report's first screen: is RAG better than bare, did anything regress since the last run, which
    stage to fix first, which questions moved, and what this question set can detect at all."""
    overall = {c["metric"]: c for c in summary.get("rag_vs_bare") or []
               if c["group"] == OVERALL and c["mode"] == "gain"}
    lines = ["## Verdict", "",
             f"- **RAG against bare:** {_change_line(overall.get('keyword_hit_rate'), M.label('keyword_hit_rate'))}"
             f"; {_change_line(overall.get('passed'), M.label('passed'))}."]
    if comparison is None:
        lines.append("- **Since the last run:** no earlier finished run over these questions.")
    else:
        regression, verdict = comparison.regression(floor=False)  # what the set can detect: its own line
        differ = [d.split(":", 1)[0] for d in comparison.differences]
        lines.append(f"- **Since the last run** ({escape_cell(comparison.baseline)}): "
                     + (f"**{verdict}**." if regression else f"{verdict}.")
                     + (f" Settings that differ: {escape_cell(', '.join(differ))}." if differ else
                        " Same profile, models, corpus and prompts."))
    if "stage" in df and df["stage"].notna().any():
        first = attribution.fix_first(attribution.stage_counts(df))
        lines.append(f"- **Fix first:** {first.removeprefix('Fix first: ')}" if first.startswith("Fix first: ")
                     else f"- **Failure stages:** {first}")
    if comparison is not None:
        lines.append(f"- **Regressed** (passed then, fail now): {_ids(comparison.regressions)}. "
                     f"**Fixed:** {_ids(comparison.fixed)}.")
    lines.append(f"- **What this set can detect:** {_detectable(len(stats.per_question(df, 'rag', 'passed')))}")
    return lines + [""]


def stages_section(df: pd.DataFrame) -> list[str]:
    if "stage" not in df or not df["stage"].notna().any():
        return []
    counts = attribution.stage_counts(df)
    lines = ["## Why RAG answers failed", "", attribution.fix_first(counts), "", _table(counts), "",
             "Stages: *retrieval miss* = no expected source among the chunks given to the model; *context lacked "
             "the answer* = an expected source was given but none of the missed keywords is in the context; *model "
             "missed it* = a missed keyword was in the context; *answer failed* = no answer came back.", ""]
    low = attribution.low_support(df)
    if len(low):
        shown = low.assign(support=low["support"].map(lambda v: f"{v:.2f}"))
        lines += [f"### Answers mostly not supported by their context ({len(low)}, support < "
                  f"{attribution.LOW_SUPPORT})", "",
                  "Support = share of the answer's content tokens found in the chunks it was given: a low "
                  "share flags answers that say what their context does not.", "", _table(shown), ""]
    return lines


def dumps_section(df: pd.DataFrame) -> list[str]:
    if "passage_dump" not in df:
        return []
    judged = df[(df["mode"] == "rag") & df["passage_dump"].notna()]
    if judged.empty:
        return []
    dumps = copying.dumped(df)
    lines = [f"## Answers that copy their passages ({len(dumps)} of {len(judged)} RAG answers)", "",
             "A passage dump reproduces the numbered passages of its prompt from a marker on (`[n] (path)`, or "
             f"`[n]` and at least {copying.MIN_COPY} characters of the context word for word) instead of answering. "
             "The keyword hit credits a dump for whatever the copied passage holds; *keyword hit, dumps not "
             "credited* scores each answer only up to where its copying starts. A change that raises the keyword "
             "hit but not this one won by copying.", ""]
    if len(dumps):
        shown = dumps.assign(**{c: dumps[c].map(_fmt) for c in ("keyword_hit_rate", "strict_keyword_hit_rate")})
        lines += [_table(shown.rename(columns={"keyword_hit_rate": "keyword hit",
                                               "strict_keyword_hit_rate": "not crediting the copy"})), ""]
    return lines


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
    dump = row.get("passage_dump") is True
    return f"{row['keyword_hit_rate']:.2f}" + (" ✓" if row["all_keywords_hit"] else "") + (
        f" (passage dump: {row['strict_keyword_hit_rate']:.2f} not crediting the copy)" if dump else "")


def _failed(row: pd.Series) -> bool:
    return not stats.passed(row)


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
            "stage": (r.get("stage") or "") if r is not None else "",
            "support": _fmt(r.get("support")) if r is not None and r.get("support") is not None else "",
            "top sources (score)": format_sources(r["retrieved"]) if r is not None else "",
        })
    table = pd.DataFrame(rows)
    if "rewrite" in df and df["rewrite"].fillna("").astype(str).ne("").any():
        # The query retrieval also used (a translation by the chat model), beside the question it came from.
        rewrites = rag["rewrite"].fillna("").astype(str)
        table.insert(4, "query rewrite", [rewrites.get(qid, "") for qid in table["id"]])
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
    # An unset value (no pinned revision for a local model folder) reads as a dash, not an empty cell.
    return pd.DataFrame([{"": k, "value": "–" if v is None or v == "" else v} for k, v in info.items()])


def comparison_section(comp: Comparison) -> list[str]:
    regression, verdict = comp.regression()
    lines = [f"## Since the last run ({comp.baseline})", "",
             f"**Verdict: {verdict}.**" if regression else f"Verdict: {verdict}.", ""]
    if comp.differences:
        lines += ["Settings that differ (results may move for these reasons):", ""]
        lines += [f"- {escape_cell(d)}" for d in comp.differences] + [""]
    else:
        lines += ["Same profile, models, corpus and prompts as the baseline.", ""]
    overall = [c for c in comp.changes if c.group == OVERALL]
    if overall:
        lines += ["Change in each metric (now minus then, paired on the questions both runs answered):", "",
                  _table(changes_table(overall)), ""]
    per_category = [c for c in comp.changes if c.group != OVERALL]
    if per_category:
        lines += ["<details><summary>Per category</summary>", "", _table(changes_table(per_category)), "",
                  "</details>", ""]
    lines += [f"### Regressions ({len(comp.regressions)}): passed then, fail now", ""]
    lines += [_table(comp.regressions) if len(comp.regressions) else "None.", ""]
    lines += [f"### Fixed ({len(comp.fixed)}): failed then, pass now", ""]
    lines += [_table(comp.fixed) if len(comp.fixed) else "None.", ""]
    if comp.docs is not None:
        lines += docs_section(comp.docs)
    return lines


def docs_section(docs: DocsChange) -> list[str]:
    counts = docs.counts()
    lines = [f"## Docs changed: {docs.commit_before[:12]} → {docs.commit_now[:12]}", "",
             f"{counts['added']} file(s) added, {counts['changed']} changed, {counts['removed']} removed. "
             f"{counts['questions touched']} question(s) retrieved a changed file in either run, and "
             f"{counts['touched answers changed']} of those answers changed; {counts['answers changed otherwise']} "
             "answer(s) changed although no file they retrieved did (the model or settings moved, not the docs).", ""]
    files = pd.DataFrame([{"file": f, "change": kind} for kind, names in
                          (("added", docs.added), ("changed", docs.changed), ("removed", docs.removed))
                          for f in names])
    if len(files):
        lines += ["<details><summary>Files</summary>", "", _table(files), "", "</details>", ""]
    lines += ["### Questions that retrieved a changed file", ""]
    lines += [_table(docs.touched.drop(columns="answer changed")) if len(docs.touched) else "None.", ""]
    lines += ["### Answers that changed although no retrieved file did", ""]
    lines += [_table(docs.moved_otherwise) if len(docs.moved_otherwise) else "None.", ""]
    return lines


def failed_banner(summary: dict, header: dict, df: pd.DataFrame) -> list[str]:
    """First thing on the page when the night's answers failed: its numbers measure the failure."""
    if summary.get("outcome", "ok") == "ok":
        return []
    errors = df["error"].fillna("").astype(str)
    first = errors[errors != ""]
    return [f"**This run is no success: {header.get('answers failed', len(first))} of {len(df)} answers failed** "
            f"(first: {escape_cell(first.iloc[0][:200]) if len(first) else '–'}). Its numbers measure the failure, "
            "not the model; it is never taken as a baseline.", ""]


def render(run_info: dict, header: dict, summary: dict, df: pd.DataFrame, comparison: Comparison | None = None,
           figures: dict[str, str] | None = None) -> str:
    """The report, answers first: the failed-run banner (if any) and the verdict fill the first screen; then
    the score tables, why answers failed, passage dumps, what changed since the last run, latency, stale
    sources and every question; the run's settings last."""
    n_questions = int(df["id"].nunique()) if not df.empty else 0
    n_fail = sum(1 for _, r in df[df["mode"] == "rag"].iterrows() if _failed(r))
    since = comparison_section(comparison) if comparison else ["## Since the last run", "",
                                                               "No earlier finished run over these questions.", ""]
    plots = [f"![{title}]({name})" for title, name in (figures or {}).items()]
    context = " · ".join(escape_cell(header[k]) for k in ("profile", "llm", "questions") if header.get(k))
    parts = [
        f"# RAG regression report · {run_info['run_id']}",
        "",
        *failed_banner(summary, header, df),
        *([context, ""] if context else []),
        *verdict_section(summary, df, comparison),
        "## Summary: bare vs RAG",
        "",
        _table(_intervals_whole(summary_table(summary))),
        "",
        "### Retrieval (RAG): file-level hit@k and MRR",
        "",
        _table(_intervals_whole(retrieval_table(summary))),
        "",
        "Each number: the mean over questions (95% bootstrap interval over questions, where a category has 2 or "
        "more); gain = RAG minus bare, paired. Keyword hit = share of a question's expected keywords found in "
        "the answer (NFKC, case-folded); negatives are scored on abstention; retrieval hit@k/MRR are file-level "
        "against the expected sources. A passage dump is a RAG answer that copies its prompt's numbered "
        "passages instead of answering.",
        "",
        *plots[:1],
        "",
        *rag_vs_bare_section(summary, len(stats.per_question(df, "rag", "passed"))),
        *stages_section(df),
        *dumps_section(df),
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
        "## Run",
        _table(header_table(header)),
        "",
    ]
    return "\n".join(parts)


def write_report(run: RunDir, header: dict, df: pd.DataFrame, summary: dict, comparison: Comparison | None,
                 history: pd.DataFrame) -> None:
    """The plots and report.md (summary.json comes later, from ``write_summary``: it marks a run finished)."""
    from jobs.eval import plots

    figures = {
        "Bare vs RAG by category": plots.category_bars(summary, run.path / "categories.png").name,
        "Headline metrics across runs": plots.trend(history, run.path / "trend.png").name,
        "Retrieval hit@k, k = 1..10": plots.recall_curve(df, run.path / "recall.png").name,
    }
    atomic_write(run.path / "report.md", render(run.info(), header, summary, df, comparison, figures))


def write_summary(run: RunDir, header: dict, summary: dict) -> None:
    """summary.json, written last: its presence marks the run finished (and, if its outcome is ok, a baseline)."""
    atomic_write(run.path / SUMMARY, json.dumps({"run": header, **summary}, indent=2, ensure_ascii=False, default=str))


def rereport(run_path: Path, baseline: str | None = None) -> Path:
    """Rebuild a finished run's outputs from its own answers (results.jsonl) and its baseline's, through the same
    stages as a night (jobs.eval.finish.finish_run): the answers are scored again, with the abstain phrases of the
    run's run.json, so scoring fixes, new statistics, failure stages and docs-change sections apply to old runs
    too. Results, report, history row and summary.json are rewritten; latest.md only if it points to this run.
    The answers are not touched, nor how the night went (a failed night stays failed)."""
    from jobs.common.errors import JobError
    from jobs.eval.finish import finish_run, latest_is
    from jobs.eval.scoring.score import abstain_phrases

    run = RunDir(run_path)
    if not (run.path / SUMMARY).is_file():
        raise JobError(f"{run.path}: not a finished run (no {SUMMARY})")
    previous = json.loads((run.path / SUMMARY).read_text(encoding="utf-8"))
    answers = run.results()
    finish_run(run, previous["run"], answers, abstain_phrases=abstain_phrases(run.info()),
               outcome=run_outcome(previous),  # how the night went is not a score: it is kept
               baseline=baseline, latest=latest_is(run.path.parent, run),
               again=f"run `python -m jobs.eval.report {run.path}` again")
    return run.path / "report.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.eval.report",
                                description="Rebuild a finished run's report from its results (no model runs).")
    p.add_argument("run", type=Path, help="the run folder, e.g. eval/reports/20261201-020000-offline")
    p.add_argument("--baseline", metavar="RUN", help="compare with this run (default: the one before it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"report: {rereport(args.run, args.baseline)}")
    return 0


if __name__ == "__main__":
    from jobs.common import log as joblog

    joblog.run_cli(main)
