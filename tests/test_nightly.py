"""Nightly operation: generation cache, run history, comparison with the last run, plots, alerts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.eval import job as ev
from jobs.llm.cache import GenerationCache

PNG = b"\x89PNG\r\n\x1a\n"


def set_cached_answer(profile, run, qid: str, mode: str, text: str) -> None:
    """Store another answer behind one answer of `run` (found by its prompt's hash), as the cache writes one:
    the next run reads it as that prompt's answer (an entry edited by hand would be refused)."""
    rec = pd.read_csv(run.path / "results.csv").set_index(["id", "mode"]).loc[(qid, mode)]
    root = profile.paths.cache / "generations"
    for path in root.rglob("*.json"):
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["prompt_sha1"] == rec["prompt_sha1"]:
            GenerationCache(root).put(path.stem, entry["prompt"], text=text, prompt_tokens=entry["prompt_tokens"],
                                      answer_tokens=entry["answer_tokens"], seconds=entry["seconds"])
            return
    raise AssertionError(f"no cache entry for {qid}/{mode}")


def test_second_identical_run_generates_nothing(ingested, model_calls):
    profile = load_profile(str(ingested))
    first, df1, _, comp1 = ev.evaluate(profile)
    assert len(model_calls) == 8 and comp1 is None
    second, df2, _, comp2 = ev.evaluate(profile)
    assert len(model_calls) == 8  # not one more prompt reached the model
    assert df2["cached"].all() and list(df2["answer"]) == list(df1["answer"])
    summary = json.loads((second.path / "summary.json").read_text(encoding="utf-8"))
    assert summary["run"]["answers from cache"] == 8 and summary["run"]["answers generated"] == 0
    assert comp2 is not None and comp2.baseline == first.run_id
    assert comp2.regressions.empty and comp2.fixed.empty and comp2.differences == []
    report = (second.path / "report.md").read_text(encoding="utf-8")
    assert f"## Since the last run ({first.run_id})" in report
    history = pd.read_csv(profile.eval.reports_dir / "history.csv")
    assert list(history["run"]) == [first.run_id, second.run_id]
    for name in ("categories.png", "trend.png", "recall.png"):
        assert (second.path / name).read_bytes().startswith(PNG) and f"]({name})" in report
    assert (first.path / "trend.png").read_bytes().startswith(PNG)  # one run of history still plots

    ev.evaluate(profile, use_cache=False)
    assert len(model_calls) == 16  # --no-cache regenerates everything


def test_prompt_or_decoding_change_invalidates_the_cache(ingested, model_calls, monkeypatch):
    profile = load_profile(str(ingested))
    ev.evaluate(profile)
    ev.evaluate(load_profile(str(ingested), {"llm.max_new_tokens": 5}))
    assert len(model_calls) == 16
    monkeypatch.setattr(ev, "PROMPT_VERSION", ev.PROMPT_VERSION + 1)
    ev.evaluate(profile)
    assert len(model_calls) == 24
    ev.evaluate(load_profile(str(ingested), {"llm.batch_size": 3}))  # batching does not change answers
    assert len(model_calls) == 24
    run, *_ = ev.evaluate(load_profile(str(ingested), {"llm.presence_penalty": 0.5}))
    assert len(model_calls) == 32 and model_calls.penalties[-8:] == [0.5] * 8
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "llm.presence_penalty" in report  # named among the settings that differ from the last run


def test_regressions_name_exactly_the_changed_question(ingested, capsys):
    profile = load_profile(str(ingested))
    seed_run, *_ = ev.evaluate(profile)
    # Night 1: t2's RAG answer is right (its cache entry now says so); night 2: it is wrong again.
    set_cached_answer(profile, seed_run, "t2", "rag", "Lumen 暂不支持原生 Windows，可以在 WSL2 中使用。")
    night1, df1, s1, _ = ev.evaluate(profile)
    assert df1.set_index(["id", "mode"]).loc[("t2", "rag"), "all_keywords_hit"]
    set_cached_answer(profile, seed_run, "t2", "rag", "我不确定。")
    night2, df2, s2, comp = ev.evaluate(profile)

    assert comp.baseline == night1.run_id
    assert list(zip(comp.regressions["id"], comp.regressions["mode"])) == [("t2", "rag")]
    assert comp.fixed.empty
    row = comp.regressions.iloc[0]
    assert "WSL2" in row["answer before"] and row["answer now"] == "我不确定。"
    assert "docs/zh_cn/faq.md" in row["sources now"]
    # Deltas equal the ones recomputed from the two results files.
    r1 = pd.read_csv(night1.path / "results.csv")
    r2 = pd.read_csv(night2.path / "results.csv")
    for cat in ("factual", "overall"):
        sel1 = r1[(r1["mode"] == "rag") & ((r1["category"] == cat) | (cat == "overall"))]
        sel2 = r2[(r2["mode"] == "rag") & ((r2["category"] == cat) | (cat == "overall"))]
        got = comp.deltas.set_index(["category", "mode"]).loc[(cat, "rag"), "keyword_hit_rate"]
        assert got == pytest.approx(sel2["keyword_hit_rate"].mean() - sel1["keyword_hit_rate"].mean())
        assert got < 0
    report = (night2.path / "report.md").read_text(encoding="utf-8")
    assert "### Regressions (1)" in report and "| t2 " in report.split("### Regressions")[1].split("### Fixed")[0]

    # Alerting on the change since the baseline; --baseline picks another run to compare with.
    code = ev.main(["--profile", str(ingested), "--fail-under", "change.rag.keyword_hit_rate=-0.05"])
    assert code == 0  # night 3 equals night 2: no change
    capsys.readouterr()
    # Against night 1, one question of four dropped (-0.25): below the threshold, but four questions cannot
    # make any change significant, so the significance-gated form reports it and passes; the raw form fails.
    code = ev.main(["--profile", str(ingested), "--baseline", night1.run_id,
                    "--fail-under", "change.rag.keyword_hit_rate=-0.05"])
    out = capsys.readouterr().out
    assert code == 0 and "ok (within noise): change.rag.keyword_hit_rate = -0.250" in out
    assert "no significant regression: 1 question(s) regressed" in out
    code = ev.main(["--profile", str(ingested), "--baseline", night1.run_id,
                    "--fail-under", "rawchange.rag.keyword_hit_rate=-0.05"])
    assert code == 3 and "FAIL: rawchange.rag.keyword_hit_rate = -0.250" in capsys.readouterr().err


def test_baseline_prefers_the_same_profile_and_names_differences(ingested, tmp_path):
    other_path = tmp_path / "other.toml"
    other_path.write_text(f'extends = "{ingested}"\nname = "other"\n', encoding="utf-8")
    mine, other = load_profile(str(ingested)), load_profile(str(other_path))
    first, *_ = ev.evaluate(mine)
    _, _, _, cross = ev.evaluate(other)
    # Only another profile's run exists: compared with it, and the report says what differs.
    assert cross.baseline == first.run_id and "profile: test → other" in cross.differences
    third, _, _, again = ev.evaluate(mine)
    assert again.baseline == first.run_id and again.differences == []  # last run of *this* profile
    # A setting outside the header (the system prompt) moves answers too: it is named, with both values.
    _, _, _, prompted = ev.evaluate(load_profile(str(ingested), {"llm.system_prompt": "Answer briefly."}))
    assert prompted.baseline == third.run_id
    assert [d for d in prompted.differences if d.startswith("llm.")] == [
        f"llm.system_prompt: {mine.llm.system_prompt!r} → 'Answer briefly.'"]


def test_a_setting_added_since_the_baseline_is_named_once_it_leaves_its_default(ingested):
    first, *_ = ev.evaluate(load_profile(str(ingested)))
    # The baseline as an older version of the job recorded it: before llm.presence_penalty existed.
    info = json.loads((first.path / "run.json").read_text(encoding="utf-8"))
    del info["config"]["llm.presence_penalty"]
    (first.path / "run.json").write_text(json.dumps(info), encoding="utf-8")
    _, _, _, same = ev.evaluate(load_profile(str(ingested)))
    assert same.baseline == first.run_id and same.differences == []  # its default then and now
    penalised = load_profile(str(ingested), {"llm.presence_penalty": 0.5})
    _, _, _, changed = ev.evaluate(penalised, baseline=first.run_id)
    assert changed.differences == ["llm.presence_penalty: 0.0 (its default; not a setting then) → 0.5"]
