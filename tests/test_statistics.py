"""Statistics on constructed outcomes with known answers, and the properties every interval must have."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from jobs.eval.scoring import statistics as S
from jobs.eval.thresholds import Threshold


def run_frame(rag_pass: list[int], bare_pass: list[int], *, category: str = "factual",
              rates: list[float] | None = None) -> pd.DataFrame:
    """Results of a run: question i passes or not in each mode; keyword rate = pass unless given."""
    rows = []
    for i, (r, b) in enumerate(zip(rag_pass, bare_pass)):
        for mode, ok in (("rag", r), ("bare", b)):
            rate = rates[i] if (rates is not None and mode == "rag") else float(ok)
            rows.append({"id": f"q{i:02d}", "mode": mode, "category": category, "expected_keywords": "k",
                         "keyword_hit_rate": rate, "all_keywords_hit": bool(ok), "abstained": False,
                         "hit_at_5": 1.0 if mode == "rag" else None, "mrr": 0.5 if mode == "rag" else None})
    return pd.DataFrame(rows)


def test_identical_runs_show_no_change():
    df = run_frame([1, 0, 1, 1, 0] * 5, [0] * 25)
    changes = S.between_runs(df, df.copy())
    assert changes and all(c.delta == 0 and c.p == 1.0 and not c.significant for c in changes)
    assert all(c.low == c.high == 0 for c in changes if c.low is not None)


def test_rag_winning_20_of_20_flips_is_significant():
    df = run_frame([1] * 20 + [0] * 5, [0] * 25)
    passed = S.find(S.rag_vs_bare(df), "passed", "gain")
    assert passed.n == 25 and passed.delta == pytest.approx(0.8)
    assert passed.test == "exact McNemar" and passed.p == pytest.approx(2 * 0.5 ** 20)
    assert passed.significant and passed.low > 0.5


def test_a_few_flips_each_way_are_within_noise():
    df = run_frame([1, 1, 1, 0, 0] + [0] * 20, [0, 0, 0, 1, 1] + [0] * 20)
    passed = S.find(S.rag_vs_bare(df), "passed", "gain")
    assert passed.p == pytest.approx(sps.binomtest(3, 5, 0.5).pvalue) and not passed.significant
    assert passed.low < 0 < passed.high


def test_rates_use_the_signed_rank_test():
    rates = [0.5, 1.0, 0.25, 0.75, 0.5, 1.0, 0.5, 0.25] + [0.0] * 17
    df = run_frame([1] * 8 + [0] * 17, [0] * 25, rates=rates)
    kw = S.find(S.rag_vs_bare(df), "keyword_hit_rate", "gain")
    assert kw.test == "Wilcoxon signed-rank"
    assert kw.p == pytest.approx(sps.wilcoxon(rates[:8], [0] * 8).pvalue)
    assert kw.significant


def test_smallest_detectable_change():
    assert S.min_same_way() == 6  # 2 x 0.5^6 = 0.031 < 0.05 <= 2 x 0.5^5 = 0.0625
    assert S.smallest_detectable(25) == pytest.approx(0.24)
    assert S.smallest_detectable(5) is None
    # Exactly at the floor: 6 questions flip, all the same way, and none back: significant; 5: not.
    for flips, significant in ((6, True), (5, False)):
        df = run_frame([1] * flips + [0] * (25 - flips), [0] * 25)
        assert S.find(S.rag_vs_bare(df), "passed", "gain").significant is significant


def test_runs_are_paired_by_question_id():
    now = run_frame([1, 1, 0, 0], [0] * 4)
    then = run_frame([0, 1, 0], [0] * 3)  # q03 is new tonight: not part of the comparison
    c = S.find(S.between_runs(now, then), "passed", "rag")
    assert c.n == 3 and c.delta == pytest.approx(1 / 3)


def test_interval_resamples_are_stable_to_two_decimals(monkeypatch):
    x = np.random.default_rng(7).random(25).round(2)
    first = S.interval(x)
    monkeypatch.setattr(S, "SEED", 1)
    assert S.interval(x) == pytest.approx(first, abs=0.01)


def test_too_few_questions_give_no_interval():
    assert S.interval(np.array([0.5])) is None and S.paired_interval([1.0], [0.0]) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]), min_size=2, max_size=40),
       st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=2, max_size=40))
def test_every_interval_contains_its_point_estimate(a, b):
    n = min(len(a), len(b))
    x, y = np.array(a[:n]), np.array(b[:n])
    low, high = S.interval(x)
    assert low <= x.mean() <= high and 0 <= low and high <= 1
    low, high = S.paired_interval(x, y)
    assert low <= x.mean() - y.mean() <= high


def test_intervals_cover_every_group_mode_and_metric():
    df = pd.concat([run_frame([1, 0, 1, 1], [0, 0, 1, 0]),
                    run_frame([1, 1, 0], [0, 0, 0], category="howto").assign(id=lambda d: "h" + d["id"])])
    got = S.intervals(df)
    assert set(got) == {"factual", "howto", "overall"}
    assert set(got["overall"]) == {"bare", "rag", "gain"}
    assert "hit_at_5" in got["overall"]["rag"] and "hit_at_5" not in got["overall"]["bare"]
    low, high = got["overall"]["gain"]["keyword_hit_rate"]
    assert low <= 4 / 7 - 1 / 7 <= high


class _Comparison:
    def __init__(self, now: pd.DataFrame, then: pd.DataFrame) -> None:
        self.now, self.then = now, then

    def change_of(self, mode: str, metric: str):
        return S.compare(S.mode_values(self.now, mode, metric), S.mode_values(self.then, mode, metric),
                         group="overall", metric=metric, mode=mode)


def test_significance_gated_threshold_fails_only_on_a_real_drop():
    then = run_frame([1] * 25, [0] * 25)
    small = run_frame([1] * 22 + [0] * 3, [0] * 25)  # -0.12: 3 flips, within noise
    large = run_frame([1] * 15 + [0] * 10, [0] * 25)  # -0.40: 10 flips, significant
    gated = Threshold.parse("change.rag.keyword_hit_rate=-0.05")
    raw = Threshold.parse("rawchange.rag.keyword_hit_rate=-0.05")
    failed, line = gated.verdict({}, _Comparison(small, then))
    assert not failed and line.startswith("ok (within noise)")
    assert raw.verdict({}, _Comparison(small, then))[0]
    failed, line = gated.verdict({}, _Comparison(large, then))
    assert failed and "and significant" in line and "exact McNemar" not in line
    assert not Threshold.parse("change.rag.keyword_hit_rate=-0.5").verdict({}, _Comparison(large, then))[0]
