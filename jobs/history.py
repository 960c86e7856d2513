"""Run history: the history table, the baseline run, and what changed since it.

A run compares with the newest earlier finished run over the same question file (or ``--baseline``),
says which settings differ, gives each metric's change per category and overall with its interval and a
paired test (jobs.scoring.statistics), says whether the night is a real regression, lists each question
that went from pass to fail (regressions) or back (fixed), and, when the corpus commit moved, what the
docs update touched (jobs.drift). Pass = all expected keywords found, or for a negative question, an
abstention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from jobs.config import setting_defaults
from jobs.drift import DocsChange, docs_change
from jobs.errors import JobError
from jobs.files import atomic_write
from jobs.results import RUN_INFO, SUMMARY, RunDir, format_sources
from jobs.scoring import copying
from jobs.scoring import statistics as stats
from jobs.scoring.summary import LOWER_BETTER, METRICS, OVERALL, metric

HISTORY = "history.csv"
# (column, metric key) of the headline numbers kept per run.
HEADLINE = (
    ("bare_keyword_hit", "bare.keyword_hit_rate"),
    ("rag_keyword_hit", "rag.keyword_hit_rate"),
    ("rag_strict_keyword_hit", "rag.strict_keyword_hit_rate"),
    ("rag_passage_dumps", "rag.passage_dump"),
    ("rag_gain", "gain.keyword_hit_rate"),
    ("rag_all_keywords", "rag.all_keywords_hit"),
    ("rag_hit_at_5", "rag.hit_at_5"),
    ("rag_mrr", "rag.mrr"),
    ("rag_abstention", "rag.abstention"),
)
DELTA_METRICS = ("keyword_hit_rate", "strict_keyword_hit_rate", "passage_dump", "passed", "abstention", "hit_at_1",
                 "hit_at_5", "mrr")
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
                "paths.cache", "store.path", "store.url", "store.lease_s", "store.auth_token_env")


def append_history(reports_dir: Path, run: RunDir, header: dict, summary: dict) -> pd.DataFrame:
    row = {"run": run.run_id, "finished": header.get("finished"), "profile": header.get("profile"),
           "llm": header.get("llm"), "embedder": header.get("embedder"),
           "corpus_commit": str(header.get("corpus_commit", ""))[:12],
           "questions_sha256": run.info().get("questions_sha256", "")[:12],
           "n": summary[OVERALL]["rag"]["n"], "wall_s": header.get("wall_s"),
           "cached_answers": header.get("answers from cache")}
    row.update({col: metric(summary, key) for col, key in HEADLINE})
    path = reports_dir / HISTORY
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not old.empty:
        old = old[old["run"] != run.run_id]  # a resumed run replaces its row
    table = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
    atomic_write(path, table.to_csv(index=False))
    return table


def named_baseline(reports_dir: Path, name: str) -> RunDir:
    """``--baseline RUN``: a finished run (checked before anything loads or is written)."""
    path = Path(name) if Path(name).is_dir() else reports_dir / name
    if not (path / RUN_INFO).is_file():
        raise JobError(f"--baseline {name}: no such run in {reports_dir}")
    if not (path / SUMMARY).is_file():
        raise JobError(f"--baseline {name}: that run did not finish (no {SUMMARY} in {path}); "
                       "pick a finished run or resume it first")
    return RunDir(path)


def find_baseline(reports_dir: Path, current: RunDir, explicit: str | None) -> RunDir | None:
    if explicit:
        return named_baseline(reports_dir, explicit)
    # The newest earlier finished run over the same questions, preferring the same profile (last
    # night's run of this job) over another profile's run (then the report says what differs).
    # Ordered by start time, not by folder name: names of runs started within one second sort by
    # profile, not by age.
    me = current.info()
    candidates = []
    for path in reports_dir.iterdir():
        if path == current.path or not (path / SUMMARY).is_file():
            continue
        info = json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
        started = str(info.get("started_at", ""))
        if started < str(me.get("started_at", "")) and info.get("questions_sha256") == me.get("questions_sha256"):
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

    def regression(self) -> tuple[bool, str]:
        """Whether the night is a real regression: a headline number got significantly worse (dropped, or
        for passage dumps, rose)."""
        drops = [c for mode, metric in VERDICT_METRICS
                 if (c := stats.find(self.changes, metric, mode)) is not None and c.significant
                 and (c.delta > 0 if metric in LOWER_BETTER else c.delta < 0)]
        if drops:
            return True, "real regression: " + "; ".join(f"{c.mode} {c.metric} {c.describe()}" for c in drops)
        n = int(self.now[self.now["mode"] == "rag"]["id"].nunique())
        detectable = stats.smallest_detectable(n)
        floor = (f"; on {n} questions a pass rate must move by at least {detectable:.2f} "
                 f"({stats.min_same_way()} questions the same way) to be significant") if detectable else \
            f"; {n} questions are too few for any change to be significant"
        return False, (f"no significant regression: {len(self.regressions)} question(s) regressed and "
                       f"{len(self.fixed)} fixed, within noise{floor}")


# Headline numbers whose significant drop makes a night a real regression.
VERDICT_METRICS = (("rag", "keyword_hit_rate"), ("rag", "strict_keyword_hit_rate"), ("rag", "passage_dump"),
                   ("rag", "passed"), ("gain", "keyword_hit_rate"), ("rag", "abstention"), ("rag", "hit_at_5"),
                   ("rag", "mrr"))


def compare(header: dict, df: pd.DataFrame, current: RunDir, baseline: RunDir) -> Comparison:
    base_summary = json.loads((baseline.path / SUMMARY).read_text(encoding="utf-8"))
    base_header = base_summary.get("run", {})
    # Scored again from its answers: a baseline from before a score existed is compared on it all the same.
    base_df = copying.annotate(pd.read_json(baseline.path / "results.jsonl", lines=True, dtype=False))
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
