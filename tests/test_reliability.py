"""Reliability: every setting honoured or refused, a store that moves or breaks under a reader, runs and
baselines, and inputs that must not slip through. Real Chroma on disk, real git, real (tiny) models."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import ROOT, load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.ingest import job as ing
from jobs.ingest.job import ingest
from jobs.ingest.source import fetch, load_manifest
from jobs.retrieval.retriever import StoreRetriever
from jobs.stores import embedded as st
from tests.conftest import (
    HEADER,
    MINI_QUESTIONS,
    BackgroundEval,
    eval_profile,
    git,
    make_server_profile,
    many_questions,
    store_generations,
    store_live_generation,
    write_manifest,
    write_profile,
)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- settings ---------------------------------------------------------------------------------------------

def test_set_is_honoured_for_settings_that_also_have_a_flag(tmp_path):
    args = ing.build_parser().parse_args(["--set", "chunking.size=200", "--set", "chunking.overlap=20",
                                          "--set", f"store.path={tmp_path / 'x'}"])
    p = ing.profile_from_args(args)
    assert (p.chunking.size, p.chunking.overlap, p.store.path) == (200, 20, tmp_path / "x")
    args = ev.build_parser().parse_args(["--set", "llm.batch_size=3", "--set", "retrieval.top_k=5",
                                         "--set", "llm.max_new_tokens=7", "--set", "llm.seed=4",
                                         "--set", f"store.path={tmp_path / 'y'}",
                                         "--set", f"eval.reports_dir={tmp_path}"])
    p = ev.profile_from_args(args)
    assert (p.llm.batch_size, p.retrieval.top_k, p.llm.max_new_tokens, p.llm.seed) == (3, 5, 7, 4)
    assert p.store.path == tmp_path / "y" and p.eval.reports_dir == tmp_path
    with pytest.raises(JobError, match=r"\[llm\]\.batch_size: expected an integer, got 'abc'"):
        ev.profile_from_args(ev.build_parser().parse_args(["--set", "llm.batch_size=abc"]))
    with pytest.raises(JobError, match=r"llm\.batch_size is given twice"):
        ev.profile_from_args(ev.build_parser().parse_args(["--set", "llm.batch_size=3", "--batch-size", "4"]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-new-tokens", "-5"], r"\[llm\]\.max_new_tokens=-5: must be between 1 and 32768"),
    (["--batch-size", "-3"], r"\[llm\]\.batch_size=-3: must be between 1"),
    (["--limit", "0"], r"--limit 0: must be at least 1"),
    (["--fail-under", "rag.keyword_hit_rate=nan"], r"must be a finite number, got 'nan'"),
    (["--fail-under", "bare.hit_at_5=0.5"], r"measured on RAG answers only"),
])
def test_bad_numbers_are_refused_before_anything_is_written(ingested, argv, message, capsys):
    with pytest.raises(JobError, match=message):
        ev.main(["--profile", str(ingested), *argv])
    assert not load_profile(str(ingested)).eval.reports_dir.exists()


def test_a_threshold_the_question_set_cannot_produce_is_refused_up_front(ingested, tmp_path):
    no_negatives = tmp_path / "q.csv"
    no_negatives.write_text(HEADER + "a,What is the default learning rate?,en,3e-4,,factual,\n", encoding="utf-8")
    for threshold, why in (("rag.abstention=0.5", "negative questions, and q.csv has none"),
                           ("change.rag.hit_at_5=-0.1", "hit_at_5 needs expected_sources")):
        with pytest.raises(JobError, match=why):
            ev.main(["--profile", str(ingested), "--questions", str(no_negatives), "--fail-under", threshold])
    assert not load_profile(str(ingested)).eval.reports_dir.exists()


def test_change_threshold_without_a_baseline_is_skipped_not_failed(ingested, capsys):
    code = ev.main(["--profile", str(ingested), "--fail-under", "change.rag.keyword_hit_rate=-0.05"])
    out = capsys.readouterr().out
    assert code == 0 and "SKIP: change.rag.keyword_hit_rate: no baseline run to compare with" in out


# ---- a store that moves under a reader ---------------------------------------------------------------------

# The same reader on both backends; a server store takes longer to publish to, so fewer publishes fit in its eval.
@pytest.mark.parametrize(("backend", "questions", "publishes"), [("embedded", 40, 3), ("server", 30, 2)])
def test_an_eval_reads_one_generation_while_ingests_publish(backend, questions, publishes, request, tmp_path,
                                                            corpus_dir, minilm_path, minilm_embedder, slow_llm):
    questions = many_questions(tmp_path / "many.csv", questions)
    if backend == "server":
        url = request.getfixturevalue("chroma_server")  # started only for this backend
        prof = make_server_profile(tmp_path, corpus_dir, minilm_path, slow_llm, url, questions=questions,
                                   max_new_tokens=48)
    else:
        prof = eval_profile(tmp_path, corpus_dir, minilm_path, slow_llm, questions=questions, max_new_tokens=48)
    profile = load_profile(str(prof))
    assert bool(profile.store.url) == (backend == "server")
    ingest(profile, embedder=minilm_embedder)
    first = store_live_generation(profile)
    first_folder = st.live_generation(profile.store.path) if backend == "embedded" else None

    job = BackgroundEval(prof, tmp_path / "eval.log")
    try:
        job.wait_for_answers(tmp_path / "reports", 2)
        faq = corpus_dir / "docs/zh_cn/faq.md"
        for night in range(publishes):
            faq.write_text(faq.read_text(encoding="utf-8") + f"\n\n## 更新 {night}\n\n第 {night} 次更新的内容。\n",
                           encoding="utf-8")
            assert ingest(profile, embedder=minilm_embedder).wrote
        assert job.proc.poll() is None, "the eval finished before the publishes: the test proves nothing"
        # A store keeps the live and the previous generation; the one the eval reads is leased: it is still there.
        kept = store_generations(profile)
        assert first in kept and store_live_generation(profile) != first and len(kept) == 3
        if first_folder is not None:
            assert first_folder.is_dir()
        assert job.wait() == 0, job.output()[-3000:]
    finally:
        job.stop()
    run = next((tmp_path / "reports").glob("*/summary.json")).parent
    results = pd.read_csv(run / "results.csv")
    assert len(results) == 2 * len(pd.read_csv(questions))
    header = json.loads((run / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["store_generation"] == first  # one generation from start to end
    ingest(profile, embedder=minilm_embedder)  # the reader is gone: now it is collected
    assert first not in store_generations(profile) and len(store_generations(profile)) == 2
    if first_folder is not None:
        assert not first_folder.exists()


def test_readers_never_write_to_the_live_generation(ingested):
    profile = load_profile(str(ingested))
    live = st.live_generation(profile.store.path)
    before = tree_hashes(live)
    out = subprocess.run([sys.executable, "-m", "jobs.ingest", "--profile", str(ingested), "--check-only",
                          "--check", str(MINI_QUESTIONS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ev.evaluate(profile)
    assert tree_hashes(live) == before


# ---- a damaged store ---------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_damaged_store_is_named_eval_says_how_to_repair_and_ingest_recovers(ingested, corpus_dir, minilm_embedder,
                                                                          caplog):
    profile = load_profile(str(ingested))
    faq = corpus_dir / "docs/zh_cn/faq.md"
    faq.write_text(faq.read_text(encoding="utf-8") + "\n\n## 新的一节\n\n新增的内容。\n", encoding="utf-8")
    ingest(profile, embedder=minilm_embedder)  # two generations: the live one and the previous one
    live = st.live_generation(profile.store.path)
    _truncate(live / st.SQLITE)

    for run in (lambda: ev.main(["--profile", str(ingested)]),
                lambda: ing.main(["--profile", str(ingested), "--check-only", "--check", str(MINI_QUESTIONS)])):
        with pytest.raises(JobError) as err:
            run()
        msg = str(err.value)
        assert "\n" not in msg and "damaged" in msg and f"{live.name}" in msg and "chroma.sqlite3" in msg
        assert "run `make ingest PROFILE=test`" in msg
    assert not profile.eval.reports_dir.exists()

    summary = ingest(profile, embedder=minilm_embedder)  # falls back to the previous generation
    assert summary.wrote and not summary.rebuilt and summary.embedded > 0  # the edit is re-applied
    assert "recovering from generation" in caplog.text
    run, df, *_ = ev.evaluate(profile)
    assert len(df) == 8

    # Nothing sound left (and no manifest to compare with): SQLite's own check finds it; ingest rebuilds.
    for gen in st.finished_generations(profile.store.path):
        (gen / st.MANIFEST).unlink()
        _truncate(gen / st.SQLITE)
    with pytest.raises(JobError, match="malformed|not a database"):
        StoreRetriever(profile, minilm_embedder)
    rebuilt = ingest(profile, embedder=minilm_embedder)
    assert rebuilt.wrote and rebuilt.rebuilt and rebuilt.embedded == rebuilt.chunks
    with StoreRetriever(profile, minilm_embedder) as r:
        assert r.retrieve("learning rate", 3)


# ---- runs and baselines ------------------------------------------------------------------------------------

def _unfinished_run(profile, **info_changes) -> Path:
    """A run folder as a killed eval leaves it: run.json and part of progress.jsonl, no summary."""
    run, *_ = ev.evaluate(profile)
    (run.path / "summary.json").unlink()
    lines = (run.path / "progress.jsonl").read_text(encoding="utf-8").splitlines()
    (run.path / "progress.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    info = json.loads((run.path / "run.json").read_text(encoding="utf-8"))
    info.update(info_changes)
    (run.path / "run.json").write_text(json.dumps(info), encoding="utf-8")
    return run.path


def test_unfinished_baseline_is_refused_before_models_load(ingested, monkeypatch):
    profile = load_profile(str(ingested))
    unfinished = _unfinished_run(profile)
    before = sorted(p.name for p in profile.eval.reports_dir.iterdir())
    monkeypatch.setattr(ev, "load_embedder", lambda *_: pytest.fail("a model loaded"))
    with pytest.raises(JobError, match=rf"--baseline {unfinished.name}: that run did not finish"):
        ev.main(["--profile", str(ingested), "--baseline", unfinished.name])
    assert sorted(p.name for p in profile.eval.reports_dir.iterdir()) == before  # nothing written


def test_resume_takes_the_newest_matching_run_and_counts_kept_answers(ingested):
    profile = load_profile(str(ingested))
    matching = _unfinished_run(profile)
    time.sleep(0.01)
    _unfinished_run(profile, experiment="another")  # newer, but run with other settings
    run, df, *_ = ev.evaluate(profile, resume=True)
    assert run.path == matching and len(df) == 8
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["answers kept from the interrupted run"] == 4
    assert header["answers generated"] + header["answers from cache"] == 4
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "| answers kept from the interrupted run | 4 " in report

    _unfinished_run(profile, questions_sha256="other")
    with pytest.raises(JobError, match=r"no unfinished run of profile 'test' used these settings and questions "
                                       r"\(unfinished: .*questions_sha256 differ"):
        ev.evaluate(profile, resume=True)


# ---- inputs that must not get through ----------------------------------------------------------------------

def _snapshot(folder: Path, commit: str, tag: str = "") -> Path:
    (folder / "SNAPSHOT.md").write_text(f"# snapshot\n\n- Commit: `{commit}`\n" + (f"- Tag: `{tag}`\n" if tag else ""),
                                        encoding="utf-8")
    return folder


def test_folder_snapshot_must_match_the_pin(tmp_path, corpus_dir):
    sha = "ab" * 20
    _snapshot(corpus_dir, sha, tag="v1.0")
    for ref in (sha, sha[:8], "v1.0"):
        manifest = load_manifest(write_manifest(tmp_path / "m.toml", ref=ref, sources=[("folder", str(corpus_dir))]))
        assert fetch(manifest, tmp_path / "cache").commit == sha
    for ref, why in (("deadbeef", f"snapshot is at commit {sha}, the manifest pins deadbeef"),
                     ("not-a-sha", "neither a commit sha nor a tag the snapshot names")):
        manifest = load_manifest(write_manifest(tmp_path / "m.toml", ref=ref, sources=[("folder", str(corpus_dir))]))
        with pytest.raises(JobError, match=why):
            fetch(manifest, tmp_path / "cache")


def test_git_short_sha_and_tag_resolve_to_the_pinned_commit(tmp_path, git_repo):
    repo, shas = git_repo
    git(repo, "tag", "v0", shas[0])
    for ref, want in ((shas[1][:10], shas[1]), ("v0", shas[0])):
        manifest = load_manifest(write_manifest(tmp_path / "m.toml", ref=ref, sources=[("git", f"file://{repo}")]))
        assert fetch(manifest, tmp_path / "cache").commit == want
    manifest = load_manifest(write_manifest(tmp_path / "m.toml", ref="deadbeef", sources=[("git", f"file://{repo}")]))
    with pytest.raises(JobError, match="deadbeef"):
        fetch(manifest, tmp_path / "cache")


def test_too_long_question_is_refused_and_an_oversized_prompt_is_a_visible_failure(ingested, tmp_path):
    profile = load_profile(str(ingested))
    long_q = tmp_path / "long.csv"
    long_q.write_text(HEADER + "a,\"" + "learning rate " * 400 + "?\",en,3e-4,,factual,\n", encoding="utf-8")
    with pytest.raises(JobError, match=r"long\.csv:2: question: 5601 characters, more than "
                                       r"eval\.max_question_chars=2000"):
        ev.evaluate(profile, questions=long_q)
    assert not profile.eval.reports_dir.exists()

    # Allowed by the profile but too long for the model's window (2,048 tokens): recorded as a failure, at once.
    roomy = load_profile(str(ingested), {"eval.max_question_chars": 20000})
    huge = tmp_path / "huge.csv"
    huge.write_text(HEADER + "a,\"" + "learning rate " * 1100 + "?\",en,3e-4,,factual,\n"
                    "b,What is the default learning rate?,en,3e-4,docs/en/config.md,english,\n", encoding="utf-8")
    started = time.monotonic()
    run, df, *_ = ev.evaluate(roomy, questions=huge)
    assert time.monotonic() - started < 120
    failed = df[df["id"] == "a"]
    assert len(failed) == 2 and failed["error"].str.contains("exceeds the model's window of 2048 tokens").all()
    assert (failed["answer"] == "").all() and (failed["keyword_hit_rate"] == 0).all()
    assert (df[df["id"] == "b"]["error"] == "").all()
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["answers failed"] == 2
    assert "failed: prompt of" in (run.path / "report.md").read_text(encoding="utf-8")


def test_expected_sources_missing_from_the_store_are_named(ingested, tmp_path, caplog):
    qs = tmp_path / "stale.csv"
    qs.write_text(HEADER + "a,What is the default learning rate?,en,3e-4,docs/en/config.md|docs/en/gone.md,factual,\n"
                  "b,How do I resume training?,en,--resume,docs/zh_cn/faq.md,howto,\n", encoding="utf-8")
    run, df, summary, _ = ev.evaluate(load_profile(str(ingested)), questions=qs)
    assert "question a: expected source(s) not in the store: docs/en/gone.md" in caplog.text
    report = (run.path / "report.md").read_text(encoding="utf-8")
    section = report.split("## Expected sources not in the store (1)")[1].split("## Questions")[0]
    assert "| a " in section and "docs/en/gone.md" in section and "| b " not in section
    # A category of the user's own is accepted and grouped like any other.
    assert set(summary["by_category"]) == {"factual", "howto"}
    assert "| howto " in report.split("## Summary")[1].split("##")[0]


def test_an_empty_folder_becomes_a_store_and_a_foreign_one_is_refused(tmp_path, corpus_dir, minilm_path,
                                                                     minilm_embedder):
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus_dir))])
    volume = tmp_path / "volume"
    volume.mkdir()  # pre-created by the user, or a mounted volume: it cannot be replaced, only filled
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=volume, cache=tmp_path / "c")))
    assert ingest(profile, embedder=minilm_embedder).wrote
    assert volume.is_dir() and not volume.is_symlink() and (volume / "current").is_symlink()
    with StoreRetriever(profile, minilm_embedder) as r:
        assert r.retrieve("learning rate", 3)
    assert not ingest(profile, embedder=minilm_embedder).wrote  # and it is a store like any other

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    other = load_profile(str(profile_path := write_profile(tmp_path / "q.toml", embedder=minilm_path, corpus=manifest,
                                                           store=foreign, cache=tmp_path / "c")))
    with pytest.raises(JobError, match=r"folder with other files \(notes\.txt\), not a store written by jobs\.ingest"):
        ingest(other, embedder=minilm_embedder)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and profile_path.is_file()


def test_killed_reader_leaves_no_private_copy_behind(ingested, tmp_path):
    import tempfile

    code = ("import os, sys, time\nfrom jobs.stores import embedded as st\n"
            "from jobs.common.config import load_profile\n"
            f"p = load_profile({str(ingested)!r})\nsnap = st.Snapshot(p.store.path, p.store.collection)\n"
            "print(snap.folder, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.is_dir() and folder.parent == Path(tempfile.gettempdir())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert folder.is_dir()  # what kill -9 leaves
    profile = load_profile(str(ingested))
    with st.Snapshot(profile.store.path, profile.store.collection):
        assert not folder.exists()  # the next reader removes it
