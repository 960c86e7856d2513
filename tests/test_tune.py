"""Fusion weights and the tuner: the sweep scores exactly what the retriever returns, the choice rule is
the documented one, and the shipped question sets are valid against the pinned snapshot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jobs.check import retrieval_scores
from jobs.config import ROOT
from jobs.ingest import ingest
from jobs.questions import load_questions
from jobs.retrieval import Hit, fuse
from jobs.tune import Setting, choose, main, sweep

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


def test_choice_rule_prefers_plain_rrf_among_equals():
    best = {"hit_at_1": 1.0, "hit_at_3": 1.0, "hit_at_5": 1.0, "mrr": 1.0}
    worse = {**best, "mrr": 0.9}
    results = {Setting(10, 1.0, 50): best, Setting(60, 2.0, 50): best, Setting(60, 1.5, 100): best,
               Setting(60, 1.0, 50): worse}
    assert choose(results, 50) == Setting(60, 1.5, 100)  # keeps rrf_k 60 first, then the smaller weight
    results[Setting(60, 1.0, 50)] = best
    assert choose(results, 50) == Setting(60, 1.0, 50)


def test_sweep_scores_what_the_retriever_returns(mini_profile, minilm_embedder, tmp_path):
    ingest(mini_profile, embedder=minilm_embedder)
    questions = DATA / "questions.csv"
    results, single, n = sweep(mini_profile, questions, minilm_embedder, rrf_ks=(10, 60), weights=(1.0, 3.0),
                               depths=(20,))
    assert n == sum(1 for q in load_questions(questions).questions if q.expected_sources) and len(results) == 4
    for setting, means in results.items():
        r = dataclasses.replace(mini_profile.retrieval, rrf_k=setting.rrf_k, bm25_weight=setting.bm25_weight,
                                fusion_depth=setting.fusion_depth)
        direct, _ = retrieval_scores(dataclasses.replace(mini_profile, retrieval=r), questions, minilm_embedder,
                                     "hybrid")
        assert means == pytest.approx(direct)
    for mode in ("dense", "bm25"):
        assert single[mode] == pytest.approx(retrieval_scores(mini_profile, questions, minilm_embedder, mode)[0])


def test_tune_cli_writes_its_table(mini_profile, minilm_embedder, tmp_path, capsys):
    ingest(mini_profile, embedder=minilm_embedder)
    profile_file = next(tmp_path.glob("profile.toml"))
    out = tmp_path / "out"
    assert main(["--profile", str(profile_file), "--questions", str(DATA / "questions.csv"), "--out", str(out)]) == 0
    written = list(out.glob("tune-*.md"))
    assert len(written) == 1
    text = written[0].read_text(encoding="utf-8")
    assert "chosen" in text and "--set retrieval.bm25_weight=" in text and text in capsys.readouterr().out


@pytest.mark.parametrize("name", ["xtuner_questions.csv", "xtuner_dev_questions.csv"])
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
    assert not public & dev
