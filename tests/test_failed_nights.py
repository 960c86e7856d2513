"""A night that failed never looks green, and a bad reply never crashes the run: the served backend against a
real HTTP server on 127.0.0.1 (``FakeChatServer``) whose replies each test chooses, with the real store and
embedder behind the eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import ROOT, load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.eval.results import RunDir
from jobs.ingest.job import ingest
from jobs.tools import serve
from tests.conftest import (
    BackgroundEval,
    FakeChatServer,
    eval_profile,
    fake_served_profile,
    ingested_profile,
    many_questions,
)


@pytest.fixture
def served_by_fake(tmp_path, corpus_dir, minilm_path, minilm_embedder, fake_chat_server):
    return ingested_profile(fake_served_profile(tmp_path, corpus_dir, minilm_path, fake_chat_server.base_url),
                            minilm_embedder)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def test_a_night_whose_answers_all_failed_exits_5_says_so_and_is_never_a_baseline(served_by_fake, fake_chat_server,
                                                                                 capsys):
    profile = load_profile(str(served_by_fake))
    reports = profile.eval.reports_dir
    # A healthy night first: the one a failed night must not replace as the baseline.
    assert ev.main(["--profile", str(served_by_fake)]) == 0
    good = _summary(next(reports.glob("*/summary.json")).parent)["run"]["run"]
    capsys.readouterr()

    fake_chat_server.mode = "http500"  # health checks pass, every real request fails
    code = ev.main(["--profile", str(served_by_fake), "--no-cache"])
    out, err = capsys.readouterr()
    assert code == ev.EXIT_FAILED_ANSWERS == 5
    assert "answers: 8 of 8 failed (first: HTTP 500: the model worker crashed (after 2 attempts))" in out
    assert "FAIL: answers: 8 of 8 failed" in err and "will never be a baseline" in err
    failed_run = max((p for p in reports.iterdir() if (p / "summary.json").is_file()), key=lambda p: p.name)
    assert _summary(failed_run)["outcome"] == "failed answers"
    assert _summary(failed_run)["run"]["answers failed"] == 8
    report = (failed_run / "report.md").read_text(encoding="utf-8")
    assert "**This run is no success: 8 of 8 answers failed**" in report.split("## Verdict")[0]  # the very top
    assert "FAILED" in (reports / "latest.md").read_text(encoding="utf-8")  # what the cron line mails
    history = pd.read_csv(reports / "history.csv")
    assert history.set_index("run").loc[failed_run.name, "outcome"] == "failed answers"

    # The next night compares with the last good night, never with the failed one; naming it is refused.
    fake_chat_server.mode = "ok"
    run, _df, _summary_now, comparison = ev.evaluate(profile)
    assert comparison is not None and comparison.baseline == good
    with pytest.raises(JobError, match=rf"--baseline {failed_run.name}: that run is no success \(failed answers\)"):
        ev.main(["--profile", str(served_by_fake), "--baseline", failed_run.name])


def test_failed_answers_within_the_allowed_share_are_counted_but_pass(served_by_fake, fake_chat_server, capsys):
    fake_chat_server.mode = "http500"
    code = ev.main(["--profile", str(served_by_fake), "--set", "eval.max_failed_share=1"])
    out = capsys.readouterr().out
    assert code == 0 and "answers: 8 of 8 failed" in out and "within eval.max_failed_share=1" in out


def test_a_timed_out_request_says_what_was_tried(tmp_path, corpus_dir, minilm_path, minilm_embedder):
    server = FakeChatServer("slow", slow_s=4)
    try:
        path = fake_served_profile(tmp_path, corpus_dir, minilm_path, server.base_url, timeout_s=1)
        profile = load_profile(str(path))
        ingest(profile, embedder=minilm_embedder)
        _run, df, *_ = ev.evaluate(profile, limit=1)
    finally:
        server.stop()
    # The retry budget is llm.timeout_s: a request that used it all was sent once and never retried.
    assert (df["error"] == "timed out: no reply within llm.timeout_s=1s (1 attempt, no retry)").all()


@pytest.mark.parametrize(("mode", "seen"), [
    ("html200", "HTTP 200 text/html '<html><body><h1>502 Bad Gateway</h1>"),
    ("not-json", "'upstream connect error or disconnect/reset before headers'"),
    ("no-choices", '"choices": []'),
])
def test_a_malformed_reply_is_a_failed_answer_not_a_crashed_night(served_by_fake, fake_chat_server, mode, seen,
                                                                  capsys):
    fake_chat_server.mode = mode
    code = ev.main(["--profile", str(served_by_fake)])
    out = capsys.readouterr().out
    assert code == ev.EXIT_FAILED_ANSWERS and "answers: 8 of 8 failed" in out
    run = next(load_profile(str(served_by_fake)).eval.reports_dir.glob("*/summary.json")).parent
    results = pd.read_csv(run / "results.csv", keep_default_na=False)
    assert len(results) == 8 and results["error"].str.startswith("malformed reply from the server: ").all()
    assert results["error"].str.contains(seen, regex=False).all()
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "failed: malformed reply from the server" in report and "<html>" not in report  # escaped


# ---- a night that stops half-way keeps every answer --------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) to fill up; skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_a_full_disk_while_writing_the_report_loses_nothing_and_resume_finishes(tmp_path, corpus_dir, minilm_path,
                                                                               tiny_llm, minilm_embedder, small_disk,
                                                                               capsys):
    path = eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm)
    path.write_text(path.read_text(encoding="utf-8").replace(str(tmp_path / "reports"), str(small_disk / "reports")),
                    encoding="utf-8")
    profile = load_profile(str(path))
    ingest(profile, embedder=minilm_embedder)
    first, *_ = ev.evaluate(profile)  # a baseline night; its answers are cached
    reports = profile.eval.reports_dir
    before = {name: (reports / name).read_bytes() for name in ("history.csv", "latest.md")}
    progress = (first.path / "progress.jsonl").stat().st_size
    # Room for the run folder, its progress log and the corpus file list: not for results, plots and report.
    filler = _fill(small_disk, leave=progress + 3 * 4096)

    with pytest.raises(JobError) as err:
        ev.main(["--profile", str(path)])
    message = str(err.value)
    assert err.value.exit_code == ev.EXIT_STOPPED and "\n" not in message
    assert "No space left on device" in message and "every answer so far is kept in" in message
    assert "--resume" in message
    stopped = next(p for p in reports.iterdir() if p.is_dir() and p != first.path)
    assert len(RunDir(stopped).done()) == 8 and not (stopped / "summary.json").exists()
    assert not [p for p in reports.rglob("*") if ".tmp" in p.name]  # no half-written file left behind
    assert {name: (reports / name).read_bytes() for name in before} == before  # history and latest untouched

    filler.unlink()
    capsys.readouterr()
    assert ev.main(["--profile", str(path), "--resume", stopped.name]) in (0, ev.EXIT_THRESHOLD)
    header = json.loads((stopped / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["answers kept from the interrupted run"] == 8
    assert list(pd.read_csv(reports / "history.csv")["run"]) == [first.run_id, stopped.name]


def test_a_chroma_server_lost_mid_eval_stops_with_exit_4_and_resume_finishes(tmp_path, corpus_dir, minilm_path,
                                                                            minilm_embedder, slow_llm):
    questions = many_questions(tmp_path / "many.csv", 30)
    port = serve.free_port()
    path = eval_profile(tmp_path, corpus_dir, minilm_path, slow_llm, questions=questions, max_new_tokens=48)
    text = path.read_text(encoding="utf-8").replace('collection = "mini_docs"',
                                                    f'collection = "mini_docs"\nurl = "http://127.0.0.1:{port}"')
    path.write_text(text.replace("[llm]\n", "[llm]\nbatch_size = 1\n"), encoding="utf-8")
    profile = load_profile(str(path))
    data = tmp_path / "chroma"
    with serve.chroma_process(data, port, tmp_path / "chroma.log") as (server, _url):
        ingest(profile, embedder=minilm_embedder)
        job = BackgroundEval(path, tmp_path / "eval.log")
        try:
            progress = job.wait_for_answers(tmp_path / "reports", 4)
            assert progress is not None and job.proc.poll() is None, job.output()[-2000:]
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            assert job.wait(timeout_s=300) == ev.EXIT_STOPPED, job.output()[-3000:]
        finally:
            job.stop()
    out = (tmp_path / "eval.log").read_text(encoding="utf-8", errors="replace")
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"lost the Chroma server at http://127.0.0.1:{port}" in errors[0] and "--resume" in errors[0]
    kept = len(RunDir(progress.parent).done())
    assert 4 <= kept < 60 and not (progress.parent / "summary.json").exists()

    with serve.chroma_process(data, port, tmp_path / "chroma.log"):  # back, same data, same URL
        done = subprocess.run([sys.executable, "-m", "jobs.eval", "--profile", str(path), "--resume"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, ev.EXIT_THRESHOLD), done.stderr[-3000:]
    header = json.loads((progress.parent / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["answers kept from the interrupted run"] == kept
