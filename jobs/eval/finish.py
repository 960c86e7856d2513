"""After the answers: one function from a run's answers to its finished folder, for a night and a re-report alike.

``finish_run``: score the answers (jobs.eval.scoring.score) → summarise → find the baseline → compare → write
results.csv and results.jsonl, the report, the history row, summary.json (it marks the run finished), and
latest.md. ``jobs.eval.job.evaluate`` calls it with the answers it just recorded; ``python -m jobs.eval.report
RUN`` (``jobs.eval.report.rereport``) with a finished run's answers read back from its results.jsonl, so a
scoring fix applies to old runs when they are re-reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from jobs.common.errors import EXIT_STOPPED, JobError
from jobs.common.files import atomic_write
from jobs.eval.history import Comparison, compare, find_baseline, history_with, load_history, save_history
from jobs.eval.report import write_report, write_summary
from jobs.eval.results import RESULTS, RunDir, point_latest
from jobs.eval.scoring.score import score_answers
from jobs.eval.scoring.summary import metric, summarise_run

LATEST = "latest.md"


def kept(run: RunDir, what: str, fix: str) -> JobError:
    """A run stopped half-way: every answer so far is in its progress file, and ``--resume`` continues it."""
    return JobError(f"{what}: every answer so far is kept in {run.path}; {fix}, then run the eval again with "
                    f"`--resume {run.run_id}` to finish it without asking them again", exit_code=EXIT_STOPPED)


def headline(summary: dict, header: dict | None = None) -> str:
    def f(key: str) -> str:
        v = metric(summary, key)
        return "–" if v is None else f"{v:.2f}"

    failed = "" if summary.get("outcome", "ok") == "ok" else \
        f"**FAILED: {(header or {}).get('answers failed', '?')} answers failed; not a baseline.** "
    return (f"{failed}keyword hit bare {f('bare.keyword_hit_rate')} → RAG {f('rag.keyword_hit_rate')} "
            f"(gain {f('gain.keyword_hit_rate')}; {f('rag.strict_keyword_hit_rate')} not crediting passage dumps, "
            f"{f('rag.passage_dump')} of RAG answers); hit@5 {f('rag.hit_at_5')}, MRR {f('rag.mrr')}; "
            f"abstention on negatives bare {f('bare.abstention')} / RAG {f('rag.abstention')}")


def latest_is(reports_dir: Path, run: RunDir) -> bool:
    """Whether latest.md points to ``run`` (a re-report refreshes it then, and never points it elsewhere)."""
    try:
        return f"({run.run_id}/report.md)" in (reports_dir / LATEST).read_text(encoding="utf-8")
    except OSError:
        return False


def _history(reports_dir: Path, run: RunDir, header: dict, summary: dict) -> pd.DataFrame:
    """The history table with this run's row; a run already in it (re-reported) keeps its place."""
    table = history_with(reports_dir, run, header, summary)  # this run's row last
    old = load_history(reports_dir)
    if old.empty or run.run_id not in set(old["run"]):
        return table
    at = list(old["run"]).index(run.run_id)
    rest = table.iloc[:-1]
    return pd.concat([rest.iloc[:at], table.iloc[[-1]], rest.iloc[at:]], ignore_index=True)


def finish_run(run: RunDir, header: dict, answers: pd.DataFrame, *, abstain_phrases: tuple[str, ...],
               outcome: str, baseline: str | None = None, reports_dir: Path | None = None, latest: bool = True,
               again: str | None = None) -> tuple[pd.DataFrame, dict, Comparison | None]:
    """Score ``answers`` (one row per question and mode, as recorded), summarise them, compare them with the
    baseline (``baseline``, or the newest earlier comparable run), and write the run's outputs: results, the
    report, the history row, then summary.json (it marks the run finished) and, with ``latest``, latest.md.
    ``outcome`` is how the night went ("ok", or why it is no success): kept as given, never re-judged here.

    A write that fails (a full disk) stops with exit 4 and every answer kept: ``--resume`` finishes a night;
    ``again`` says what finishes a re-report. Returns (scored results, summary, comparison or None)."""
    reports_dir = reports_dir if reports_dir is not None else run.path.parent
    df = score_answers(answers, abstain_phrases)
    summary = summarise_run(df)
    summary["outcome"] = outcome
    base = find_baseline(reports_dir, run, baseline)
    comparison = compare(header, df, run, base) if base else None
    try:
        atomic_write(run.path / "results.csv", df.to_csv(index=False))
        atomic_write(run.path / RESULTS,
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict(orient="records")))
        history = _history(reports_dir, run, header, summary)
        write_report(run, header, df, summary, comparison, history)
        save_history(reports_dir, history)
        write_summary(run, header, summary)
        if latest:
            point_latest(reports_dir, run, headline(summary, header))
    except OSError as exc:
        what = f"could not write the run's outputs ({exc.strerror or exc}: {exc.filename})"
        fix = "free some space (or make the folder writable)"
        if again is None:
            raise kept(run, what, fix) from None
        raise JobError(f"{what}: the run's answers are untouched in {run.path}; {fix}, then {again}",
                       exit_code=EXIT_STOPPED) from None
    return df, summary, comparison
