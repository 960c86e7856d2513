"""Files a nightly job finds damaged (its history, its progress log, its answer cache, a profile saved with a BOM,
a question with a control character): each is found before the work it would spoil, named in one line, and
nothing is lost. Real runs: Chroma on disk, MiniLM, a tiny random Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.eval.results import RunDir
from tests.conftest import HEADER


class ModelLoaded(Exception):
    pass


def chattr(path: Path, flag: str) -> bool:
    """``chattr +i`` makes a folder immutable even for root (who ignores permissions); False where not permitted."""
    import subprocess

    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


# ---- history.csv ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [
    pytest.param(lambda text: text + "garbage, a line, that, is, not, a, run, at, all, ,,,,,,,,,,,,,,,,,,,,,\n",
                 id="garbage-line"),
    pytest.param(lambda text: text + '20991231-000000-test,"unterminated\n', id="unterminated-quote"),
    pytest.param(lambda text: "when,what\nyesterday,something\n", id="other-columns"),
])
def test_a_damaged_history_is_moved_aside_and_rebuilt_before_any_model_loads(ingested, monkeypatch, caplog, damage):
    profile = load_profile(str(ingested))
    reports = profile.eval.reports_dir
    first, *_ = ev.evaluate(profile)
    second, *_ = ev.evaluate(profile)
    history = reports / "history.csv"
    good = pd.read_csv(history)
    history.write_text(damage(history.read_text(encoding="utf-8")), encoding="utf-8")

    def no_model(*_args):
        raise ModelLoaded

    monkeypatch.setattr(ev, "load_embedder", no_model)
    with pytest.raises(ModelLoaded):
        ev.main(["--profile", str(ingested)])
    # Found and repaired before the first model loaded: moved aside, named once, rebuilt from the run folders.
    aside = list(reports.glob("history.csv.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text(encoding="utf-8") != good.to_csv(index=False)
    warning = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(warning) == 1 and str(history) in warning[0] and "rebuilt from 2 finished run folder(s)" in warning[0]
    rebuilt = pd.read_csv(history)
    assert list(rebuilt["run"]) == [first.run_id, second.run_id]
    pd.testing.assert_frame_equal(rebuilt[good.columns], good, check_dtype=False)

    monkeypatch.undo()
    third, *_ = ev.evaluate(profile)  # and the night goes on: a report, a history row, latest.md
    assert list(pd.read_csv(history)["run"]) == [first.run_id, second.run_id, third.run_id]
    assert third.run_id in (reports / "latest.md").read_text(encoding="utf-8")


def test_a_history_that_cannot_be_moved_aside_is_refused_naming_the_file(ingested):
    profile = load_profile(str(ingested))
    reports = profile.eval.reports_dir
    ev.evaluate(profile)
    history = reports / "history.csv"
    history.write_text("when,what\n", encoding="utf-8")
    # We run as root, so permissions do not stop a rename: an immutable folder does.
    if not chattr(reports, "+i"):
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(JobError, match=rf"{history} is damaged \(no 'run' column .*\) and could not be moved "
                                           r"aside \(Operation not permitted\): delete or repair it"):
            ev.main(["--profile", str(ingested)])
    finally:
        chattr(reports, "-i")


# ---- progress.jsonl ---------------------------------------------------------------------------------------

def test_resume_keeps_every_sound_progress_record_and_names_what_it_skipped(ingested, caplog):
    profile = load_profile(str(ingested))
    run, df, *_ = ev.evaluate(profile)
    (run.path / "summary.json").unlink()
    lines = (run.path / "progress.jsonl").read_text(encoding="utf-8").splitlines()
    damaged = [lines[0], "{not json at all", lines[1], json.dumps({"mode": "rag", "answer": "no id"}), "[1, 2]",
               *lines[2:], '{"id": "t4", "mode": "ra']  # the last one torn by a kill
    (run.path / "progress.jsonl").write_text("\n".join(damaged), encoding="utf-8")

    kept = RunDir(run.path).done()
    assert len(kept) == 8  # every sound record, the ones after the garbage too
    message = next(r.getMessage() for r in caplog.records if "not answer records" in r.getMessage())
    assert "skipped 3 line(s)" in message and "line 2 (not JSON)" in message
    assert "line 4 (no question id or mode)" in message and "line 5 (not a JSON object)" in message
    assert any("dropping a torn record at the end (line 12" in r.getMessage() for r in caplog.records)
    assert (run.path / "progress.jsonl").read_bytes().endswith(b"\n")  # the torn tail is cut off

    resumed, df2, *_ = ev.evaluate(profile, resume=True)
    header = json.loads((resumed.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["answers kept from the interrupted run"] == 8 and len(df2) == 8


def test_resume_of_a_run_outside_the_reports_folder_is_refused(ingested, tmp_path):
    profile = load_profile(str(ingested))
    run, *_ = ev.evaluate(profile)
    (run.path / "summary.json").unlink()
    elsewhere = tmp_path / "elsewhere" / run.run_id
    elsewhere.parent.mkdir()
    run.path.rename(elsewhere)
    with pytest.raises(JobError, match=rf"--resume {elsewhere}: that run is not in the reports folder "
                                       rf"{profile.eval.reports_dir}; resume it with --reports {elsewhere.parent}"):
        ev.main(["--profile", str(ingested), "--resume", str(elsewhere)])
    assert not (profile.eval.reports_dir / "latest.md").read_text(encoding="utf-8").count(str(elsewhere))
    # With its own reports folder it resumes and finishes there.
    code = ev.main(["--profile", str(ingested), "--reports", str(elsewhere.parent), "--resume", str(elsewhere)])
    assert code in (0, ev.EXIT_THRESHOLD) and (elsewhere / "summary.json").is_file()
    assert (elsewhere.parent / "latest.md").read_text(encoding="utf-8").count(f"({run.run_id}/report.md)") == 1


# ---- the answer cache -------------------------------------------------------------------------------------

def _entries(profile) -> list[Path]:
    return sorted((profile.paths.cache / "generations").rglob("*.json"))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda entry: "{}", id="empty-object"),
    pytest.param(lambda entry: "[]", id="a-list"),
    pytest.param(lambda entry: json.dumps({**entry, "prompt_tokens": "many"}), id="mistyped"),
    pytest.param(lambda entry: json.dumps({**entry, "text": "An answer edited by hand."}), id="edited-text"),
])
def test_a_damaged_or_edited_cache_entry_is_regenerated_never_reused(ingested, damage, caplog):
    profile = load_profile(str(ingested))
    _run, df, *_ = ev.evaluate(profile)
    for path in _entries(profile):
        path.write_text(damage(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
    run, df2, *_ = ev.evaluate(profile)
    assert not df2["cached"].any()  # all 8 regenerated
    assert list(df2["answer"]) == list(df["answer"]) and "edited by hand" not in " ".join(df2["answer"])
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["cache entries regenerated (damaged or edited)"] == 8
    warnings = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1  # said once, not once per entry
    assert ev.evaluate(profile)[1]["cached"].all()  # and the regenerated entries are sound again


def test_a_read_only_cache_folder_costs_the_caching_never_an_answer(ingested, caplog):
    profile = load_profile(str(ingested))
    root = profile.paths.cache / "generations"
    root.mkdir(parents=True)
    if not chattr(root, "+i"):
        pytest.skip("chattr +i is not permitted here")
    try:
        run, df, *_ = ev.evaluate(profile)
    finally:
        chattr(root, "-i")
    assert len(df) == 8 and (df["answer"].str.len() > 0).all() and (df["error"] == "").all()
    assert (run.path / "summary.json").is_file() and not any(root.iterdir())
    said = [r.getMessage() for r in caplog.records if "cannot write the generation cache" in r.getMessage()]
    assert len(said) == 1 and str(root) in said[0]


# ---- profiles and questions -------------------------------------------------------------------------------

def test_a_profile_saved_with_a_bom_loads(ingested, tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + Path(ingested).read_bytes())
    assert load_profile(str(bom)) == load_profile(str(ingested))


@pytest.mark.parametrize(("text", "code"), [("What\x00 is Lumen?", "U+0000"), ("Lumen \x1b[31mred\x1b[0m?", "U+001B"),
                                             ("Lumen\u202e?", "U+202E")])
def test_a_control_character_in_a_question_is_refused_naming_the_row(ingested, tmp_path, text, code):
    qs = tmp_path / "q.csv"
    qs.write_text(HEADER + "a,What is Lumen?,en,Lumen,,howto,\n" + f'b,"{text}",en,Lumen,,howto,\n',
                  encoding="utf-8")
    with pytest.raises(JobError, match=rf"q\.csv:3: question: control character {re.escape(code)} at position"):
        ev.main(["--profile", str(ingested), "--questions", str(qs)])
    assert not load_profile(str(ingested)).eval.reports_dir.exists()
    ok = tmp_path / "ok.csv"  # a pasted error message keeps its lines and tabs
    ok.write_text(HEADER + 'a,"Traceback:\n\tKeyError: x\nWhat now?",en,Lumen,,troubleshooting,\n', encoding="utf-8")
    from jobs.common.questions import load_questions

    assert load_questions(ok).questions[0].question.count("\n") == 2
