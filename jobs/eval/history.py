"""Run history: the history table, the baseline run, and what changed since it.

A run compares with the newest earlier finished run over the same question file (or ``--baseline``),
says which settings differ, gives each metric's change per category and overall with its interval and a
paired test (jobs.eval.scoring.statistics), says whether the night is a real regression, lists each question
that went from pass to fail (regressions) or back (fixed), and, when the corpus commit moved, what the
docs update touched (jobs.eval.drift). Pass = all expected keywords found, or for a negative question, an
abstention.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from jobs.common.config import setting_defaults
from jobs.common.errors import JobError
from jobs.common.files import atomic_write
from jobs.eval.drift import DocsChange, docs_change
from jobs.eval.results import RUN_INFO, SUMMARY, RunDir, format_sources
from jobs.eval.scoring import metrics as M
from jobs.eval.scoring import statistics as stats
from jobs.eval.scoring.score import abstain_phrases, score_answers
from jobs.eval.scoring.summary import METRICS, OVERALL, metric

log = logging.getLogger(__name__)

HISTORY = "history.csv"
# (column, metric key) of the headline numbers kept per run (jobs.eval.scoring.metrics, ``history``).
HEADLINE = M.history_columns()
# The metrics whose change since the baseline is tested and shown.
DELTA_METRICS = M.names(between_runs=True)
# Settings whose change explains a change in results; named in the report when they differ.
COMPARED = ("profile", "llm", "llm_revision", "llm_dtype", "llm_device", "embedder", "retrieval", "corpus_commit",
            "prompt_version", "max_new_tokens", "store")
# Profile settings (run.json) the header above already names, or that change neither an answer nor a
# score (speed, paths, timeouts; serve.* is how a local model server runs, its model named by llm); every
# other setting that differs is named too: a changed system prompt or abstention phrase moves results as
# surely as a changed model.
NOT_COMPARED = ("profile", "llm.model", "llm.revision", "llm.dtype", "llm.device", "llm.max_new_tokens",
                "llm.batch_size", "llm.max_batch_tokens", "llm.concurrency", "llm.timeout_s", "llm.max_retries",
                "llm.api_key_env", "embedder.model", "embedder.batch_size", "eval.reports_dir", "eval.questions",
                "eval.max_failed_share",
                "paths.cache", "store.path", "store.url", "store.lease_s", "store.auth_token_env")


# A run folder's name: the UTC time it started, then the profile (jobs.eval.results.RunDir.create).
_RUN_ID = re.compile(r"^\d{8}-\d{6}-\S+$")


def run_outcome(summary: dict) -> str:
    """"ok", or why a finished run is no success and must never be a baseline (its answers failed). Runs from
    before the outcome was recorded count as failed only when every answer failed."""
    if "outcome" in summary:
        return str(summary["outcome"])
    header = summary.get("run", {})
    failed, total = int(header.get("answers failed") or 0), 2 * int(summary.get(OVERALL, {}).get("rag", {})
                                                                     .get("n") or 0)
    return "failed answers" if total and failed >= total else "ok"


def history_row(run_id: str, header: dict, info: dict, summary: dict) -> dict:
    row = {"run": run_id, "finished": header.get("finished"), "profile": header.get("profile"),
           "llm": header.get("llm"), "embedder": header.get("embedder"),
           "corpus_commit": str(header.get("corpus_commit", ""))[:12],
           "questions_sha256": str(info.get("questions_sha256", ""))[:12],
           "n": summary[OVERALL]["rag"]["n"], "wall_s": header.get("wall_s"),
           "cached_answers": header.get("answers from cache"), "outcome": run_outcome(summary)}
    row.update({col: metric(summary, key) for col, key in HEADLINE})
    return row


def history_with(reports_dir: Path, run: RunDir, header: dict, summary: dict) -> pd.DataFrame:
    """The history table with this run's row (a resumed run replaces its own), not yet written."""
    old = load_history(reports_dir)
    if not old.empty:
        old = old[old["run"] != run.run_id]
    return pd.concat([old, pd.DataFrame([history_row(run.run_id, header, run.info(), summary)])], ignore_index=True)


def save_history(reports_dir: Path, table: pd.DataFrame) -> None:
    atomic_write(reports_dir / HISTORY, table.to_csv(index=False))


def _damage(table: pd.DataFrame) -> str:
    """What is wrong with a history table read from disk ("" when nothing)."""
    if "run" not in table.columns:
        return f"no 'run' column (columns: {', '.join(map(str, table.columns[:8]))})"
    for i, run in enumerate(table["run"], start=2):
        if not isinstance(run, str) or not _RUN_ID.match(run):
            return f"line {i}: {str(run)[:40]!r} is not a run name"
    for col, _key in HEADLINE:
        if col in table.columns:
            values = table[col]
            numbers = pd.to_numeric(values, errors="coerce")
            bad = values.notna() & numbers.isna()
            if bad.any():
                return f"line {int(bad.idxmax()) + 2}: {col}={str(values[bad.idxmax()])[:40]!r} is not a number"
    return ""


def rebuild_history(reports_dir: Path) -> pd.DataFrame:
    """The history table from the run folders themselves (each finished run keeps its summary.json)."""
    rows = []
    for path in sorted(p for p in reports_dir.iterdir() if (p / SUMMARY).is_file()):
        try:
            summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
            info = json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
            rows.append((str(info.get("started_at", "")), history_row(path.name, summary["run"], info, summary)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("history: run folder %s left out (%s)", path, exc)
    return pd.DataFrame([row for _, row in sorted(rows, key=lambda r: r[0])])


def load_history(reports_dir: Path) -> pd.DataFrame:
    """The history table. Checked whenever it is read (first before any model loads): a damaged one (a garbage
    line, an unterminated quote, other columns) is moved aside, named in one warning, and rebuilt from the
    run folders; if it cannot be moved, the run stops with one line naming the file."""
    path = reports_dir / HISTORY
    if not path.is_file():
        return pd.DataFrame()
    try:
        table = pd.read_csv(path)
        problem = _damage(table)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        table, problem = pd.DataFrame(), str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not problem:
        return table
    aside = path.with_name(f"{HISTORY}.damaged-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, aside)
        table = rebuild_history(reports_dir)
        atomic_write(path, table.to_csv(index=False))
    except OSError as exc:
        raise JobError(f"{path} is damaged ({problem}) and could not be moved aside ({exc.strerror or exc}): "
                       "delete or repair it; it is rebuilt from the run folders") from None
    log.warning("%s was damaged (%s): moved aside to %s and rebuilt from %d finished run folder(s)", path, problem,
                aside.name, len(table))
    return table


def named_baseline(reports_dir: Path, name: str) -> RunDir:
    """``--baseline RUN``: a finished run (checked before anything loads or is written)."""
    path = Path(name) if Path(name).is_dir() else reports_dir / name
    if not (path / RUN_INFO).is_file():
        raise JobError(f"--baseline {name}: no such run in {reports_dir}")
    if not (path / SUMMARY).is_file():
        raise JobError(f"--baseline {name}: that run did not finish (no {SUMMARY} in {path}); "
                       "pick a finished run or resume it first")
    outcome = run_outcome(_read_summary(path))
    if outcome != "ok":
        raise JobError(f"--baseline {name}: that run is no success ({outcome}): its numbers measure the failure, "
                       "not the model; pick another run")
    return RunDir(path)


def _read_summary(path: Path) -> dict:
    try:
        return json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"outcome": "unreadable summary.json"}


def find_baseline(reports_dir: Path, current: RunDir, explicit: str | None) -> RunDir | None:
    if explicit:
        return named_baseline(reports_dir, explicit)
    # The newest earlier finished run over the same questions, preferring the same profile (last
    # night's run of this job) over another profile's run (then the report says what differs).
    # Ordered by start time, not by folder name: names of runs started within one second sort by
    # profile, not by age. A run whose answers failed is never a baseline.
    me = current.info()
    candidates = []
    for path in reports_dir.iterdir():
        if path == current.path or not (path / SUMMARY).is_file():
            continue
        info = json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
        started = str(info.get("started_at", ""))
        if started < str(me.get("started_at", "")) and info.get("questions_sha256") == me.get("questions_sha256") \
                and run_outcome(_read_summary(path)) == "ok":
            candidates.append((info.get("profile") != me.get("profile"), started, path))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[1], reverse=True)  # newest first (ISO UTC timestamps sort as text)
    candidates.sort(key=lambda c: c[0])  # stable: this profile's runs before other profiles'
    return RunDir(candidates[0][2])


@dataclass
class Comparison:
    """Tonight against the baseline run, paired question by question."""

    baseline: str
    differences: list[str]
    changes: list[stats.Change]  # per group, mode and metric, with interval and paired test
    regressions: pd.DataFrame
    fixed: pd.DataFrame
    summary: dict  # the baseline's
    now: pd.DataFrame
    then: pd.DataFrame
    docs: DocsChange | None

    def change_of(self, mode: str, metric: str, group: str = OVERALL) -> stats.Change | None:
        """The paired change of one metric (computed on demand for metrics outside the report's table)."""
        found = stats.find(self.changes, metric, mode, group)
        if found is None and metric in METRICS and not (mode != "rag" and metric in stats.RAG_ONLY):
            now = self.now if group == OVERALL else self.now[self.now["category"] == group]
            then = self.then if group == OVERALL else self.then[self.then["category"] == group]
            found = stats.compare(stats.mode_values(now, mode, metric), stats.mode_values(then, mode, metric),
                                  group=group, metric=metric, mode=mode)
        return found

    @property
    def deltas(self) -> pd.DataFrame:
        """Now minus then, one row per (category, mode), one column per metric."""
        rows: dict[tuple[str, str], dict] = {}
        for c in self.changes:
            rows.setdefault((c.group, c.mode), {"category": c.group, "mode": c.mode})[c.metric] = c.delta
        return pd.DataFrame(list(rows.values()))

    def regression(self, *, floor: bool = True) -> tuple[bool, str]:
        """Whether the night is a real regression: a headline number got significantly worse (dropped, or
        for passage dumps, rose). ``floor``: a night within noise says how large a change the questions can
        detect (the report's verdict says so on a line of its own)."""
        drops = [c for mode, metric in VERDICT_METRICS
                 if (c := stats.find(self.changes, metric, mode)) is not None and c.significant
                 and M.get(metric).worse(c.delta)]
        if drops:
            return True, "real regression: " + "; ".join(f"{c.mode} {c.metric} {c.describe()}" for c in drops)
        n = int(self.now[self.now["mode"] == "rag"]["id"].nunique())
        detectable = stats.smallest_detectable(n)
        detail = (f"; on {n} questions a pass rate must move by at least {detectable:.2f} "
                  f"({stats.min_same_way()} questions the same way) to be significant") if detectable else \
            f"; {n} questions are too few for any change to be significant"
        return False, (f"no significant regression: {len(self.regressions)} question(s) regressed and "
                       f"{len(self.fixed)} fixed, within noise{detail if floor else ''}")


# (mode, metric) of the headline numbers whose significant drop (for passage dumps: rise) makes a night a
# real regression (jobs.eval.scoring.metrics, ``verdict``).
VERDICT_METRICS = M.verdict_metrics()


def compare(header: dict, df: pd.DataFrame, current: RunDir, baseline: RunDir) -> Comparison:
    base_summary = json.loads((baseline.path / SUMMARY).read_text(encoding="utf-8"))
    base_header = base_summary.get("run", {})
    # Scored again from its answers through the same stage as tonight's (jobs.eval.scoring.score, with its own
    # abstain phrases): a baseline from before a score existed, or a scoring fix, is compared on it all the same.
    base_df = score_answers(baseline.results(), abstain_phrases(baseline.info()))
    differences = [f"{k}: {base_header.get(k)!s} → {header.get(k)!s}" for k in COMPARED
                   if str(base_header.get(k)) != str(header.get(k))]
    now_config, then_config = current.info().get("config", {}), baseline.info().get("config", {})
    # A setting added since the baseline ran had its default then: named only if it has left it.
    defaults = setting_defaults()
    for k, now in now_config.items():
        if k in NOT_COMPARED or k.startswith("serve.") or (k not in then_config and k not in defaults):
            continue
        then = then_config.get(k, defaults.get(k))
        if now != then:
            differences.append(f"{k}: {then!r}{'' if k in then_config else ' (its default; not a setting then)'} "
                               f"→ {now!r}")
    changes = stats.between_runs(df, base_df, DELTA_METRICS)

    before = base_df.set_index(["id", "mode"])
    flips = []
    for _, r in df.iterrows():
        key = (r["id"], r["mode"])
        if key not in before.index:
            continue
        b = before.loc[key]
        was, now = stats.passed(b), stats.passed(r)
        if was != now:
            flips.append({"kind": "fixed" if now else "regression", "id": r["id"], "mode": r["mode"],
                          "category": r["category"], "question": r["question"],
                          "answer before": b["answer"], "answer now": r["answer"],
                          "sources before": format_sources(b.get("retrieved")),
                          "sources now": format_sources(r.get("retrieved"))})
    flips_df = pd.DataFrame(flips, columns=["kind", "id", "mode", "category", "question", "answer before",
                                            "answer now", "sources before", "sources now"])
    regressions = flips_df[flips_df["kind"] == "regression"].drop(columns="kind")
    fixed = flips_df[flips_df["kind"] == "fixed"].drop(columns="kind")
    docs = docs_change(current.path, baseline.path, df, base_df)
    return Comparison(baseline.run_id, differences, changes, regressions, fixed, base_summary, df, base_df, docs)
