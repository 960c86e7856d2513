"""Keyword scores (jobs.eval.scoring.keywords): an answer and its expected keywords are compared after NFKC,
case folding and whitespace folding; abstention is a phrase found the same way."""

from __future__ import annotations

import pytest

from jobs.eval.scoring.keywords import abstained, keyword_hit_rate, keyword_hits, normalise


@pytest.mark.parametrize(("text", "want"), [
    ("ＬｏＲＡ　ａｄａｐｔｅｒｓ", "lora adapters"),  # full-width letters and the ideographic space
    ("ＷＳＬ２", "wsl2"),  # full-width digits
    ("ﬁne-tune", "fine-tune"),  # a ligature
    ("Straße", "strasse"),  # case folding, not lower(): ß folds to ss
    ("  learning\n\trate \u00a0 3E-4  ", "learning rate 3e-4"),  # runs of any whitespace become one space
    ("支持 Windows 吗？", "支持 windows 吗?"),  # full-width punctuation becomes ASCII
])
def test_normalise(text, want):
    assert normalise(text) == want


def test_keywords_hit_across_width_case_and_whitespace():
    answer = "Lumen runs under ＷＳＬ２ on Windows; the default LEARNING\n  RATE is 3E-4."
    assert keyword_hits(answer, ["wsl2", "learning rate", "3e-4", "macOS"]) == [True, True, True, False]
    # The keyword is normalised too: a full-width keyword finds a half-width answer.
    assert keyword_hits("use wsl2", ["ＷＳＬ２"]) == [True]
    assert keyword_hits("Die STRASSE", ["straße"]) == [True]


def test_a_keyword_is_found_as_a_substring_only():
    assert keyword_hits("梯度检查点", ["梯度", "检查点", "梯度 检查点"]) == [True, True, False]
    assert keyword_hits("", ["x"]) == [False]


def test_hit_rate_is_the_share_of_keywords_found():
    assert keyword_hit_rate("Pico-7M and Nano-30M", ["pico-7m", "nano-30m"]) == 1.0
    assert keyword_hit_rate("Pico-7M only", ["pico-7m", "nano-30m", "lora"]) == pytest.approx(1 / 3)
    assert keyword_hit_rate("nothing relevant", ["pico-7m"]) == 0.0
    assert keyword_hit_rate("anything", []) is None  # a question that expects no keyword is not scored


@pytest.mark.parametrize(("answer", "want"), [
    ("That is NOT   covered by the documentation.", True),
    ("文档中没有提到这一点。", True),
    ("The docs cover it: use WSL2.", False),
    ("Covered in the FAQ.", False),  # a part of a phrase is not the phrase
    ("", False),
])
def test_abstention_is_a_phrase_found_after_normalising(answer, want):
    assert abstained(answer, ["not covered", "没有提到"]) is want


def test_no_phrases_means_no_abstention():
    assert abstained("not covered", []) is False
    assert abstained("Ｎｏｔ ｃｏｖｅｒｅｄ", ["not covered"]) is True
