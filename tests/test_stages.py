"""The eval's stages: answers through one caching wrapper around the chat model (jobs.llm.cache.CachedChatModel),
for answers and query rewrites alike; then scoring (jobs.eval.scoring.score) and the outputs
(jobs.eval.finish.finish_run), run from the answers on disk by a night and by a re-report alike."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.eval import report
from jobs.eval.scoring.score import abstain_phrases, score_answers
from jobs.llm import Completion
from jobs.llm.cache import CachedChatModel, GenerationCache
from jobs.retrieval.rewrite import REWRITE_VERSION, QueryRewriter
from tests.conftest import MINI_QUESTIONS, eval_profile, ingested_profile


class FakeModel:
    """A ChatModel that answers every prompt at once, or fails the prompts in ``fail``; it notes what it was asked."""

    name = "fake"
    questions_per_step = 1

    def __init__(self, reply: str = "answer to {prompt}", fail: tuple[str, ...] = ()) -> None:
        self.reply, self.fail = reply, set(fail)
        self.asked: list[tuple[str, float]] = []

    def render(self, user: str) -> str:
        return f"<user>{user}</user>"

    def generate(self, prompts, on_result=None, *, presence_penalty=0.0):
        out = []
        for i, p in enumerate(prompts):
            self.asked.append((p, presence_penalty))
            failed = p in self.fail
            c = Completion(text="" if failed else self.reply.format(prompt=p), prompt=p, prompt_tokens=3,
                           answer_tokens=0 if failed else 2, seconds=0.5, error="boom" if failed else "")
            out.append(c)
            if on_result is not None:
                on_result(i, c)
        return out

    def fingerprint(self) -> dict:
        return {"model": "fake", "max_new_tokens": 8}

    def identity(self) -> dict:
        return {"llm": "fake"}

    def close(self) -> None:
        pass


def _entry(cache: GenerationCache, fingerprint: dict, prompt: str) -> Path:
    key = GenerationCache.key(fingerprint, prompt)
    return cache.root / key[:2] / f"{key}.json"


# ---- the caching wrapper ---------------------------------------------------------------------------------------

def test_the_wrapper_answers_from_the_cache_and_asks_the_model_only_for_the_rest(tmp_path):
    model, cache = FakeModel(fail=("bad",)), GenerationCache(tmp_path / "gen")
    cached = CachedChatModel(model, cache, {"prompt_version": 7})
    seen = []

    def on_result(i, completion):  # each answer is reported before it is cached
        seen.append((i, completion.cached, completion.text,
                     _entry(cache, {**model.fingerprint(), "prompt_version": 7}, completion.prompt).exists()))

    out = cached.generate(["a", "b", "bad"], on_result)
    assert [(c.text, c.cached, c.error) for c in out] == [("answer to a", False, ""), ("answer to b", False, ""),
                                                          ("", False, "boom")]
    assert sorted(seen) == [(0, False, "answer to a", False), (1, False, "answer to b", False), (2, False, "", False)]
    # Keyed exactly as the job always keyed answers: the model's fingerprint, the prompt version, the prompt.
    assert _entry(cache, {**model.fingerprint(), "prompt_version": 7}, "a").is_file()
    assert not _entry(cache, {**model.fingerprint(), "prompt_version": 7}, "bad").exists()  # failed: never cached

    seen.clear()
    again = cached.generate(["a", "bad", "b"], on_result)
    assert model.asked[3:] == [("bad", 0.0)]  # only the answer that failed the first time
    assert [(c.text, c.cached, c.seconds) for c in again] == [("answer to a", True, 0.5), ("", False, 0.5),
                                                              ("answer to b", True, 0.5)]
    assert [s[:2] for s in seen] == [(0, True), (2, True), (1, False)]  # cached ones first, as they are found

    # A presence penalty is part of the key only when set: what was cached without one stays valid.
    cached.generate(["a"], presence_penalty=0.5)
    assert model.asked[-1] == ("a", 0.5)
    assert _entry(cache, {**model.fingerprint(), "prompt_version": 7, "presence_penalty": 0.5}, "a").is_file()
    assert cached.generate(["a"])[0].cached

    # Reads off (--no-cache): everything is asked again, and the entries are refreshed.
    n = len(model.asked)
    fresh = CachedChatModel(model, GenerationCache(tmp_path / "gen", enabled=False), {"prompt_version": 7})
    assert not any(c.cached for c in fresh.generate(["a", "b"])) and len(model.asked) == n + 2


def test_a_cache_that_cannot_be_written_costs_the_caching_never_an_answer(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("x", encoding="utf-8")
    model = FakeModel()
    cached = CachedChatModel(model, GenerationCache(tmp_path / "not-a-folder"), {"prompt_version": 1})
    got = []
    cached.generate(["a", "b"], lambda i, c: got.append((i, c.text)))
    assert got == [(0, "answer to a"), (1, "answer to b")]
    assert len([r for r in caplog.records if "cannot write the generation cache" in r.getMessage()]) == 1


def test_rewrites_go_through_the_same_wrapper_keyed_as_before(tmp_path):
    model = FakeModel(reply='Translation: "What is Lumen?"\nThe answer is ...')
    cache = GenerationCache(tmp_path / "gen")
    rewriter = QueryRewriter(model, cache)
    rewriter.prepare(["Lumen 是什么？"])
    prompt = model.asked[0][0]
    assert rewriter.translation("Lumen 是什么？") == "What is Lumen?"  # cleaned
    # Cached cleaned, under the key rewrites always had: the model's fingerprint and the template's version.
    entry = json.loads(_entry(cache, {**model.fingerprint(), "rewrite_version": REWRITE_VERSION}, prompt)
                       .read_text(encoding="utf-8"))
    assert entry["text"] == "What is Lumen?" and rewriter.seconds["Lumen 是什么？"] == 0.5

    again = QueryRewriter(model, GenerationCache(tmp_path / "gen"))
    again.prepare(["Lumen 是什么？"])
    assert len(model.asked) == 1 and again.translation("Lumen 是什么？") == rewriter.translation("Lumen 是什么？")
    assert again.seconds["Lumen 是什么？"] == 0.0  # from the cache: no time spent
    no_cache = QueryRewriter(model, GenerationCache(tmp_path / "gen", enabled=False))
    no_cache.prepare(["Lumen 是什么？"])
    assert len(model.asked) == 2  # --no-cache reaches the rewrites


# ---- answers and rewrites in the eval ------------------------------------------------------------------------

@pytest.fixture
def rewriting(tmp_path, corpus_dir, minilm_path, tiny_llm, minilm_embedder) -> Path:
    path = eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm)
    path.write_text(path.read_text(encoding="utf-8").replace(
        "[retrieval]\n", '[retrieval]\nrewrite = "translate"\nrewrite_weight = 0.5\n'), encoding="utf-8")
    return ingested_profile(path, minilm_embedder)


def test_a_second_night_asks_the_model_nothing_and_no_cache_asks_rewrites_too(rewriting, model_calls):
    profile = load_profile(str(rewriting))
    first, df1, s1, _ = ev.evaluate(profile)
    translations = len(model_calls) - 8  # the 4 questions' translations, then the 8 answers
    assert translations == 4 and not df1["cached"].any()

    second, df2, s2, _ = ev.evaluate(profile)
    assert len(model_calls) == 12  # neither a translation nor an answer reached the model
    assert df2["cached"].all() and list(df2["rewrite"].fillna("")) == list(df1["rewrite"].fillna(""))
    scores = ["keyword_hit_rate", "all_keywords_hit", "abstained", "hit_at_1", "hit_at_5", "mrr", "passage_dump"]
    pd.testing.assert_frame_equal(df2[scores], df1[scores])

    assert ev.main(["--profile", str(rewriting), "--no-cache"]) in (0, ev.EXIT_THRESHOLD)
    assert len(model_calls) == 24  # --no-cache asks the translations again, not only the answers
    third = pd.read_csv(profile.eval.reports_dir / "history.csv").iloc[-1]
    assert third["run"] not in (first.run_id, second.run_id) and third["cached_answers"] == 0


# ---- scoring from the answers on disk --------------------------------------------------------------------------

def test_answers_are_recorded_unscored_and_scored_by_the_scoring_stage(ingested):
    run, df, *_ = ev.evaluate(load_profile(str(ingested)))
    recorded = [json.loads(line) for line in (run.path / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert recorded and not any(k in r for r in recorded for k in ("keyword_hit_rate", "abstained", "stage"))
    # The stage scores what was recorded, and nothing else: the run's results are exactly that.
    rescored = score_answers(pd.DataFrame(recorded).set_index(["id", "mode"]).loc[list(zip(df["id"], df["mode"]))]
                             .reset_index(), ("not covered", "没有提到"))
    for col in ("keyword_hits", "keyword_hit_rate", "all_keywords_hit", "abstained", "stage", "passage_dump",
                "strict_keyword_hit_rate"):
        pd.testing.assert_series_equal(rescored[col], df[col], check_dtype=False)
    # results.csv keeps the scores beside the answer, where they always were.
    columns = list(pd.read_csv(run.path / "results.csv").columns)
    assert columns[columns.index("answer") + 1:columns.index("answer") + 5] == [
        "keyword_hits", "keyword_hit_rate", "all_keywords_hit", "abstained"]


def test_a_rereport_rescores_from_disk_after_an_expected_keyword_is_edited(ingested):
    profile = load_profile(str(ingested))
    first, *_ = ev.evaluate(profile)
    run, df, summary, _ = ev.evaluate(profile)
    history = pd.read_csv(profile.eval.reports_dir / "history.csv")
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    t1 = df.set_index(["id", "mode"]).loc[("t1", "rag")]
    assert not t1["all_keywords_hit"]  # a tiny random model does not say "3e-4" and "cosine"
    word = t1["answer"].split()[0]

    # Edit t1's expected keywords in the run's results: one word the answer holds, one it does not.
    lines = [json.loads(x) for x in (run.path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    for rec in lines:
        if (rec["id"], rec["mode"]) == ("t1", "rag"):
            rec["expected_keywords"] = f"{word}|no-such-word-anywhere"
    (run.path / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines),
                                            encoding="utf-8")
    assert report.main([str(run.path)]) == 0

    after = pd.read_csv(run.path / "results.csv").set_index(["id", "mode"])
    row = after.loc[("t1", "rag")]
    assert (row["keyword_hits"], row["keyword_hit_rate"], row["all_keywords_hit"]) == ("1|0", 0.5, False)
    saved = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))
    rag = after[after.index.get_level_values("mode") == "rag"]
    assert saved["overall"]["rag"]["keyword_hit_rate"] == pytest.approx(rag["keyword_hit_rate"].mean())
    assert saved["overall"]["rag"]["keyword_hit_rate"] != pytest.approx(summary["overall"]["rag"]["keyword_hit_rate"])
    assert saved["run"] == header and saved["outcome"] == "ok"  # the night itself is not re-judged
    # The history row is rescored in its place; latest.md (it points to this run) says the new numbers.
    now = pd.read_csv(profile.eval.reports_dir / "history.csv")
    assert list(now["run"]) == list(history["run"]) == [first.run_id, run.run_id]
    assert now.set_index("run").loc[run.run_id, "rag_keyword_hit"] == pytest.approx(
        saved["overall"]["rag"]["keyword_hit_rate"])
    latest = (profile.eval.reports_dir / "latest.md").read_text(encoding="utf-8")
    assert f"RAG {saved['overall']['rag']['keyword_hit_rate']:.2f}" in latest

    # Re-reporting the older run refreshes its own files, never where latest.md points.
    assert report.main([str(first.path)]) == 0
    assert f"({run.run_id}/report.md)" in (profile.eval.reports_dir / "latest.md").read_text(encoding="utf-8")


def test_a_rereport_scores_abstention_with_the_phrases_in_run_json_and_keeps_the_outcome(
        tmp_path, corpus_dir, minilm_path, tiny_llm, minilm_embedder):
    questions = tmp_path / "q.csv"
    questions.write_text(MINI_QUESTIONS.read_text(encoding="utf-8") + "n1,Does Lumen support TPUs?,en,,,negative,\n",
                         encoding="utf-8")
    path = ingested_profile(eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm, questions=questions),
                            minilm_embedder)
    profile = load_profile(str(path))
    night1, *_ = ev.evaluate(profile)
    night2, df, summary, _ = ev.evaluate(profile)
    n1 = df.set_index(["id", "mode"]).loc[("n1", "rag")]
    assert not n1["abstained"] and summary["overall"]["rag"]["abstention"] == 0.0
    word = n1["answer"].split()[0]

    # Night 2's abstain phrases, as its run.json recorded them, now hold a word of its n1 answer.
    info = json.loads((night2.path / "run.json").read_text(encoding="utf-8"))
    assert abstain_phrases(info) == ("not covered", "没有提到")
    info["config"]["eval.abstain_phrases"] = repr(("not covered", word))
    (night2.path / "run.json").write_text(json.dumps(info), encoding="utf-8")
    # And the night counts as failed (as if its answers had failed): a re-report must not turn it green.
    saved = json.loads((night2.path / "summary.json").read_text(encoding="utf-8"))
    (night2.path / "summary.json").write_text(json.dumps({**saved, "outcome": "failed answers"}), encoding="utf-8")

    assert report.main([str(night2.path)]) == 0
    after = json.loads((night2.path / "summary.json").read_text(encoding="utf-8"))
    assert after["overall"]["rag"]["abstention"] == 1.0 and after["outcome"] == "failed answers"
    assert pd.read_csv(night2.path / "results.csv").set_index(["id", "mode"]).loc[("n1", "rag"), "abstained"]
    assert "**This run is no success" in (night2.path / "report.md").read_text(encoding="utf-8")
    assert pd.read_csv(profile.eval.reports_dir / "history.csv").set_index("run").loc[
        night2.run_id, "outcome"] == "failed answers"

    # The baseline is rescored through the same stage with its own phrases: night 1 abstained on n1 by night 2's
    # new phrase only if its own run.json says so.
    info1 = json.loads((night1.path / "run.json").read_text(encoding="utf-8"))
    info1["config"]["eval.abstain_phrases"] = repr((word,))
    (night1.path / "run.json").write_text(json.dumps(info1), encoding="utf-8")
    _, _, _, comp = ev.evaluate(profile, baseline=night1.run_id)
    assert comp.then.set_index(["id", "mode"]).loc[("n1", "rag"), "abstained"]
    regressed = list(zip(comp.regressions["id"], comp.regressions["mode"]))
    assert ("n1", "rag") in regressed and {qid for qid, _ in regressed} == {"n1"}

    info["config"]["eval.abstain_phrases"] = "not a list"
    (night2.path / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(JobError, match=r"eval.abstain_phrases in its run.json is not a list of phrases"):
        report.main([str(night2.path)])
