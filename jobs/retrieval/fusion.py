"""Rank fusion: several rankings of one question (dense and BM25, or a question and its translation) made
into one, over source files first and then each file's best chunks. The two rules LlamaIndex's
``QueryFusionRetriever`` offers: reciprocal rank fusion (ranks) and relative-score fusion (scores scaled to 0..1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    path: str
    heading: str
    score: float  # cosine (dense), BM25 score (bm25), or the chunk's fused score (hybrid)
    text: str


def file_ranking(paths: Iterable[str]) -> list[str]:
    """Files in the order their first chunk was retrieved."""
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(p, None)
    return list(seen)


def _weights(weights: Sequence[float] | None, n: int) -> Sequence[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} lists")
    return weights


def reciprocal_rank_fusion(rankings: list[list[str]], k: int = 60,
                           weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """Fuse rankings (ids, best first) by RRF: score(d) = sum_i w_i / (k + rank_i(d)), best first.

    Ranks start at 1; an id repeated within one ranking counts at its best rank only. Ties keep the
    order in which ids were first met, so the result is reproducible.
    """
    fused: dict[str, float] = {}
    for weight, ranking in zip(_weights(weights, len(rankings)), rankings):
        seen: set[str] = set()
        for rank, doc in enumerate(ranking, start=1):
            if doc in seen:
                continue
            seen.add(doc)
            fused[doc] = fused.get(doc, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])  # sorted() is stable: ties keep first-met order


def relative_score_fusion(scored: list[list[tuple[str, float]]],
                          weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """Fuse scored lists (id, score) by LlamaIndex's "relative_score" rule: each list's scores min-max scaled
    to 0..1, weighted, summed per id (an id a list lacks gets 0 from it), best first.

    Unlike RRF it keeps how far ahead a list's first result is: a cosine of 0.9 against 0.5 weighs more than a
    near-tie, which rank alone cannot tell. An id repeated within a list counts at its best score; a list whose
    scores are all equal gives each 1. Ties keep first-met order.
    """
    fused: dict[str, float] = {}
    for weight, pairs in zip(_weights(weights, len(scored)), scored):
        best: dict[str, float] = {}
        for doc, score in pairs:
            best[doc] = max(score, best.get(doc, score))
        if not best:
            continue
        lo, hi = min(best.values()), max(best.values())
        for doc, score in best.items():
            fused[doc] = fused.get(doc, 0.0) + weight * ((score - lo) / (hi - lo) if hi > lo else 1.0)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def fuse(dense: list[Hit], lexical: list[Hit], k: int, rrf_k: int = 60, bm25_weight: float = 1.0,
         method: str = "rrf") -> list[Hit]:
    """Hybrid retrieval: the two lists fused over source files, then each file's best chunks in turn.

    Fusing files rather than chunks keeps what each retriever is good at: chunks of *other* files
    that both lists happen to contain would otherwise outvote one retriever's clear first file.
    Taking files round-robin gives the model the best passage of each of the top files first.
    ``method`` is "rrf" (ranks; ``rrf_k`` dampens the top) or "relative_score" (each list's scores scaled to
    0..1, a file scoring as its best chunk). ``bm25_weight`` is the second list's weight (the first counts 1);
    ``python -m jobs.tools.tune`` measures both.
    """
    weights = [1.0, bm25_weight]
    if method == "relative_score":
        files = relative_score_fusion([[(h.path, h.score) for h in dense], [(h.path, h.score) for h in lexical]],
                                      weights)
        chunk_score = dict(relative_score_fusion([[(h.chunk_id, h.score) for h in dense],
                                                  [(h.chunk_id, h.score) for h in lexical]], weights))
    else:
        files = reciprocal_rank_fusion([file_ranking(h.path for h in dense), file_ranking(h.path for h in lexical)],
                                       k=rrf_k, weights=weights)
        chunk_score = dict(reciprocal_rank_fusion([[h.chunk_id for h in dense], [h.chunk_id for h in lexical]],
                                                  k=rrf_k, weights=weights))
    by_file: dict[str, list[Hit]] = {}
    for h in {h.chunk_id: h for h in lexical + dense}.values():
        by_file.setdefault(h.path, []).append(h)
    queues = [sorted(by_file[path], key=lambda h: -chunk_score[h.chunk_id]) for path, _ in files]
    out: list[Hit] = []
    while len(out) < k and any(queues):
        for queue in queues:
            if queue and len(out) < k:
                h = queue.pop(0)
                out.append(Hit(h.chunk_id, h.path, h.heading, chunk_score[h.chunk_id], h.text))
    return out
