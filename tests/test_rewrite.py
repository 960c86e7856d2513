"""Query rewriting (a translation by the profile's chat model) and BM25 heading weights, on real parts: the
mini corpus in Chroma, MiniLM, and a tiny random Llama standing in for a translating model (its
"translations" are nonsense words of its vocabulary, which is all the plumbing needs)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jobs.common.config import load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.ingest.job import ingest
from jobs.retrieval.check import retrieval_scores
from jobs.retrieval.fusion import fuse
from jobs.retrieval.retriever import StoreRetriever
from jobs.retrieval.rewrite import QueryRewriter, clean, language_of, load_rewriter
from jobs.stores.lexical import field_text, lexical_spec
from jobs.tools.tune import sweep
from tests.conftest import MINI_QUESTIONS, eval_profile


@pytest.fixture
def rewriting(tmp_path, corpus_dir, minilm_path, tiny_llm, minilm_embedder):
    path = eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm)
    path.write_text(path.read_text(encoding="utf-8").replace(
        "[retrieval]\n", '[retrieval]\nrewrite = "translate"\nrewrite_weight = 0.5\n'), encoding="utf-8")
    profile = load_profile(str(path))
    assert profile.retrieval.rewrite == "translate"
    ingest(profile, embedder=minilm_embedder)
    return path


def test_helpers():
    assert language_of("显存不够怎么办？") == "zh" and language_of("How do I resume?") == "en"
    assert clean('Translation: "How do I resume training?"\nThe answer is ...') == "How do I resume training?"
    assert clean("译文：如何恢复训练？") == "如何恢复训练？"
    assert field_text("Install > GPU\nUse CUDA 12.", "Install > GPU", 3) == (
        "Install > GPU\nUse CUDA 12.\nInstall > GPU\nInstall > GPU")
    assert field_text("text", "", 3) == "text" and lexical_spec(1) == "bm25 tokenizer v1"


def test_rewrites_are_generated_once_cached_and_fused(rewriting, minilm_embedder, model_calls):
    profile = load_profile(str(rewriting))
    rewriter = load_rewriter(profile)
    assert isinstance(rewriter, QueryRewriter)
    questions = ["What is the default learning rate in Lumen?", "Lumen 支持 Windows 吗？"]
    rewriter.prepare(questions)
    assert len(model_calls) == 2  # one batch, both questions
    assert all(rewriter.translation(q) for q in questions)
    again = load_rewriter(profile)  # a new process would find them in the cache
    again.prepare(questions)
    assert len(model_calls) == 2 and [again.translation(q) for q in questions] == [
        rewriter.translation(q) for q in questions]

    # Retrieval with the rewrite is the fusion of the question's and the translation's rankings.
    q = questions[0]
    with StoreRetriever(profile, minilm_embedder, None, rewriter) as r, \
            StoreRetriever(profile, minilm_embedder) as plain:
        got = [h.chunk_id for h in r.retrieve(q, 10)]
        depth = max(10, profile.retrieval.fusion_depth)
        want = fuse(plain.retrieve(q, depth), plain.retrieve(rewriter.translation(q), depth), 10,
                    profile.retrieval.rrf_k, profile.retrieval.rewrite_weight)
        assert got == [h.chunk_id for h in want]
        assert "the question's translation by" in r.describe() and "translation" not in plain.describe()


def test_eval_records_and_shows_each_rewrite(rewriting):
    run, df, *_ = ev.evaluate(load_profile(str(rewriting)))
    rag = df[df["mode"] == "rag"]
    assert rag["rewrite"].str.len().gt(0).all() and (df[df["mode"] == "bare"]["rewrite"].isna().all())
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "query rewrite" in report and rag["rewrite"].iloc[0].split()[0] in report
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert "translation by" in header["retrieval"]


def test_a_presence_penalty_decodes_the_answers_never_the_translations(rewriting, model_calls):
    # The retrieval settings were tuned on plain greedy translations: a penalty for answers must not reach them.
    ev.evaluate(load_profile(str(rewriting), {"llm.presence_penalty": 0.5}))
    # One step: the questions' translations first, then their 8 answers (bare and RAG).
    translations, answers = model_calls.penalties[:-8], model_calls.penalties[-8:]
    assert translations and set(translations) == {0.0} and set(answers) == {0.5}


def test_the_sweep_scores_what_the_rewriting_retriever_returns(rewriting, minilm_embedder):
    profile = load_profile(str(rewriting))
    rewriter = load_rewriter(profile)
    results, per_set, _ = sweep(profile, [MINI_QUESTIONS], minilm_embedder, rrf_ks=(60,), weights=(1.0,),
                                depths=(20,), heading_weights=(1,), rewrite_weights=(0.0, 0.5), rewriter=rewriter)
    for setting, means in results.items():
        r = dataclasses.replace(profile.retrieval, rrf_k=60, bm25_weight=1.0, fusion_depth=20,
                                rewrite_weight=setting.rewrite_weight or 0.5)
        p = dataclasses.replace(profile, retrieval=r)
        direct, _ = retrieval_scores(p, MINI_QUESTIONS, minilm_embedder, "hybrid",
                                     rewriter if setting.rewrite_weight else None)
        assert means == pytest.approx(direct)


def test_heading_weight_is_recorded_and_a_change_rebuilds_only_the_lexical_index(mini_profile, minilm_embedder):
    first = ingest(mini_profile, embedder=minilm_embedder)
    heavier = dataclasses.replace(mini_profile, retrieval=dataclasses.replace(mini_profile.retrieval,
                                                                              heading_weight=3))
    with pytest.raises(JobError, match=r"lexical index is 'bm25 tokenizer v1', the profile asks for "
                                       r"'bm25 tokenizer v1, heading x3': re-run `make ingest"):
        StoreRetriever(heavier, minilm_embedder)
    again = ingest(heavier, embedder=minilm_embedder)
    assert again.wrote and again.embedded == 0 and not again.rebuilt and again.chunks == first.chunks
    with StoreRetriever(heavier, minilm_embedder) as r:
        assert r.build_info["heading_weight"] == 3 and "heading x3" in r.describe()
        hits = r.retrieve("Supported models", 3)
        assert hits and hits[0].path == "README.md"


def test_only_questions_outside_the_target_language_are_translated(rewriting, model_calls):
    profile = load_profile(str(rewriting), {"retrieval.rewrite_into": "zh"})
    rewriter = load_rewriter(profile)
    rewriter.prepare(["What is the default learning rate in Lumen?", "Lumen 支持 Windows 吗？"])
    assert len(model_calls) == 1  # the Chinese question is already in the language with every page
    assert rewriter.translation("Lumen 支持 Windows 吗？") == "" and rewriter.translation(
        "What is the default learning rate in Lumen?")
    assert "translation into zh by" in rewriter.describe()
    with pytest.raises(JobError, match=r"rewrite_into='fr': expected any, zh or en"):
        load_profile(str(rewriting), {"retrieval.rewrite_into": "fr"})
