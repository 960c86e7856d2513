"""Retrieval check: file-level hit@1/3/5 and MRR of the store against a question set."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from jobs.common.config import RETRIEVAL_MODES, Profile
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.errors import JobError
from jobs.common.questions import load_questions
from jobs.retrieval.fusion import file_ranking
from jobs.retrieval.retriever import StoreRetriever
from jobs.retrieval.rewrite import QueryRewriter, load_rewriter
from jobs.retrieval.scores import format_line, scores

log = logging.getLogger(__name__)


def retrieval_scores(profile: Profile, questions_csv: Path, embedder: Embedder | None = None,
                     mode: str | None = None, rewriter: QueryRewriter | None = None) -> tuple[dict[str, float], int]:
    qs = [q for q in load_questions(questions_csv).questions if q.expected_sources]
    if not qs:
        raise JobError(f"{questions_csv}: no question has expected_sources: nothing to check")
    embedder = load_embedder(profile)
    per_question = []
    if rewriter is not None:
        rewriter.prepare([q.question for q in qs])
    with StoreRetriever(profile, embedder, mode, rewriter) as retriever:
        stored = retriever.paths()
        for q in qs:
            missing = [s for s in q.expected_sources if s not in stored]
            if missing:
                log.warning("question %s: expected source(s) not in the store: %s", q.id, ", ".join(missing))
        for q in tqdm(qs, desc="check", unit="q", leave=False):
            hits = retriever.retrieve(q.question, profile.retrieval.check_depth)
            per_question.append(scores(file_ranking(h.path for h in hits), q.expected_sources))
    means = {k: sum(s[k] for s in per_question) / len(per_question) for k in per_question[0]}
    return means, len(qs)


def run_check(profile: Profile, questions_csv: Path) -> list[str]:
    """One line per retrieval mode, the profile's own marked, so the comparison is one command away; with the
    profile's query rewriting, each mode once without and once with it."""
    embedder = load_embedder(profile)
    rewriter = load_rewriter(profile)
    lines = []
    for mode in RETRIEVAL_MODES:
        for rw in (None, rewriter) if rewriter is not None else (None,):
            means, n = retrieval_scores(profile, questions_csv, embedder, mode, rw)
            label = f"{mode} + {profile.retrieval.rewrite}" if rw is not None else mode
            mark = " (profile default)" if mode == profile.retrieval.mode and (rw is not None) == (
                rewriter is not None) else ""
            lines.append(f"{label:<7} {format_line(means)} (n={n}){mark}")
    return lines
