"""One table of metrics (jobs.eval.scoring.metrics) feeds the summary, the statistics, the history, the verdict,
the thresholds and the report. The views it gives are the lists those modules kept by hand before, so the same
results still give the same summary, intervals, history row, thresholds and verdict."""

from __future__ import annotations

from jobs.eval import history, report, thresholds
from jobs.eval.scoring import metrics as M
from jobs.eval.scoring import statistics as S
from jobs.eval.scoring import summary


def test_the_views_equal_the_lists_they_replaced():
    assert summary.METRICS == ("keyword_hit_rate", "strict_keyword_hit_rate", "passage_dump", "all_keywords_hit",
                               "abstention", "hit_at_1", "hit_at_3", "hit_at_5", "mrr", "generate_s", "retrieve_s",
                               "answer_tokens")
    assert summary.LOWER_BETTER == ("passage_dump",)
    assert set(S.BINARY) == {"passed", "all_keywords_hit", "abstention", "passage_dump", "hit_at_1", "hit_at_3",
                             "hit_at_5"}
    assert S.RATES == ("keyword_hit_rate", "strict_keyword_hit_rate", "mrr")
    # Retrieval time joined the RAG-only metrics: it has no interval and no between-runs test, so nothing reads
    # it there; a bare threshold on it was refused before as now.
    assert set(S.RAG_ONLY) == {"passage_dump", "hit_at_1", "hit_at_3", "hit_at_5", "mrr", "retrieve_s"}
    assert S.HEADLINE == ("keyword_hit_rate", "strict_keyword_hit_rate", "passage_dump", "all_keywords_hit", "passed",
                          "abstention", "hit_at_1", "hit_at_3", "hit_at_5", "mrr")
    # The same columns with the same numbers (a new history.csv lists them in the table's order).
    assert dict(history.HEADLINE) == {
        "bare_keyword_hit": "bare.keyword_hit_rate", "rag_keyword_hit": "rag.keyword_hit_rate",
        "rag_strict_keyword_hit": "rag.strict_keyword_hit_rate", "rag_passage_dumps": "rag.passage_dump",
        "rag_gain": "gain.keyword_hit_rate", "rag_all_keywords": "rag.all_keywords_hit", "rag_hit_at_5": "rag.hit_at_5",
        "rag_mrr": "rag.mrr", "rag_abstention": "rag.abstention"}
    assert history.DELTA_METRICS == ("keyword_hit_rate", "strict_keyword_hit_rate", "passage_dump", "passed",
                                     "abstention", "hit_at_1", "hit_at_5", "mrr")
    assert set(history.VERDICT_METRICS) == {
        ("rag", "keyword_hit_rate"), ("rag", "strict_keyword_hit_rate"), ("rag", "passage_dump"), ("rag", "passed"),
        ("gain", "keyword_hit_rate"), ("rag", "abstention"), ("rag", "hit_at_5"), ("rag", "mrr")}
    assert thresholds.RETRIEVAL_METRICS == ("hit_at_1", "hit_at_3", "hit_at_5", "mrr", "retrieve_s")
    assert thresholds.KEYWORD_METRICS == ("keyword_hit_rate", "strict_keyword_hit_rate", "all_keywords_hit")
    assert M.names(rag_vs_bare=True) == ("keyword_hit_rate", "strict_keyword_hit_rate", "passed", "abstention")
    assert report.ANSWER_METRICS == ("keyword_hit_rate", "strict_keyword_hit_rate", "passage_dump",
                                     "all_keywords_hit", "abstention")
    assert report.RETRIEVAL_METRICS == ("hit_at_1", "hit_at_3", "hit_at_5", "mrr")


def test_the_table_is_consistent():
    names = [m.name for m in M.TABLE]
    assert len(set(names)) == len(names) and len({m.label for m in M.TABLE}) == len(names)
    for m in M.TABLE:
        assert m.modes in (M.BOTH, M.RAG) and m.per_question in (M.BINARY, M.RATE, M.AMOUNT)
        # Only what a mode has can be kept, tested or shown in it; gain needs both modes.
        allowed = set(m.modes) | ({"gain"} if m.modes == M.BOTH else set())
        assert {mode for mode, _ in m.history} <= allowed and set(m.verdict) <= allowed and set(m.report) <= allowed
        # A number kept per run, shown in a score table or bounded by a threshold is one the summary holds.
        if m.history or m.report or m.fail_under:
            assert m.summarised, m.name
        # A verdict is a paired test between runs; a minimum cannot guard a number better lower.
        if m.verdict:
            assert m.between_runs and m.headline, m.name
        if m.fail_under:
            assert m.higher_is_better, m.name
    assert all(not M.get(name).higher_is_better or M.get(name).fail_under for name in summary.METRICS)
