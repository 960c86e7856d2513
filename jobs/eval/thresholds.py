"""``--fail-under``: alert thresholds on the overall numbers of a run, checked before any model loads.

    MODE.METRIC=MIN            rag.keyword_hit_rate=0.3, rag.hit_at_5=0.8, gain.keyword_hit_rate=0.2
    change.MODE.METRIC=MIN     change.rag.keyword_hit_rate=-0.05: a significant drop since the baseline run
    rawchange.MODE.METRIC=MIN  rawchange.rag.keyword_hit_rate=-0.05: any drop since the baseline run

MODE is ``bare``, ``rag`` or ``gain`` (RAG minus bare). The exact rule of ``change.``: it fails when the
change (tonight minus the baseline run, overall, on the questions both runs answered) is below MIN *and*
the paired test on those questions says it is significant (p < 0.05: exact McNemar for pass/fail
metrics, Wilcoxon signed-rank for rates; see jobs.eval.scoring.statistics). A drop below MIN that is within
noise is reported, not failed. ``rawchange.`` fails on the number alone. Without a baseline run both are
skipped. A threshold on a number the question set cannot produce (abstention without negative
questions, hit@k without expected sources, retrieval for bare) is refused up front rather than failing
every night for the wrong reason. ``strict_keyword_hit_rate`` is the keyword hit that does not credit
copied passages (jobs.eval.scoring.copying). The share of passage dumps is better lower and refused here: a
significant rise in it already makes the night a regression in the report's verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs.common.errors import JobError
from jobs.common.questions import NEGATIVE, QuestionSet
from jobs.eval.scoring import metrics as M
from jobs.eval.scoring.summary import METRICS, metric

if TYPE_CHECKING:
    from jobs.eval.history import Comparison
    from jobs.eval.scoring.statistics import Change

MODES = ("bare", "rag", "gain")
CHANGE_FORMS = ("change.", "rawchange.")
# From the metric table (jobs.eval.scoring.metrics): thresholds on RAG answers only, and those that need
# expected keywords in the question set.
RETRIEVAL_METRICS = M.names(rag_only=True, fail_under=True)
KEYWORD_METRICS = M.names(needs=M.KEYWORDS)


@dataclass(frozen=True)
class Threshold:
    key: str  # [change.|rawchange.]MODE.METRIC
    minimum: float

    @property
    def form(self) -> str:
        return next((f for f in CHANGE_FORMS if self.key.startswith(f)), "")

    @property
    def change(self) -> bool:
        return bool(self.form)

    @property
    def mode_metric(self) -> tuple[str, str]:
        mode, _, name = self.key.removeprefix(self.form).partition(".")
        return mode, name

    @classmethod
    def parse(cls, text: str) -> Threshold:
        key, sep, value = text.partition("=")
        key = key.strip()
        form = next((f for f in CHANGE_FORMS if key.startswith(f)), "")
        parts = key.removeprefix(form).split(".")
        usage = (f"--fail-under {text!r}: expected [change.|rawchange.]MODE.METRIC=NUMBER with MODE bare, rag or "
                 f"gain and METRIC one of {', '.join(METRICS)}; e.g. rag.keyword_hit_rate=0.3")
        if not sep or len(parts) != 2 or parts[0] not in MODES or parts[1] not in METRICS:
            raise JobError(usage)
        try:
            minimum = float(value)
        except ValueError:
            raise JobError(usage) from None
        if not math.isfinite(minimum):
            raise JobError(f"--fail-under {text!r}: the threshold must be a finite number, got {value.strip()!r}")
        mode, name = parts
        if not M.get(name).fail_under:
            if M.get(name).higher_is_better:
                raise JobError(f"--fail-under {text!r}: {name} cannot be a threshold")
            raise JobError(f"--fail-under {text!r}: {name} is better when lower, so a minimum cannot guard it; "
                           f"bound the keyword hit that does not credit copied passages instead: "
                           f"{form}{mode}.strict_keyword_hit_rate=...")
        if mode in ("bare", "gain") and name in RETRIEVAL_METRICS:
            raise JobError(f"--fail-under {text!r}: {name} is measured on RAG answers only (bare answers retrieve "
                           f"nothing): use rag.{name}")
        return cls(key, minimum)

    def unavailable(self, questions: QuestionSet) -> str | None:
        """Why this question set cannot produce the metric, or None."""
        _, name = self.mode_metric
        qs, needs = questions.questions, M.get(name).needs
        if needs == M.NEGATIVES and not any(q.category == NEGATIVE for q in qs):
            return f"{name} is measured on negative questions, and {questions.path.name} has none"
        if needs == M.SOURCES and not any(q.expected_sources for q in qs):
            return f"{name} needs expected_sources, and no question in {questions.path.name} has any"
        if needs == M.KEYWORDS and not any(q.expected_keywords for q in qs):
            return f"{name} needs expected_keywords, and no question in {questions.path.name} has any"
        return None

    def check(self, questions: QuestionSet) -> None:
        why = self.unavailable(questions)
        if why:
            raise JobError(f"--fail-under {self.key}: {why}")

    def verdict(self, summary: dict, comparison: Comparison | None) -> tuple[bool, str]:
        """(failed, one line for the log)."""
        mode, name = self.mode_metric
        if not self.change:
            value = metric(summary, self.key)
            if value is None:
                return True, f"FAIL: {self.key}: not measured in this run"
            if value < self.minimum:
                return True, f"FAIL: {self.key} = {value:.3f} < {self.minimum}"
            return False, f"ok: {self.key} = {value:.3f} >= {self.minimum}"
        if comparison is None:
            return False, f"SKIP: {self.key}: no baseline run to compare with"
        c = comparison.change_of(mode, name)
        if c is None:
            return True, f"FAIL: {self.key}: not measured in both runs"
        shown = f"{self.key} = {c.delta:+.3f} (95% CI {_ci(c)}, p={c.p:.3g}, {c.test}, n={c.n})"
        if c.delta >= self.minimum:
            return False, f"ok: {shown} >= {self.minimum}"
        if self.form == "rawchange.":
            return True, f"FAIL: {shown} < {self.minimum}"
        if c.significant:
            return True, f"FAIL: {shown} < {self.minimum}, and significant"
        return False, f"ok (within noise): {shown} < {self.minimum}, but not significant"


def _ci(c: Change) -> str:
    return "–" if c.low is None or c.high is None else f"{c.low:+.2f}…{c.high:+.2f}"
