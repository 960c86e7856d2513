"""The eval job end to end on real parts: Chroma store, MiniLM embedder, a tiny random Llama (plumbing)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest

from jobs.common.config import ROOT, load_profile
from jobs.common.errors import JobError
from jobs.eval.job import evaluate, main
from jobs.eval.report import escape_cell
from jobs.ingest.job import ingest
from tests.conftest import HEADER, BackgroundEval, eval_profile, many_questions


def test_end_to_end_report_numbers_match_results_csv(ingested):
    profile = load_profile(str(ingested))
    run, df, summary, _ = evaluate(profile)
    results = pd.read_csv(run.path / "results.csv")
    assert len(results) == 8 and set(results["mode"]) == {"bare", "rag"}
    assert results.groupby("id")["mode"].nunique().eq(2).all()
    for col in ("id", "category", "mode", "keyword_hit_rate", "all_keywords_hit", "abstained", "hit_at_5", "mrr",
                "answer", "retrieve_s", "generate_s", "prompt_tokens", "answer_tokens"):
        assert col in results.columns

    rag = results[results["mode"] == "rag"]
    assert summary["overall"]["rag"]["hit_at_5"] == pytest.approx(rag["hit_at_5"].mean())
    assert summary["overall"]["rag"]["mrr"] == pytest.approx(rag["mrr"].mean())
    for mode in ("bare", "rag"):
        rows = results[results["mode"] == mode]
        assert summary["overall"][mode]["keyword_hit_rate"] == pytest.approx(rows["keyword_hit_rate"].mean())
        eng = rows[rows["category"] == "english"]
        assert summary["by_category"]["english"][mode]["keyword_hit_rate"] == pytest.approx(
            eng["keyword_hit_rate"].mean())
    assert rag["mrr"].mean() > 0.5  # MiniLM finds most fixture sources
    assert results[results["mode"] == "bare"]["hit_at_5"].isna().all()

    report = (run.path / "report.md").read_text(encoding="utf-8")
    for heading in ("## Verdict", "## Summary: bare vs RAG", "### Retrieval (RAG)", "## Latency", "## Questions",
                    "## Run"):
        assert heading in report

    def overall_cells(section: str) -> dict[str, str]:
        """The overall row of the first table under a heading, by column."""
        lines = report.split(section, 1)[1].splitlines()
        overall = next(line for line in lines if line.startswith("| **overall**"))
        header = next(line for line in reversed(lines[:lines.index(overall)]) if line.startswith("| category"))
        return dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (header, overall))))

    # Answer scores and retrieval scores: two tables that each fit a screen.
    cells = {**overall_cells("## Summary: bare vs RAG"), **overall_cells("### Retrieval (RAG)")}
    # Each number with its 95% interval over questions: "0.48 (0.36–0.60)", the interval around the number.
    shown = [cells[c] for c in ("keyword hit (RAG)", "keyword hit, dumps not credited (RAG)", "passage dumps (RAG)",
                                "hit@5", "MRR")]
    point = [float(c.split()[0]) for c in shown]
    assert point == [pytest.approx(v, abs=0.005) for v in (
        summary["overall"]["rag"]["keyword_hit_rate"], summary["overall"]["rag"]["strict_keyword_hit_rate"],
        summary["overall"]["rag"]["passage_dump"], rag["hit_at_5"].mean(), rag["mrr"].mean())]
    # The strict score never credits more than the plain one, and says how many answers it judged.
    assert point[1] <= point[0] + 0.005 and "## Answers that copy their passages" in report
    assert results[results["mode"] == "rag"]["passage_dump"].notna().all()
    for cell in shown:
        low, high = (float(x.strip("\u2060")) for x in cell.split("(")[1].rstrip(")").split("–"))  # word joiner
        assert low <= float(cell.split()[0]) <= high
    for qid in ("t1", "t2", "t3", "t4"):
        assert f"| {qid} " in report
    latest = (run.path.parent / "latest.md").read_text(encoding="utf-8")
    assert f"{run.run_id}/report.md" in latest
    saved = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))
    assert saved["overall"]["rag"]["mrr"] == pytest.approx(summary["overall"]["rag"]["mrr"])
    assert saved["run"]["llm_device"] == "cpu" and saved["run"]["corpus_commit"].startswith("folder-")


def test_bad_questions_fail_before_any_model_loads(tmp_path, ingested):
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "a,,zh,x,,factual,\na,Q?,fr,x,,trivia!,\n", encoding="utf-8")
    with pytest.raises(JobError) as err:
        evaluate(load_profile(str(ingested)), questions=bad)
    lines = str(err.value).splitlines()
    assert f"{bad}:2: question: empty" in lines
    assert any(f"{bad}:3: id: duplicate 'a' (first on row 2)" == x for x in lines)
    assert any(x.startswith(f"{bad}:3: category: 'trivia!': a name of 1-40 letters") for x in lines)
    assert any(x.startswith(f"{bad}:3: language: 'fr'") for x in lines)
    assert not (tmp_path / "reports").exists()


def test_missing_store_says_run_ingest(tmp_path, corpus_dir, minilm_path, tiny_llm):
    profile = load_profile(str(eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm)))
    with pytest.raises(JobError, match="run `make ingest`"):
        evaluate(profile)


def test_fail_under_exits_3_and_still_writes_the_report(ingested, capsys):
    code = main(["--profile", str(ingested), "--fail-under", "rag.hit_at_5=1.01",
                 "--fail-under", "rag.mrr=0.0"])
    assert code == 3
    err = capsys.readouterr().err
    assert "FAIL: rag.hit_at_5" in err and "rag.mrr" not in err
    reports = load_profile(str(ingested)).eval.reports_dir
    assert len(list(reports.glob("*/report.md"))) == 1
    with pytest.raises(JobError, match="METRIC one of"):
        main(["--profile", str(ingested), "--fail-under", "rag.accuracy=0.5"])


def test_resume_after_kill_does_each_question_once(tmp_path, corpus_dir, minilm_path, minilm_embedder, slow_llm):
    # Enough work to be killed in the middle: 30 questions, a slower (still tiny) model.
    questions = many_questions(tmp_path / "many.csv", 30)
    prof = eval_profile(tmp_path, corpus_dir, minilm_path, slow_llm, questions=questions, max_new_tokens=48)
    ingest(load_profile(str(prof)), embedder=minilm_embedder)

    cmd = [sys.executable, "-m", "jobs.eval", "--profile", str(prof)]
    job = BackgroundEval(prof, tmp_path / "eval.log")
    try:
        progress = job.wait_for_answers(tmp_path / "reports", 5)
        assert job.proc.poll() is None, "the run finished before it could be killed"
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
    finally:
        job.stop()
    done_before = progress.read_bytes().count(b"\n")
    assert 5 <= done_before < 60 and not (progress.parent / "summary.json").exists()

    out = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = pd.read_csv(progress.parent / "results.csv")
    assert len(results) == 60 and not results.duplicated(["id", "mode"]).any()
    lines = [json.loads(x) for x in progress.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 60 and len({(x["id"], x["mode"]) for x in lines}) == 60
    assert len(list((tmp_path / "reports").glob("*/summary.json"))) == 1  # resumed, not restarted


def test_escape_cell_keeps_tables_intact():
    nasty = "a | b\nline two\r\n```python\nx = 1 | 2\n```\n<script>alert(1)</script> & `code`"
    cell = escape_cell(nasty)
    assert "\n" not in cell and "\r" not in cell
    assert "<script>" not in cell and "&lt;script&gt;" in cell
    assert cell.count("|") == cell.count("\\|") == 2
    table = pd.DataFrame([{"answer": nasty, "n": 1}])
    from jobs.eval.report import _table

    md = _table(table).splitlines()
    # Split on unescaped pipes: every row (header, rule, data) has exactly the table's 2 cells.
    assert len(md) == 3 and [len(re.split(r"(?<!\\)\|", line)) for line in md] == [4, 4, 4]


def test_run_table_shows_unset_values_as_a_dash():
    from jobs.eval.report import header_table

    table = header_table({"llm_revision": "", "seed": 0, "llm_device": None, "profile": "offline"})
    assert table["value"].tolist() == ["–", 0, "–", "offline"]
