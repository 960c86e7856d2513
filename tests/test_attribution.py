"""Failure attribution on hand-built records: every label, the order they are decided in, and support."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jobs.eval.scoring import attribution as A


def rag_row(answer: str, chunks: list[tuple[str, str]], *, keywords: str = "WSL2|Linux",
            sources: str = "docs/faq.md", category: str = "factual", error: str = "", qid: str = "q") -> dict:
    return {"id": qid, "mode": "rag", "category": category, "question": "Windows?", "answer": answer,
            "expected_keywords": keywords, "expected_sources": sources, "error": error,
            "retrieved": json.dumps([{"path": p, "heading": "", "score": 0.5, "chunk_id": f"{p}#0", "text": t}
                                     for p, t in chunks])}


FAQ = ("docs/faq.md", "Lumen runs on Linux and macOS; on Windows use WSL2.")
OTHER = ("docs/other.md", "Install with pip install lumen.")


@pytest.mark.parametrize(("row", "want"), [
    (rag_row("Use WSL2 on Linux.", [FAQ]), A.PASS),
    (rag_row("It works.", [OTHER]), A.RETRIEVAL),  # the expected source was not given
    (rag_row("It works.", [("docs/faq.md", "Lumen has a FAQ page.")]), A.CONTEXT),  # given, but without the answer
    (rag_row("Yes, natively.", [FAQ, OTHER]), A.MODEL),  # the answer was right there
    (rag_row("", [FAQ], error="prompt of 9000 tokens exceeds the model's window"), A.FAILED),
    # Without expected sources the retrieval stage cannot be judged: context, then model.
    (rag_row("It works.", [OTHER], sources=""), A.CONTEXT),
    (rag_row("Linux only.", [FAQ], sources=""), A.MODEL),  # WSL2 was missed and it was in the context
])
def test_each_label(row, want):
    assert A.label(pd.Series(row)) == want


def test_only_rag_answers_with_keywords_get_a_label():
    assert A.label(pd.Series({**rag_row("x", [FAQ]), "mode": "bare"})) is None
    assert A.label(pd.Series(rag_row("I don't know", [FAQ], keywords="", category="negative"))) is None
    old = rag_row("Nope.", [FAQ])
    old["retrieved"] = json.dumps([{"path": "docs/faq.md", "heading": "", "score": 0.5}])  # before texts were kept
    assert A.label(pd.Series(old)) is None


def test_support_is_the_share_of_answer_tokens_in_the_context():
    context = "Lumen runs on Linux and macOS; on Windows use WSL2."
    assert A.support("Use WSL2 on Windows.", context) == 1.0
    assert A.support("Try Docker on FreeBSD.", context) == pytest.approx(0.0)
    assert A.support("Lumen supports Docker.", context) == pytest.approx(1 / 3)  # lumen / supports, docker
    assert A.support("", context) is None
    assert A.support("支持 WSL2", "可以在 WSL2 中使用，支持 Linux") == 1.0  # Chinese bigrams too


def test_counts_per_category_and_what_to_fix_first():
    rows = [rag_row("Use WSL2 on Linux.", [FAQ], qid="a"), rag_row("It works.", [OTHER], qid="b"),
            rag_row("It works.", [OTHER], qid="c", category="howto"), rag_row("Yes.", [FAQ], qid="d"),
            {**rag_row("x", [FAQ], qid="a"), "mode": "bare"}]
    df = A.annotate(pd.DataFrame(rows))
    counts = A.stage_counts(df).set_index("category")
    assert counts.loc["overall", "n"] == 4
    assert (counts.loc["overall", A.PASS], counts.loc["overall", A.RETRIEVAL], counts.loc["overall", A.MODEL]) == (
        1, 2, 1)
    assert counts.loc["howto", A.RETRIEVAL] == 1 and counts.loc["factual", A.RETRIEVAL] == 1
    assert A.fix_first(A.stage_counts(df)).startswith("Fix first: retrieval") and "2 of 3" in A.fix_first(
        A.stage_counts(df))
    low = A.low_support(df)
    assert list(low["id"]) == ["b", "c", "d"] and df[df["mode"] == "bare"]["support"].isna().all()
