"""The scoring stage: a run's answers, as they are on disk, scored.

The eval job only answers: each record holds the answer, what retrieval gave the model, the question's expected
keywords, sources and category, timings and errors. Everything judged from them is computed here, after the
answers, from those records alone: keyword hits and abstention, then the failure stage and support
(jobs.eval.scoring.attribution) and passage dumps (jobs.eval.scoring.copying). A night and a re-report of an old
run (``python -m jobs.eval.report RUN``) go through this same function, so a scoring fix reaches old runs too.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import pandas as pd

from jobs.common.config import setting_defaults
from jobs.common.errors import JobError
from jobs.eval.scoring import attribution, copying
from jobs.eval.scoring import keywords as kw

# The answer-level scores, in the order results.csv shows them (right after the answer).
SCORES = ("keyword_hits", "keyword_hit_rate", "all_keywords_hit", "abstained")
PHRASES_SETTING = "eval.abstain_phrases"


def score_answer(answer: str, keywords: Sequence[str], phrases: Sequence[str]) -> dict:
    """Keyword hits and abstention of one answer; a failed answer (empty) scores no hit and no abstention."""
    hits = kw.keyword_hits(answer, keywords)
    return {
        "keyword_hits": "|".join("1" if h else "0" for h in hits),
        "keyword_hit_rate": kw.keyword_hit_rate(answer, keywords),
        "all_keywords_hit": (all(hits) if hits else None),
        "abstained": kw.abstained(answer, phrases),
    }


def score_answers(df: pd.DataFrame, abstain_phrases: Sequence[str]) -> pd.DataFrame:
    """The answers (one row per question and mode: ``answer`` and ``expected_keywords``, `|`-separated, at least;
    ``retrieved`` for the RAG ones) with every score: keyword_hits, keyword_hit_rate, all_keywords_hit, abstained,
    then attribution's stage and support and copying's passage_dump and strict_keyword_hit_rate. Scores already
    in ``df`` (an old run's) are computed again."""
    out = df.copy()
    scored = [score_answer(a if isinstance(a, str) else "", attribution.listed(k), tuple(abstain_phrases))
              for a, k in zip(out["answer"], out["expected_keywords"])]
    at = out.columns.get_loc("answer") + 1 if "answer" in out.columns else len(out.columns)
    for name in SCORES:
        values = [s[name] for s in scored]
        if name in out.columns:
            out[name] = pd.Series(values, index=out.index)
        else:
            out.insert(at, name, pd.Series(values, index=out.index))
            at += 1
    return copying.annotate(attribution.annotate(out))


def abstain_phrases(info: dict) -> tuple[str, ...]:
    """The abstain phrases of a run, from its run.json (``info``): its config's ``eval.abstain_phrases`` (written
    as a tuple's repr; a JSON list is read too). A run from before the setting existed: its default."""
    value = info.get("config", {}).get(PHRASES_SETTING, setting_defaults().get(PHRASES_SETTING, "()"))
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else ()
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise JobError(f"run {info.get('run_id', '?')}: {PHRASES_SETTING} in its run.json is not a list of phrases "
                       f"({str(info.get('config', {}).get(PHRASES_SETTING))[:80]!r}): repair it to re-score the run")
    return tuple(value)
