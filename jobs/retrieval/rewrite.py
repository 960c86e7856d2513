"""Query rewriting through the profile's own chat model: the question translated into the docs' other language.

XTuner keeps many pages in Chinese only (the legacy tree, several RL pages); an English question about them
shares few words with them, and a small multilingual embedder matches them poorly. Retrieving with the
question and with its translation, then fusing both rankings, reaches them. Translations are generated in
batches and cached like answers (keyed by the model's fingerprint and the full prompt), so a nightly pays for
each question once; every RAG answer records the rewrite it was retrieved with.

Qwen2.5-Coder-0.5B often answers a Chinese question instead of translating it. Those rewrites are kept: like
HyDE's hypothetical answers they carry the English docs' words, and dropping them lost retrieval on the hard
development set (decision D19 in docs/decisions.md).

A model must be able to translate: Qwen2.5-Coder-0.5B (offline-zh) can, SmolLM2-135M (offline) cannot (it
answers in English whatever it is asked), so only profiles with a capable model turn it on.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

from jobs.common.config import Profile
from jobs.llm import ChatModel, Completion, OnResult
from jobs.llm.base import WrappedChatModel
from jobs.llm.cache import CachedChatModel, GenerationCache

log = logging.getLogger(__name__)

REWRITE_VERSION = 1  # bump when a template changes: rewrites are cached on it
TEMPLATES = {
    # The question's language -> the instruction that turns it into the other language.
    "en": "把下面的问题翻译成中文。只输出译文，不要回答问题。\n\n{question}",
    "zh": "Translate the following question into English. Output only the translation; do not answer it.\n\n"
          "{question}",
}
_CJK = re.compile(r"[\u3400-\u9fff]")


def language_of(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def clean(text: str) -> str:
    """The first non-empty line, without quotes or a "Translation:" label the model may add."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = re.sub(r"^(translation|译文|翻译)\s*[:：]\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'“”「」")


class _Cleaned(WrappedChatModel):
    """The chat model's translations as the rewriter keeps (and caches) them: ``clean``ed. Failed ones as they are."""

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        log.info("translating %d question(s) with %s", len(prompts), self.name)

        def cleaned(completion: Completion) -> Completion:
            return completion if completion.error else dataclasses.replace(completion, text=clean(completion.text))

        report = None if on_result is None else (lambda i, completion: on_result(i, cleaned(completion)))
        return [cleaned(c) for c in self.llm.generate(prompts, report, presence_penalty=presence_penalty)]


class QueryRewriter:
    """Translations of questions by a chat model, generated in batches and cached (``CachedChatModel``, as the
    answers are: ``cache.enabled=False``, i.e. ``--no-cache``, translates every question again)."""

    def __init__(self, llm: ChatModel, cache: GenerationCache, into: str = "any") -> None:
        self.llm = llm
        self.cache = cache
        # Keyed by the model's fingerprint and the template's version, with the full prompt.
        self.model = CachedChatModel(_Cleaned(llm), cache, {"rewrite_version": REWRITE_VERSION})
        self.into = into  # "any", or the one language questions are translated into
        self._done: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # generation time per question (amortised within a batch)

    def describe(self) -> str:
        into = "" if self.into == "any" else f" into {self.into}"
        return f"translation{into} by {self.llm.name}"

    def wanted(self, question: str) -> bool:
        return self.into == "any" or language_of(question) != self.into

    def _prompt(self, question: str) -> str:
        return self.llm.render(TEMPLATES[language_of(question)].format(question=question))

    def prepare(self, questions: Sequence[str]) -> None:
        """Translate every question not known yet: from the cache, the missing ones in one batch."""
        todo = [q for q in dict.fromkeys(questions) if q not in self._done and self.wanted(q)]

        def done(k: int, completion: Completion) -> None:
            q = todo[k]
            if completion.error:
                log.warning("no translation for %r: %s", q[:60], completion.error)
                self._done[q] = ""
                return
            self._done[q] = completion.text
            if completion.cached:
                self.seconds.setdefault(q, 0.0)
            else:
                self.seconds[q] = completion.seconds

        if todo:
            self.model.generate([self._prompt(q) for q in todo], done)

    def translation(self, question: str) -> str:
        """The question in the other docs language ("" when none is wanted, or the model gave nothing usable)."""
        if not self.wanted(question):
            return ""
        self.prepare([question])
        text = self._done[question]
        return "" if text.casefold() == question.casefold() else text


def load_rewriter(profile: Profile, llm: ChatModel | None = None,
                  cache: GenerationCache | None = None) -> QueryRewriter | None:
    """The profile's rewriter (loading its chat model unless given; the profile's generation cache unless given),
    or None when it rewrites nothing."""
    if profile.retrieval.rewrite == "none":
        return None
    if llm is None:
        from jobs.llm import load_llm

        llm = load_llm(profile)
    return QueryRewriter(llm, cache if cache is not None else GenerationCache(profile.paths.cache / "generations"),
                         profile.retrieval.rewrite_into)
