"""Passage dumps: RAG answers that copy the prompt's numbered passages instead of answering.

The context reaches the model as numbered passages, ``[n] (path) text`` (jobs.eval.prompts.format_context). A
small model sometimes answers by reproducing them: a passage marker followed by the passage's path, or
by the context's text word for word, often until the token budget runs out. The keyword score credits
such an answer for every keyword the copied passage happens to hold; three changes measured with
offline-zh (prompt version 5, answering per part, a longer answer budget) "won" on keyword hit this way
(decisions D18, D20, D21 in docs/decisions.md).

So each RAG answer gets:

- ``passage_dump``: whether it copies a passage from a marker on: ``[n]`` followed by ``(path)`` of a
  passage it was given, or by at least ``MIN_COPY`` characters (after keyword normalisation) found verbatim
  in its context. A marker followed by the model's own words is a citation, not a dump; a verbatim quote
  without a marker is what the prompt asks for ("quote first"), so neither counts;
- ``strict_keyword_hit_rate``: the keyword hit rate of the answer up to where the copying starts, so a
  dump earns nothing for what it copied, and an answer that answers first and then dumps keeps its credit.

Bare answers have no passages to copy: their strict rate is their keyword hit rate. Like the failure
stages, both are computed from a run's results (the chunks given to the model are kept with each
answer), so old runs are scored the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from jobs.eval.scoring.attribution import context_chunks, context_text, listed
from jobs.eval.scoring.keywords import keyword_hit_rate, normalise

# Markers the prompt could have numbered (top-k stays far below 100).
_MARKER = re.compile(r"\[(\d{1,2})\]")
# A copied run this long (normalised characters) is no coincidence; a short one ("[2] XTuner") is a citation.
MIN_COPY = 24


def dump_start(answer: str, chunks: Sequence[dict]) -> int | None:
    """Where the answer starts copying a passage (the index of its marker), or None."""
    text = context_text(list(chunks))
    return None if text is None else _dump_start(answer, chunks, text)


def _dump_start(answer: str, chunks: Sequence[dict], text: str) -> int | None:
    context = normalise(text)
    paths = {f"({c['path']})" for c in chunks}
    for m in _MARKER.finditer(answer):
        rest = answer[m.end():].lstrip()
        if any(rest.startswith(p) for p in paths):
            return m.start()
        following = _MARKER.search(rest)
        copied = normalise(rest[: following.start()] if following else rest)[:MIN_COPY]
        if len(copied) == MIN_COPY and copied in context:
            return m.start()
    return None


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """The results with ``passage_dump`` and ``strict_keyword_hit_rate`` on every row (see the module text).
    A RAG answer whose run did not keep its context's text gets neither: it cannot be judged."""
    out = df.copy()
    dumps: list[bool | None] = []
    strict: list[float | None] = []
    for _, r in out.iterrows():
        rate = r.get("keyword_hit_rate")
        rate = None if rate is None or pd.isna(rate) else float(rate)
        chunks = context_chunks(r)
        text = context_text(chunks) if r["mode"] == "rag" else None
        if r["mode"] != "rag":
            dumps.append(None)
            strict.append(rate)
        elif text is None:
            dumps.append(None)
            strict.append(None)
        else:
            answer = str(r.get("answer") or "")
            start = _dump_start(answer, chunks, text)
            dumps.append(start is not None)
            keywords = listed(r.get("expected_keywords"))
            strict.append(rate if start is None else keyword_hit_rate(answer[:start], keywords))
    out["passage_dump"] = pd.Series(dumps, index=out.index, dtype=object)
    out["strict_keyword_hit_rate"] = pd.Series(strict, index=out.index, dtype=float)
    return out


def dumped(df: pd.DataFrame) -> pd.DataFrame:
    """The RAG answers that copy a passage, with what the copying cost them in keyword hit."""
    rag = df[(df["mode"] == "rag") & (df["passage_dump"] == True)]  # noqa: E712 (None is neither)
    return rag[["id", "category", "question", "answer", "keyword_hit_rate", "strict_keyword_hit_rate"]]
