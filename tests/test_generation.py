"""Batched generation gives exactly the answers of one-at-a-time greedy generation."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.config import load_profile
from jobs.llm import load_llm
from jobs.prompts import rag_user_message

QUESTIONS = ["what is the a ?", "Lumen", "supports the rate of the models docs question answer context",
             "a", "Which models does Lumen support? Pico-7M Nano-30M LoRA Full yes no", "the the the"]


def _pair(profile):
    one = load_llm(dataclasses.replace(profile, llm=dataclasses.replace(profile.llm, batch_size=1)))
    many = load_llm(dataclasses.replace(profile, llm=dataclasses.replace(profile.llm, batch_size=4)))
    return one, many


def test_batched_equals_sequential_on_a_tiny_model(tiny_llm):
    profile = load_profile("offline", {"llm.model": str(tiny_llm), "llm.device": "cpu", "llm.max_new_tokens": 12})
    one, many = _pair(profile)
    prompts = [one.render(q) for q in QUESTIONS]
    sequential = one.generate(prompts)
    batched = many.generate(prompts)
    assert [c.text for c in batched] == [c.text for c in sequential]
    assert [c.answer_tokens for c in batched] == [c.answer_tokens for c in sequential]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in sequential]


def test_batches_respect_rows_and_token_budget(tiny_llm):
    profile = load_profile("offline", {"llm.model": str(tiny_llm), "llm.device": "cpu", "llm.max_new_tokens": 10,
                                       "llm.batch_size": 3, "llm.max_batch_tokens": 100})
    llm = load_llm(profile)
    lengths = [5, 40, 12, 8, 30, 20, 2]
    batches = llm.batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 100
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)  # length-sorted


@pytest.mark.slow
def test_batched_equals_sequential_on_smollm2():
    from jobs.prepare.__main__ import prepare

    profile = load_profile("offline", {"llm.max_new_tokens": 24, "llm.device": "cpu"})
    prepare(profile.models_dir, ["smollm2-135m-instruct"])
    one, many = _pair(profile)
    context = [("README.md", "XTuner", "XTuner V1 is a next-generation training engine for very large MoE models.")]
    users = ["What is XTuner?", "xtuner是什么?", rag_user_message("What is XTuner?", context),
             "Name three colours.", rag_user_message("Which models does XTuner support?", context)]
    prompts = [one.render(u) for u in users]
    sequential = one.generate(prompts)
    batched = many.generate(prompts)
    assert [c.text for c in batched] == [c.text for c in sequential]
    assert all(c.text for c in batched)
