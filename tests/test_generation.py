"""Batched generation gives exactly the answers of one-at-a-time greedy generation."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.common.config import load_profile
from jobs.eval.prompts import rag_user_message
from jobs.llm import load_llm

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


def test_presence_penalty_counts_the_answer_once_per_token_and_never_the_prompt():
    import torch

    from jobs.llm.huggingface import AnswerPresencePenalty

    penalty = AnswerPresencePenalty(0.5)
    prompt = torch.tensor([[0, 5, 6], [7, 7, 7]])  # left-padded rows: the first call sees the whole prompt
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    assert torch.equal(penalty(prompt, scores.clone()), scores)  # nothing generated yet
    generated = torch.cat([prompt, torch.tensor([[3, 3], [6, 9]])], dim=1)
    want = scores.clone()
    want[0, 3] -= 0.5  # twice in the answer, penalised once (presence, not frequency)
    want[1, [6, 9]] -= 0.5  # 6 is in the other row's prompt only: counted for this row's answer
    assert torch.equal(penalty(generated, scores.clone()), want)  # 5, 7: prompt tokens, untouched


def test_presence_penalty_changes_answers_and_batching_keeps_them(tiny_llm):
    profile = load_profile("offline", {"llm.model": str(tiny_llm), "llm.device": "cpu", "llm.max_new_tokens": 12})
    one, many = _pair(profile)
    prompts = [one.render(q) for q in QUESTIONS]
    plain = [c.text for c in one.generate(prompts)]
    sequential = one.generate(prompts, presence_penalty=1.5)
    batched = many.generate(prompts, presence_penalty=1.5)
    assert [c.text for c in batched] == [c.text for c in sequential]
    assert [c.text for c in sequential] != plain
    # A random model repeats itself; the penalty makes it repeat less.
    assert sum(len(set(c.text.split())) for c in sequential) > sum(len(set(t.split())) for t in plain)
    assert [c.text for c in one.generate(prompts)] == plain  # the penalty was for that call only


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
    from jobs.tools.prepare.__main__ import prepare

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
    # With the penalty, padding must not count as answer tokens: still the same answers batched.
    penalised = one.generate(prompts, presence_penalty=0.5)
    assert [c.text for c in many.generate(prompts, presence_penalty=0.5)] == [c.text for c in penalised]
