"""The report answers first: a real eval run on the test fixtures, with a baseline run before it, rendered to
HTML the way a reader sees it. The first screen carries the verdict (RAG against bare, since the last run, the
stage to fix first, the questions that moved, what the set can detect) before any detail section and any
table; the run's settings come last. Checked on the HTML's order, no browser needed."""

from __future__ import annotations

import html.parser
import shutil

import markdown
import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.eval import report as R
from jobs.eval.job import evaluate
from jobs.eval.scoring import statistics as S
from jobs.eval.scoring.summary import summarise_run
from jobs.ingest.job import ingest
from tests.conftest import MINI_CORPUS, eval_profile

VERDICT_LINES = ("RAG against bare:", "Since the last run", "Fix first:", "Regressed", "What this set can detect:")


class Blocks(html.parser.HTMLParser):
    """The page as a list of (tag, text) for its headings, list items, paragraphs and tables, in page order."""

    BLOCKS = ("h1", "h2", "h3", "li", "p", "table")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCKS:
            self._open.append(len(self.blocks))
            self.blocks.append((tag, []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self.blocks[self._open[-1]][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.blocks[i][1].append(data)


def blocks(page: str) -> list[tuple[str, str]]:
    parser = Blocks()
    parser.feed(page)
    return [(tag, " ".join("".join(parts).split())) for tag, parts in parser.blocks]


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory, minilm_path, tiny_llm, minilm_embedder):
    """Two runs of the eval on the fixtures: the second has the first as its baseline (read-only for the tests)."""
    tmp_path = tmp_path_factory.mktemp("layout")
    corpus = shutil.copytree(MINI_CORPUS, tmp_path / "corpus")
    profile = load_profile(str(eval_profile(tmp_path, corpus, minilm_path, tiny_llm)))
    ingest(profile, embedder=minilm_embedder)
    first, *_ = evaluate(profile)
    second, df, summary, comparison = evaluate(profile)
    return first, second, df, summary, comparison


def test_the_first_screen_is_the_verdict_and_the_run_settings_come_last(two_nights):
    first, second, _df, _summary, comparison = two_nights
    assert comparison is not None and comparison.baseline == first.run_id
    text = (second.path / "report.md").read_text(encoding="utf-8")
    page = markdown.markdown(text, extensions=["tables"])
    seq = blocks(page)
    headings = [(i, tag, t) for i, (tag, t) in enumerate(seq) if tag in ("h1", "h2")]
    assert headings[0][1] == "h1" and headings[0][2].startswith("RAG regression report")
    # The verdict is the first section; its lines come before any detail section and before any table.
    assert headings[1][2] == "Verdict"
    detail = headings[2][0]
    first_table = next(i for i, (tag, _) in enumerate(seq) if tag == "table")
    verdict_items = [(i, t) for i, (tag, t) in enumerate(seq) if tag == "li" and i < detail]
    for line in VERDICT_LINES:
        found = [i for i, t in verdict_items if t.startswith(line)]
        assert found, f"no verdict line {line!r} before the first detail section"
        assert found[0] < first_table
    lines = dict((t.split(":")[0].split(" (")[0], t) for _, t in verdict_items)
    # RAG against bare: keyword hit and pass rate, each with its interval and whether it is significant.
    against = lines["RAG against bare"]
    assert "keyword hit" in against and "pass rate" in against and against.count("95% CI") == 2
    assert against.count("within noise") + against.count("significant") >= 2
    # Since the last run: the baseline named, and the verdict of Comparison.regression().
    assert first.run_id in lines["Since the last run"]
    assert comparison.regression()[1].split(":")[0] in lines["Since the last run"]
    assert "4 questions are too few" in lines["What this set can detect"]
    # The run metadata is the last section: nothing but its table follows it.
    assert headings[-1][2] == "Run"
    assert [tag for tag, _ in seq[headings[-1][0] + 1:]] == ["table"]
    assert "profile" in seq[-1][1] and "answers from cache" in seq[-1][1]
    # Every section of the detail is still there, after the verdict.
    names = [t for _, _, t in headings]
    for name in ("Summary: bare vs RAG", "Why RAG answers failed", f"Since the last run ({first.run_id})",
                 "Latency", "Questions (4 of 4 fail with RAG; failures first)"):
        assert name in names and names.index(name) > names.index("Verdict")


def test_a_first_run_says_there_is_nothing_to_compare_with(two_nights):
    first, *_ = two_nights
    text = (first.path / "report.md").read_text(encoding="utf-8")
    verdict = text.split("## Verdict")[1].split("\n## ")[0]
    assert "- **Since the last run:** no earlier finished run over these questions." in verdict
    assert "Regressed" not in verdict


def test_score_tables_are_split_to_fit_a_screen(two_nights):
    _first, second, _df, summary, _comparison = two_nights
    answers, retrieval = R.summary_table(summary), R.retrieval_table(summary)
    assert list(answers.columns) == [
        "category", "n", "keyword hit (bare)", "keyword hit (RAG)", "keyword hit (gain)",
        "keyword hit, dumps not credited (RAG)", "passage dumps (RAG)", "all keywords (bare)", "all keywords (RAG)",
        "abstention (bare)", "abstention (RAG)"]
    assert list(retrieval.columns) == ["category", "n", "hit@1", "hit@3", "hit@5", "MRR"]
    assert list(answers["category"]) == list(retrieval["category"]) == ["english", "factual", "**overall**"]
    text = (second.path / "report.md").read_text(encoding="utf-8")
    # Too few questions per category to test: the per-category rows are left out, and the categories named.
    section = text.split("### Is RAG better than bare?")[1].split("\n## ")[0]
    assert "| english " not in section and "| overall " in section
    assert "fewer than 6 questions each (no difference could be significant): english (2), factual (2)." in section


def _frame(groups: dict[str, tuple[list[int], list[int]]]) -> pd.DataFrame:
    """Results where question i of a category passes or not with RAG and bare (keyword rate = pass)."""
    rows = []
    for cat, (rag, bare) in groups.items():
        for i, (r, b) in enumerate(zip(rag, bare)):
            for mode, ok in (("rag", r), ("bare", b)):
                rows.append({"id": f"{cat}{i:02d}", "mode": mode, "category": cat, "expected_keywords": "k",
                             "keyword_hit_rate": float(ok), "all_keywords_hit": bool(ok), "abstained": False,
                             "hit_at_1": 1.0 if mode == "rag" else None, "hit_at_3": 1.0 if mode == "rag" else None,
                             "hit_at_5": 1.0 if mode == "rag" else None, "mrr": 1.0 if mode == "rag" else None,
                             "generate_s": 1.0, "retrieve_s": 0.1 if mode == "rag" else None, "answer_tokens": 9})
    return pd.DataFrame(rows)


def test_per_category_tests_only_where_a_category_can_reach_significance():
    df = _frame({"big": ([1] * 7, [0] * 7), "small": ([1] * 5, [0] * 5), "tiny": ([1], [0])})
    summary = summarise_run(df)
    assert S.min_same_way() == 6
    section = "\n".join(R.rag_vs_bare_section(summary, 13))
    assert "| big " in section and "| overall " in section
    assert "| small " not in section and "| tiny " not in section
    assert "fewer than 6 questions each (no difference could be significant): small (5), tiny (1)." in section
    # Overall first, then the categories, each in the metric table's order.
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["overall", "overall", "big", "big"]  # keyword hit and pass rate (no negatives, no dumps)
