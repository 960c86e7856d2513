"""Fusion weights and the tuner: the sweep scores exactly what the retriever returns, the choice rule is
the documented one, and the shipped question sets are valid against the pinned snapshot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jobs.common.config import ROOT
from jobs.common.questions import load_questions
from jobs.ingest.job import ingest
from jobs.retrieval.check import retrieval_scores
from jobs.retrieval.fusion import Hit, fuse
from jobs.tools.tune import Setting, choose, main, single, sweep

DATA = Path(__file__).parent / "data"
SNAPSHOT = ROOT.parent / "shared/corpora/xtuner"


def _hits(paths: list[str]) -> list[Hit]:
    return [Hit(chunk_id=f"{p}#0", path=p, heading="", score=0.0, text=p) for p in paths]


def test_fusion_weight_decides_between_the_retrievers_firsts():
    dense, lexical = _hits(["a", "b", "c"]), _hits(["b", "a", "d"])
    # Plain RRF: a and b tie (ranks 1+2 each); ties keep the dense list's order.
    assert [h.path for h in fuse(dense, lexical, 4)] == ["a", "b", "c", "d"]
    assert [h.path for h in fuse(dense, lexical, 4, bm25_weight=3.0)][:2] == ["b", "a"]
    assert [h.path for h in fuse(dense, lexical, 4, bm25_weight=0.5)][:2] == ["a", "b"]
    # A file only the lexical list found climbs above one only dense found once the lexical list weighs more.
    assert [h.path for h in fuse(dense, lexical, 4, bm25_weight=3.0)][2:] == ["d", "c"]


def test_score_fusion_keeps_a_clear_first_that_rank_fusion_outvotes():
    # Dense is sure of a (0.90 against 0.10); BM25 barely prefers b (10.0 against 9.9). By rank, a heavier
    # BM25 list puts b first; by score, BM25's near-tie adds almost as much to a as to b, and a stays first.
    dense = [Hit(f"{p}#0", p, "", s, p) for p, s in (("a", 0.90), ("b", 0.10), ("c", 0.05))]
    lexical = [Hit(f"{p}#0", p, "", s, p) for p, s in (("b", 10.0), ("a", 9.9), ("d", 0.0))]
    assert [h.path for h in fuse(dense, lexical, 4, bm25_weight=3.0)][0] == "b"
    fused = fuse(dense, lexical, 4, bm25_weight=3.0, method="relative_score")
    assert [h.path for h in fused] == ["a", "b", "c", "d"]
    assert fused[0].score == pytest.approx(1.0 + 3.0 * 0.99)  # the chunk's fused score is what it reports


def test_choice_rule_prefers_plain_rrf_among_equals():
    best = {"hit_at_1": 1.0, "hit_at_3": 1.0, "hit_at_5": 1.0, "mrr": 1.0}
    worse = {**best, "mrr": 0.9}
    results = {Setting(10, 1.0, 50): best, Setting(60, 2.0, 50): best, Setting(60, 1.5, 100): best,
               Setting(60, 1.0, 50): worse, Setting(60, 1.0, 50, heading_weight=2): best}
    # Keeps rrf_k 60 first, then weight 1 (the heading weight counts after it), then the depth.
    assert choose(results, 50) == Setting(60, 1.0, 50, heading_weight=2)
    results[Setting(60, 1.0, 50)] = best
    assert choose(results, 50) == Setting(60, 1.0, 50)
    # Among equals, no translation is the plainer setting; a better one wins on MRR whatever it costs.
    results[Setting(60, 1.0, 50, rewrite_weight=0.5)] = best
    assert choose(results, 50) == Setting(60, 1.0, 50)
    results[Setting(60, 1.0, 50, rewrite_weight=0.5)] = {**best, "mrr": 1.01}
    assert choose(results, 50).rewrite_weight == 0.5
    # Leaving RRF is the largest departure: among equals, the rank fusion stays.
    results = {Setting(60, 1.0, 50, fusion="relative_score"): best, Setting(10, 8.0, 20): best}
    assert choose(results, 50) == Setting(10, 8.0, 20)


def test_sweep_scores_what_the_retriever_returns(mini_profile, minilm_embedder, tmp_path):
    questions = DATA / "questions.csv"
    for hw in (1, 2):  # each heading weight against a store built with it
        profile = dataclasses.replace(mini_profile, retrieval=dataclasses.replace(mini_profile.retrieval,
                                                                                  heading_weight=hw))
        ingest(profile, embedder=minilm_embedder)
        results, per_set, cands = sweep(profile, [questions], minilm_embedder, rrf_ks=(10, 60), weights=(1.0, 3.0),
                                        depths=(20,), heading_weights=(1, 2))
        # 2 rrf_k x 2 weights x 2 heading weights by RRF; relative-score fusion ignores rrf_k: 4 more.
        assert len(results) == 12 and len(cands[questions]) == sum(
            1 for q in load_questions(questions).questions if q.expected_sources)
        for setting, means in results.items():
            if setting.heading_weight != hw:
                continue
            r = dataclasses.replace(profile.retrieval, rrf_k=setting.rrf_k, bm25_weight=setting.bm25_weight,
                                    fusion_depth=setting.fusion_depth, fusion=setting.fusion)
            direct, _ = retrieval_scores(dataclasses.replace(profile, retrieval=r), questions, minilm_embedder,
                                         "hybrid")
            assert means == pytest.approx(direct)
            assert per_set[setting][questions] == pytest.approx(direct)
    for mode in ("dense", "bm25"):
        plain = dataclasses.replace(mini_profile, retrieval=dataclasses.replace(mini_profile.retrieval,
                                                                                heading_weight=1))
        ingest(plain, embedder=minilm_embedder)
        assert single(cands[questions], mode, plain.retrieval.check_depth) == pytest.approx(
            retrieval_scores(plain, questions, minilm_embedder, mode)[0])


def test_tune_cli_writes_its_table(mini_profile, minilm_embedder, tmp_path, capsys):
    ingest(mini_profile, embedder=minilm_embedder)
    profile_file = next(tmp_path.glob("profile.toml"))
    out = tmp_path / "out"
    assert main(["--profile", str(profile_file), "--questions", str(DATA / "questions.csv"), "--out", str(out),
                 "--no-public"]) == 0
    written = list(out.glob("tune-*.md"))
    assert len(written) == 1
    text = written[0].read_text(encoding="utf-8")
    assert "chosen" in text and "--set retrieval.bm25_weight=" in text and text in capsys.readouterr().out
    assert "## Each lever alone, and the chosen combination" in text and "heading weight alone" in text


@pytest.mark.parametrize("name", ["xtuner_questions.csv", "xtuner_dev_questions.csv",
                                  "xtuner_hard_dev_questions.csv"])
def test_shipped_question_sets_are_valid(name):
    qs = load_questions(ROOT / "eval" / name).questions
    assert len(qs) >= 20
    if not SNAPSHOT.is_dir():
        pytest.skip(f"{SNAPSHOT} not present: sources not checked")
    for q in qs:
        for source in q.expected_sources:
            assert (SNAPSHOT / source).is_file(), f"{name} {q.id}: {source} not in the snapshot"


def test_dev_and_public_sets_share_no_question():
    public = {q.question for q in load_questions(ROOT / "eval/xtuner_questions.csv").questions}
    dev = {q.question for q in load_questions(ROOT / "eval/xtuner_dev_questions.csv").questions}
    hard = load_questions(ROOT / "eval/xtuner_hard_dev_questions.csv").questions
    assert not public & dev and not public & {q.question for q in hard} and not dev & {q.question for q in hard}
    # What the harder set is for: paraphrases, questions across the docs' two languages, answers over two pages.
    categories = {q.category for q in hard}
    assert {"paraphrase", "cross-lingual", "multi-doc", "negative"} <= categories and len(hard) >= 40
    assert any(len(q.expected_sources) >= 2 for q in hard if q.category == "multi-doc")
