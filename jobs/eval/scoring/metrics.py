"""Every metric the eval job scores, in one table: what each is called in the report, which way is better,
which modes have it, how its per-question values are tested, where the history keeps it, whether its
significant worsening makes a night a real regression, and whether ``--fail-under`` accepts it.

The summary (jobs.eval.scoring.summary), the intervals and paired tests (jobs.eval.scoring.statistics), the
history and the nightly verdict (jobs.eval.history), the thresholds (jobs.eval.thresholds) and the report's
tables (jobs.eval.report) all read this table; none keeps a list of metric names of its own. Order matters:
it is the order of the intervals in summary.json, of the changes in the report, and of the columns a new
history.csv gets.

Modes: ``bare`` (the model alone), ``rag`` (with retrieved context) and ``gain`` (RAG minus bare, per
question), the last for every metric both modes have.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH = ("bare", "rag")
RAG = ("rag",)
# How a per-question value is tested between two paired sets of answers.
BINARY, RATE, AMOUNT = "binary", "rate", "amount"  # 0/1: exact McNemar; a share in [0, 1] or seconds/tokens: Wilcoxon
# What a question set must hold for a metric to be measured at all.
KEYWORDS, SOURCES, NEGATIVES = "expected_keywords", "expected_sources", "negative questions"


@dataclass(frozen=True)
class Metric:
    name: str  # the key in results, summary.json and --fail-under (rag.NAME)
    label: str  # as the report shows it
    higher_is_better: bool = True
    modes: tuple[str, ...] = BOTH  # bare and rag, or rag only (bare answers retrieve nothing)
    headline: bool = True  # given a 95% interval per category and mode (latency and sizes are not)
    per_question: str = BINARY  # BINARY (exact McNemar), RATE or AMOUNT (Wilcoxon signed-rank)
    summarised: bool = True  # summarise() gives its mean (pass/fail is derived per question only)
    needs: str | None = None  # KEYWORDS, SOURCES or NEGATIVES: what the question set must hold
    history: tuple[tuple[str, str], ...] = ()  # (mode, history.csv column) of the numbers kept per run
    rag_vs_bare: bool = False  # RAG tested against bare on the same questions (report, summary.json)
    between_runs: bool = False  # its change since the baseline run is tested and shown in the report
    verdict: tuple[str, ...] = ()  # modes whose significant worsening makes the night a real regression
    fail_under: bool = False  # --fail-under accepts it as a minimum
    report: tuple[str, ...] = ()  # modes (gain included) the report's score tables show

    @property
    def binary(self) -> bool:
        return self.per_question == BINARY

    @property
    def test(self) -> str:
        return "exact McNemar" if self.binary else "Wilcoxon signed-rank"

    @property
    def rag_only(self) -> bool:
        return self.modes == RAG

    def worse(self, delta: float) -> bool:
        """Whether a change by ``delta`` (now minus then) is for the worse."""
        return delta < 0 if self.higher_is_better else delta > 0


TABLE: tuple[Metric, ...] = (
    Metric("keyword_hit_rate", "keyword hit", per_question=RATE, needs=KEYWORDS,
           history=(("bare", "bare_keyword_hit"), ("rag", "rag_keyword_hit"), ("gain", "rag_gain")),
           rag_vs_bare=True, between_runs=True, verdict=("rag", "gain"), fail_under=True,
           report=("bare", "rag", "gain")),
    # Keyword hit that does not credit copied passages (jobs.eval.scoring.copying); bare's equals its keyword hit.
    Metric("strict_keyword_hit_rate", "keyword hit, dumps not credited", per_question=RATE, needs=KEYWORDS,
           history=(("rag", "rag_strict_keyword_hit"),), rag_vs_bare=True, between_runs=True, verdict=("rag",),
           fail_under=True, report=("rag",)),
    # Better lower: a minimum cannot guard it (--fail-under refuses it); a significant rise is a regression.
    Metric("passage_dump", "passage dumps", higher_is_better=False, modes=RAG,
           history=(("rag", "rag_passage_dumps"),), between_runs=True, verdict=("rag",), report=("rag",)),
    Metric("all_keywords_hit", "all keywords", needs=KEYWORDS, history=(("rag", "rag_all_keywords"),),
           fail_under=True, report=("bare", "rag")),
    # All expected keywords, or for a negative question an abstention: the per-question verdict.
    Metric("passed", "pass rate", summarised=False, rag_vs_bare=True, between_runs=True, verdict=("rag",)),
    Metric("abstention", "abstention", needs=NEGATIVES, history=(("rag", "rag_abstention"),), rag_vs_bare=True,
           between_runs=True, verdict=("rag",), fail_under=True, report=("bare", "rag")),
    Metric("hit_at_1", "hit@1", modes=RAG, needs=SOURCES, between_runs=True, fail_under=True, report=("rag",)),
    Metric("hit_at_3", "hit@3", modes=RAG, needs=SOURCES, fail_under=True, report=("rag",)),
    Metric("hit_at_5", "hit@5", modes=RAG, needs=SOURCES, history=(("rag", "rag_hit_at_5"),), between_runs=True,
           verdict=("rag",), fail_under=True, report=("rag",)),
    Metric("mrr", "MRR", modes=RAG, per_question=RATE, needs=SOURCES, history=(("rag", "rag_mrr"),),
           between_runs=True, verdict=("rag",), fail_under=True, report=("rag",)),
    # Latency and size: kept per run and accepted as thresholds, neither intervals nor a verdict.
    Metric("generate_s", "generation s", headline=False, per_question=AMOUNT, fail_under=True),
    Metric("retrieve_s", "retrieval s", modes=RAG, headline=False, per_question=AMOUNT, fail_under=True),
    Metric("answer_tokens", "answer tokens", headline=False, per_question=AMOUNT, fail_under=True),
)
BY_NAME = {m.name: m for m in TABLE}


def get(name: str) -> Metric:
    return BY_NAME[name]


def names(**where: object) -> tuple[str, ...]:
    """Names of the metrics whose fields (or properties) equal the given values, in table order:
    ``names(headline=True)``, ``names(per_question=BINARY)``."""
    return tuple(m.name for m in TABLE if all(getattr(m, k) == v for k, v in where.items()))


def label(name: str) -> str:
    """The report's name for a metric (the name itself for one outside the table)."""
    return BY_NAME[name].label if name in BY_NAME else name


def history_columns() -> tuple[tuple[str, str], ...]:
    """(history.csv column, ``mode.metric`` key) of every number kept per run, in table order."""
    return tuple((column, f"{mode}.{m.name}") for m in TABLE for mode, column in m.history)


def verdict_metrics() -> tuple[tuple[str, str], ...]:
    """(mode, metric) of every number whose significant worsening makes the night a real regression."""
    return tuple((mode, m.name) for m in TABLE for mode in m.verdict)
