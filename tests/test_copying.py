"""Passage dumps on hand-built answers over the prompt's real passage format, and what they do to the
scores, the thresholds and the nightly verdict. The dumped answers are shaped like ones Qwen2.5-Coder-0.5B
gave on the XTuner questions (a marker and path, then the passage; or a marker and its text, passage after
passage)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jobs.common.errors import JobError
from jobs.eval.history import Comparison
from jobs.eval.prompts import format_context
from jobs.eval.scoring import copying as C
from jobs.eval.scoring import statistics as S
from jobs.eval.scoring.summary import summarise
from jobs.eval.thresholds import Threshold

ZERO = ("docs/zh_cn/legacy/acceleration/deepspeed.rst",
        "XTuner 内置了五种 DeepSpeed ZeRO 配置：deepspeed_zero1、deepspeed_zero2、deepspeed_zero3，"
        "通过 --deepspeed 来选择不同的 ZeRO 配置。")
PACK = ("docs/zh_cn/pretrain_sft/tutorial/dataset.md",
        "XTuner 支持 2 种 Packing 策略，即 SoftPack 和 HardPack：SoftPack 非截断地拼接样本到 max_length。")
CHUNKS = [{"path": p, "heading": "", "score": 0.5, "text": t} for p, t in (ZERO, PACK)]


def rendered(i: int) -> str:
    """Passage i exactly as the prompt shows it to the model."""
    return format_context([(c["path"], c["heading"], c["text"]) for c in CHUNKS]).split("\n\n")[i]


@pytest.mark.parametrize(("answer", "start"), [
    (rendered(0), 0),  # the passage, marker and path and all
    ("[2] (docs/zh_cn/pretrain_sft/tutorial/dataset.md) 数据集 > 自定义数据集", 0),  # the path alone is scaffolding
    ("[1] XTuner 内置了五种 DeepSpeed ZeRO 配置：deepspeed_zero1、deepspeed_zero2", 0),  # marker, then its text
    ("支持 SoftPack 和 HardPack。\n\n" + rendered(1), len("支持 SoftPack 和 HardPack。\n\n")),  # answers, then dumps
    ("根据 [1]，可以用 --deepspeed deepspeed_zero2 选择配置。", None),  # a citation in the model's own words
    ("XTuner 内置了五种 DeepSpeed ZeRO 配置：deepspeed_zero1", None),  # a quote without a marker: what v4 asks for
    ("[2]", None),
    ("[1] 1.0 GB\n[2] 1.0 GB\n[3] 1.0 GB", None),  # repeated markers with short text: degenerate, not a copy
    ("[1] XTuner 的 ZeRO 配置有 deepspeed_zero2 等好几种可选", None),  # a marker, then the model's own words
])
def test_where_the_copying_starts(answer, start):
    assert C.dump_start(answer, CHUNKS) == start


def test_without_the_context_text_nothing_is_judged():
    assert C.dump_start(rendered(0), []) is None
    assert C.dump_start(rendered(0), [{"path": ZERO[0], "heading": "", "score": 0.5}]) is None


def row(qid: str, mode: str, answer: str, keywords: str = "deepspeed_zero2|--deepspeed", **extra) -> dict:
    hits = [k.casefold() in answer.casefold() for k in keywords.split("|")] if keywords else []
    return {"id": qid, "mode": mode, "category": "factual", "question": "?", "answer": answer,
            "expected_keywords": keywords, "keyword_hit_rate": sum(hits) / len(hits) if hits else None,
            "all_keywords_hit": all(hits) if hits else None, "abstained": False,
            "retrieved": json.dumps(CHUNKS if mode == "rag" else [], ensure_ascii=False),
            **dict.fromkeys(("hit_at_1", "hit_at_3", "hit_at_5", "mrr", "generate_s", "retrieve_s", "answer_tokens")),
            **extra}


def test_a_dump_earns_only_what_came_before_it():
    df = C.annotate(pd.DataFrame([
        row("a", "rag", rendered(0)),  # both keywords, all copied
        row("b", "rag", "用 --deepspeed 选择。\n\n" + rendered(0)),  # one keyword of its own, one copied
        row("c", "rag", "用 --deepspeed deepspeed_zero2。"),
        row("a", "bare", "用 --deepspeed。"),
        row("d", "rag", rendered(0), retrieved=json.dumps([{"path": ZERO[0], "score": 0.5}])),  # an old run
    ]))
    by = df.set_index(["id", "mode"])
    assert by.loc[("a", "rag"), "keyword_hit_rate"] == 1.0 and by.loc[("a", "rag"), "strict_keyword_hit_rate"] == 0
    assert by.loc[("b", "rag"), "keyword_hit_rate"] == 1.0 and by.loc[("b", "rag"), "strict_keyword_hit_rate"] == 0.5
    assert by.loc[("c", "rag"), "passage_dump"] is False and by.loc[("c", "rag"), "strict_keyword_hit_rate"] == 1.0
    assert by.loc[("a", "bare"), "passage_dump"] is None and by.loc[("a", "bare"), "strict_keyword_hit_rate"] == 0.5
    assert by.loc[("d", "rag"), "passage_dump"] is None and pd.isna(by.loc[("d", "rag"), "strict_keyword_hit_rate"])
    assert list(C.dumped(df)["id"]) == ["a", "b"]

    overall = summarise(df)["overall"]
    assert overall["rag"]["passage_dump"] == pytest.approx(2 / 3)  # of the 3 answers that can be judged
    assert overall["rag"]["strict_keyword_hit_rate"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert overall["rag"]["keyword_hit_rate"] == pytest.approx(1.0)
    assert overall["bare"]["passage_dump"] is None


def frame(dumps: list[bool]) -> pd.DataFrame:
    """RAG answers to the same questions, each a dump (all keywords copied) or a plain answer (same keywords)."""
    return C.annotate(pd.DataFrame([row(f"q{i:02d}", "rag", rendered(0) if d else "用 --deepspeed deepspeed_zero2")
                                    for i, d in enumerate(dumps)]))


def comparison(now: pd.DataFrame, then: pd.DataFrame) -> Comparison:
    empty = pd.DataFrame()
    return Comparison("then", [], S.between_runs(now, then), empty, empty, {}, now, then, None)


def test_a_significant_rise_in_dumps_is_a_regression_even_when_keyword_hit_holds():
    then = frame([False] * 20)
    now = frame([True] * 8 + [False] * 12)
    c = comparison(now, then)
    assert c.change_of("rag", "keyword_hit_rate").delta == 0  # the copies hold the keywords
    regressed, verdict = c.regression()
    assert regressed and "rag passage_dump" in verdict and "rag strict_keyword_hit_rate" in verdict
    assert not comparison(frame([True] * 2 + [False] * 18), then).regression()[0]  # 2 flips: within noise
    assert not comparison(then, now).regression()[0]  # fewer dumps is no regression


def test_thresholds_bound_the_strict_score_and_refuse_the_dump_share():
    assert Threshold.parse("change.rag.strict_keyword_hit_rate=-0.05").mode_metric == ("rag", "strict_keyword_hit_rate")
    for text in ("rag.passage_dump=0.1", "change.rag.passage_dump=-0.05"):
        with pytest.raises(JobError, match=r"better when lower.*strict_keyword_hit_rate"):
            Threshold.parse(text)
