"""How sure each number is: bootstrap intervals over questions, and paired tests between modes and runs.

With a few dozen questions one question moves a rate by several points, so every headline number comes
with a 95% interval, and every comparison (RAG against bare, tonight against the baseline run) with a
paired test on the very same questions:

- intervals: scipy's percentile bootstrap of the mean over questions (10,000 resamples, fixed seed), paired
  (the same resampled questions in both modes) for RAG minus bare. An interval is widened to contain its
  own point estimate where resampling puts the estimate a hair outside, and not given for fewer than
  2 questions.
- tests: exact McNemar (a binomial test on the questions that flipped) for pass/fail metrics, the
  Wilcoxon signed-rank test for per-question rates (keyword hit rate, MRR). Significant means p < 0.05.
- the smallest detectable change: a paired test can only reach p < 0.05 once enough questions move the
  same way (6, with none moving back); on N questions that is a change of 6/N in a pass rate.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from jobs.common.questions import NEGATIVE
from jobs.eval.scoring import metrics as M

ALPHA = 0.05
CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
# From the metric table (jobs.eval.scoring.metrics): metrics whose per-question value is 0 or 1 (exact
# McNemar), rates in [0, 1] (Wilcoxon signed-rank, like seconds and tokens), and those of RAG answers only.
BINARY = M.names(per_question=M.BINARY)
RATES = M.names(per_question=M.RATE)
RAG_ONLY = M.names(rag_only=True)


def passed(row: pd.Series) -> bool:
    """A question passes when all expected keywords are in the answer, or (negative) it abstained."""
    if row["category"] == NEGATIVE:
        return bool(row["abstained"])
    value = row["all_keywords_hit"]
    return bool(value) and not pd.isna(value)


def per_question(df: pd.DataFrame, mode: str, metric: str) -> pd.Series:
    """One value per question id for a mode, only where the metric is defined (e.g. abstention: negatives)."""
    rows = df[df["mode"] == mode].set_index("id")
    if metric == "passed":
        scored = rows[(rows["category"] == NEGATIVE) | rows["expected_keywords"].fillna("").astype(str).ne("")]
        return scored.apply(passed, axis=1).astype(float)
    if metric == "abstention":
        return rows.loc[rows["category"] == NEGATIVE, "abstained"].astype(float)
    if metric not in rows:
        return pd.Series(dtype=float)
    return pd.to_numeric(rows[metric], errors="coerce").dropna().astype(float)


def gain_per_question(df: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """RAG and bare values of the questions both modes define, aligned."""
    rag, bare = per_question(df, "rag", metric), per_question(df, "bare", metric)
    common = rag.index.intersection(bare.index, sort=False)
    return rag.loc[common], bare.loc[common]


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, point: float) -> tuple[float, float] | None:
    if len(data[0]) < 2:
        return None
    if all(np.all(d == d[0]) for d in data):
        return (point, point)  # no spread to resample (scipy would warn and return nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples of tiny categories
        res = stats.bootstrap(data, statistic, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                              method="percentile", paired=len(data) > 1, vectorized=True,
                              rng=np.random.default_rng(SEED))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(lo) or math.isnan(hi):
        return None
    return (min(lo, point), max(hi, point))


def interval(values: pd.Series | np.ndarray) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean over questions; None for fewer than 2."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return None
    return _bootstrap((x,), lambda a, axis: np.mean(a, axis=axis), float(x.mean()))


def paired_interval(a: pd.Series | np.ndarray, b: pd.Series | np.ndarray) -> tuple[float, float] | None:
    """95% paired bootstrap interval of mean(a) - mean(b): the same resampled questions on both sides."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) == 0:
        return None
    return _bootstrap((x, y), lambda a, b, axis: np.mean(a - b, axis=axis), float(x.mean() - y.mean()))


def paired_p(a: pd.Series | np.ndarray, b: pd.Series | np.ndarray, binary: bool) -> float:
    """Two-sided p of a paired difference: exact McNemar for 0/1 outcomes, Wilcoxon signed-rank for rates."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = x - y
    if not np.any(diff):
        return 1.0
    if binary:
        up, down = int(np.sum(diff > 0)), int(np.sum(diff < 0))
        return float(stats.binomtest(up, up + down, 0.5).pvalue)
    # Questions that did not move carry no information (Wilcoxon's own treatment of zeros); dropping them
    # here keeps scipy on the exact distribution where it can use it.
    moved = diff != 0
    return float(stats.wilcoxon(x[moved], y[moved], alternative="two-sided").pvalue)


@functools.lru_cache(maxsize=8)
def min_same_way(alpha: float = ALPHA) -> int:
    """The fewest questions that must all move the same way (none back) for the exact test to reach alpha;
    the signed-rank test needs as many when every difference has the same sign."""
    k = 1
    while stats.binomtest(k, k, 0.5).pvalue >= alpha:
        k += 1
    return k


def smallest_detectable(n: int, alpha: float = ALPHA) -> float | None:
    """The smallest change in a pass rate over ``n`` questions that can be significant."""
    k = min_same_way(alpha)
    return None if n < k else k / n


@dataclass(frozen=True)
class Change:
    """One metric compared between two paired sets of answers (RAG vs bare, or tonight vs baseline)."""

    group: str  # a category, or "overall"
    metric: str
    mode: str  # bare, rag or gain
    n: int  # questions measured in both
    now: float
    then: float
    delta: float
    low: float | None
    high: float | None
    p: float
    test: str

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def describe(self) -> str:
        ci = f" (95% CI {self.low:+.2f}…{self.high:+.2f})" if self.low is not None else ""
        verdict = "significant" if self.significant else "within noise"
        return f"changed by {self.delta:+.2f}{ci}, p={self.p:.3g}: {verdict}"

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def compare(now: pd.Series, then: pd.Series, *, group: str, metric: str, mode: str) -> Change | None:
    """Paired comparison of two per-question series (by id): only questions present in both count."""
    common = now.index.intersection(then.index, sort=False)
    if not len(common):
        return None
    a, b = now.loc[common].to_numpy(float), then.loc[common].to_numpy(float)
    binary = metric in BINARY
    ci = paired_interval(a, b)
    return Change(group=group, metric=metric, mode=mode, n=len(common), now=float(a.mean()), then=float(b.mean()),
                  delta=float(a.mean() - b.mean()), low=ci[0] if ci else None, high=ci[1] if ci else None,
                  p=paired_p(a, b, binary), test="exact McNemar" if binary else "Wilcoxon signed-rank")


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [*((str(c), g) for c, g in df.groupby("category", sort=True)), ("overall", df)]


def mode_values(df: pd.DataFrame, mode: str, metric: str) -> pd.Series:
    """Per-question values of a mode, or of the per-question gain (RAG minus bare) for mode "gain"."""
    if mode != "gain":
        return per_question(df, mode, metric)
    rag, bare = gain_per_question(df, metric)
    return rag - bare


# The metrics given an interval per category and mode.
HEADLINE = M.names(headline=True)


def intervals(df: pd.DataFrame) -> dict:
    """{group: {mode: {metric: [low, high] or None}}} for bare, RAG and gain, per category and overall."""
    out: dict = {}
    for name, group in _groups(df):
        for mode in ("bare", "rag", "gain"):
            for metric in HEADLINE:
                if mode != "rag" and metric in RAG_ONLY:
                    continue
                if mode == "gain":
                    rag, bare = gain_per_question(group, metric)
                    ci = paired_interval(rag, bare)
                else:
                    ci = interval(per_question(group, mode, metric))
                if ci is not None or len(mode_values(group, mode, metric)):
                    out.setdefault(name, {}).setdefault(mode, {})[metric] = list(ci) if ci else None
    return out


def rag_vs_bare(df: pd.DataFrame) -> list[Change]:
    """RAG against bare on the same questions, per category and overall."""
    changes = []
    for name, group in _groups(df):
        for metric in M.names(rag_vs_bare=True):
            rag, bare = gain_per_question(group, metric)
            change = compare(rag, bare, group=name, metric=metric, mode="gain")
            if change is not None:
                changes.append(change)
    return changes


def between_runs(now: pd.DataFrame, then: pd.DataFrame,
                 metrics: tuple[str, ...] = M.names(between_runs=True)) -> list[Change]:
    """Tonight against the baseline run, paired by question id, per mode (and gain), overall and per category."""
    changes = []
    for name, group in _groups(now):
        base = then if name == "overall" else then[then["category"] == name]
        for mode in ("bare", "rag", "gain"):
            for metric in metrics:
                if mode != "rag" and metric in RAG_ONLY:
                    continue
                change = compare(mode_values(group, mode, metric), mode_values(base, mode, metric),
                                 group=name, metric=metric, mode=mode)
                if change is not None:
                    changes.append(change)
    return changes


def find(changes: list[Change], metric: str, mode: str, group: str = "overall") -> Change | None:
    return next((c for c in changes if (c.metric, c.mode, c.group) == (metric, mode, group)), None)
