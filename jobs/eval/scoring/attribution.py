"""Why each RAG answer failed: the stage to fix, and how much of each answer its context supports.

For every RAG answer to a question with expected keywords, one label, decided in this order:

- ``answer failed``: no answer came back (the model's window, a server error);
- ``pass``: every expected keyword is in the answer;
- ``retrieval miss``: the question names expected sources and none of them is among the chunks given
  to the model;
- ``context lacked the answer``: none of the keywords the answer misses is in the context text;
- ``model missed it``: a keyword the answer misses was in the context.

Support is the share of the answer's content tokens (the store's lexical tokenizer: words, identifiers,
Chinese bigrams, stopwords dropped) that occur in its context: a cheap, deterministic flag for answers
that say things their context does not. Everything is computed from a run's results (the chunks given
to the model are kept with each answer), so old runs can be re-labelled.
"""

from __future__ import annotations

import json

import pandas as pd

from jobs.eval.scoring.keywords import keyword_hits
from jobs.stores.lexical import tokenize

PASS, FAILED = "pass", "answer failed"
RETRIEVAL, CONTEXT, MODEL = "retrieval miss", "context lacked the answer", "model missed it"
LABELS = (PASS, RETRIEVAL, CONTEXT, MODEL, FAILED)
FAILURES = (RETRIEVAL, CONTEXT, MODEL, FAILED)
# What to work on for each failure label (the summary names the most frequent).
FIX = {RETRIEVAL: "retrieval (the right page is not found)",
       CONTEXT: "chunking or context size (the page is found, the passage with the answer is not given)",
       MODEL: "the model or the prompt (the answer was in the context)",
       FAILED: "serving (answers did not come back)"}
LOW_SUPPORT = 0.5


def listed(value: object) -> list[str]:
    """A `|`-separated field of a result row (keywords, sources) as a list; empty for a missing value."""
    return [] if value is None or (isinstance(value, float) and pd.isna(value)) else \
        [v for v in str(value).split("|") if v]


def context_chunks(row: pd.Series) -> list[dict]:
    """The chunks given to the model (path, heading, score, and their text where the run kept it)."""
    value = row.get("retrieved")
    if isinstance(value, str):
        return json.loads(value) if value else []
    return value if isinstance(value, list) else []


def context_text(chunks: list[dict]) -> str | None:
    """The text given to the model as context; None where the run did not keep it (nothing can be judged)."""
    if not chunks or any("text" not in c for c in chunks):
        return None
    return "\n".join(c["text"] for c in chunks)


def label(row: pd.Series) -> str | None:
    """The stage that failed for one RAG answer, or None where it cannot be judged (no keywords, or a
    run from before contexts were kept)."""
    keywords = listed(row.get("expected_keywords"))
    if row.get("mode") != "rag" or not keywords:
        return None
    if isinstance(row.get("error"), str) and row["error"]:
        return FAILED
    answer_hits = keyword_hits(str(row.get("answer") or ""), keywords)
    if all(answer_hits):
        return PASS
    chunks = context_chunks(row)
    sources = set(listed(row.get("expected_sources")))
    if sources and not any(c.get("path") in sources for c in chunks):
        return RETRIEVAL
    context = context_text(chunks)
    if context is None:
        return None
    missed = [k for k, hit in zip(keywords, answer_hits) if not hit]
    return MODEL if any(keyword_hits(context, missed)) else CONTEXT


def support(answer: str, context: str) -> float | None:
    """Share of the answer's content tokens found in the context; None for an empty answer."""
    tokens = tokenize(answer)
    if not tokens:
        return None
    known = set(tokenize(context))
    return sum(t in known for t in tokens) / len(tokens)


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """The results with a ``stage`` label and a ``support`` share on every RAG answer."""
    out = df.copy()
    out["stage"] = [label(r) for _, r in out.iterrows()]
    supports = []
    for _, r in out.iterrows():
        context = context_text(context_chunks(r)) if r["mode"] == "rag" else None
        supports.append(None if context is None else support(str(r.get("answer") or ""), context))
    out["support"] = supports
    return out


def stage_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Labels counted per category and overall (rows), one column per label."""
    rag = df[(df["mode"] == "rag") & df["stage"].notna()]
    rows = []
    for name, group in [*rag.groupby("category", sort=True), ("overall", rag)]:
        counts = group["stage"].value_counts()
        rows.append({"category": name, "n": len(group), **{lab: int(counts.get(lab, 0)) for lab in LABELS}})
    return pd.DataFrame(rows, columns=["category", "n", *LABELS])


def fix_first(counts: pd.DataFrame) -> str:
    """One sentence: which stage failed most often overall (ties: the earlier stage of the pipeline)."""
    overall = counts[counts["category"] == "overall"]
    if overall.empty:
        return "No RAG answer to questions with expected keywords: nothing to attribute."
    row = overall.iloc[0]
    failures = {lab: int(row[lab]) for lab in FAILURES if int(row[lab])}
    if not failures:
        return f"All {int(row['n'])} RAG answers with expected keywords pass."
    worst = max(failures, key=lambda lab: (failures[lab], -FAILURES.index(lab)))
    total = sum(failures.values())
    return (f"Fix first: {FIX[worst]}: {failures[worst]} of {total} failing RAG answers are "
            f"'{worst}'.")


def low_support(df: pd.DataFrame, below: float = LOW_SUPPORT) -> pd.DataFrame:
    """RAG answers whose content is mostly not in their context, least supported first."""
    rag = df[(df["mode"] == "rag") & df["support"].notna()]
    low = rag[rag["support"] < below].sort_values(["support", "id"])
    return low[["id", "category", "question", "answer", "support", "stage"]]
