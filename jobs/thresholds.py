"""``--fail-under``: alert thresholds on the overall numbers of a run, checked before any model loads.

    MODE.METRIC=MIN          rag.keyword_hit_rate=0.3, rag.hit_at_5=0.8, gain.keyword_hit_rate=0.2
    change.MODE.METRIC=MIN   change.rag.keyword_hit_rate=-0.05: the change since the baseline run

MODE is ``bare``, ``rag`` or ``gain`` (RAG minus bare). A threshold on a number the question set cannot
produce (abstention without negative questions, hit@k without expected sources, retrieval for bare) is
refused up front rather than failing every night for the wrong reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.errors import JobError
from jobs.questions import NEGATIVE, QuestionSet
from jobs.scoring.summary import METRICS, metric

MODES = ("bare", "rag", "gain")
RETRIEVAL_METRICS = ("hit_at_1", "hit_at_3", "hit_at_5", "mrr", "retrieve_s")
KEYWORD_METRICS = ("keyword_hit_rate", "all_keywords_hit")


@dataclass(frozen=True)
class Threshold:
    key: str  # [change.]MODE.METRIC
    minimum: float

    @property
    def change(self) -> bool:
        return self.key.startswith("change.")

    @property
    def mode_metric(self) -> tuple[str, str]:
        mode, _, name = self.key.removeprefix("change.").partition(".")
        return mode, name

    @classmethod
    def parse(cls, text: str) -> Threshold:
        key, sep, value = text.partition("=")
        key = key.strip()
        parts = key.removeprefix("change.").split(".")
        usage = (f"--fail-under {text!r}: expected [change.]MODE.METRIC=NUMBER with MODE bare, rag or gain and "
                 f"METRIC one of {', '.join(METRICS)}; e.g. rag.keyword_hit_rate=0.3")
        if not sep or len(parts) != 2 or parts[0] not in MODES or parts[1] not in METRICS:
            raise JobError(usage)
        try:
            minimum = float(value)
        except ValueError:
            raise JobError(usage) from None
        if not math.isfinite(minimum):
            raise JobError(f"--fail-under {text!r}: the threshold must be a finite number, got {value.strip()!r}")
        mode, name = parts
        if mode in ("bare", "gain") and name in RETRIEVAL_METRICS:
            raise JobError(f"--fail-under {text!r}: {name} is measured on RAG answers only (bare answers retrieve "
                           f"nothing): use rag.{name}")
        return cls(key, minimum)

    def unavailable(self, questions: QuestionSet) -> str | None:
        """Why this question set cannot produce the metric, or None."""
        _, name = self.mode_metric
        qs = questions.questions
        if name == "abstention" and not any(q.category == NEGATIVE for q in qs):
            return f"abstention is measured on negative questions, and {questions.path.name} has none"
        if name in RETRIEVAL_METRICS[:-1] and not any(q.expected_sources for q in qs):
            return f"{name} needs expected_sources, and no question in {questions.path.name} has any"
        if name in KEYWORD_METRICS and not any(q.expected_keywords for q in qs):
            return f"{name} needs expected_keywords, and no question in {questions.path.name} has any"
        return None

    def check(self, questions: QuestionSet) -> None:
        why = self.unavailable(questions)
        if why:
            raise JobError(f"--fail-under {self.key}: {why}")

    def value(self, summary: dict, baseline_summary: dict | None) -> float | None:
        """The number compared with the minimum; None for a change when there is no baseline run."""
        key = self.key.removeprefix("change.")
        now = metric(summary, key)
        if not self.change:
            return now
        then = metric(baseline_summary, key) if baseline_summary is not None else None
        return None if now is None or then is None else now - then

    def verdict(self, summary: dict, baseline_summary: dict | None) -> tuple[bool, str]:
        """(failed, one line for the log)."""
        value = self.value(summary, baseline_summary)
        if value is None:
            if self.change and baseline_summary is None:
                return False, f"SKIP: {self.key}: no baseline run to compare with"
            return True, f"FAIL: {self.key}: not measured in this run"
        if value < self.minimum:
            return True, f"FAIL: {self.key} = {value:.3f} < {self.minimum}"
        return False, f"ok: {self.key} = {value:.3f} >= {self.minimum}"
