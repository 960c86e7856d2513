"""Query rewriting through the profile's own chat model: the question translated into the docs' other language.

XTuner keeps many pages in Chinese only (the legacy tree, several RL pages); an English question about them
shares few words with them, and a small multilingual embedder matches them poorly. Retrieving with the
question and with its translation, then fusing both rankings, reaches them. Translations are generated in
batches and cached like answers (keyed by the model's fingerprint and the full prompt), so a nightly pays for
each question once; every RAG answer records the rewrite it was retrieved with.

Qwen2.5-Coder-0.5B often answers a Chinese question instead of translating it. Those rewrites are kept: like
HyDE's hypothetical answers they carry the English docs' words, and dropping them cost the hard development set
MRR 0.77 -> 0.73.

A model must be able to translate: Qwen2.5-Coder-0.5B (offline-zh) can, SmolLM2-135M (offline) cannot (it
answers in English whatever it is asked), so only profiles with a capable model turn it on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from jobs.common.config import Profile
from jobs.llm import ChatModel
from jobs.llm.cache import GenerationCache

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


class QueryRewriter:
    """Translations of questions by a chat model, generated in batches and cached."""

    def __init__(self, llm: ChatModel, cache: GenerationCache, into: str = "any") -> None:
        self.llm = llm
        self.cache = cache
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

    def _key(self, prompt: str) -> str:
        return self.cache.key({**self.llm.fingerprint(), "rewrite_version": REWRITE_VERSION}, prompt)

    def prepare(self, questions: Sequence[str]) -> None:
        """Translate every question not known yet, missing ones in one batch."""
        todo: dict[str, str] = {}
        for q in dict.fromkeys(questions):
            if q in self._done or not self.wanted(q):
                continue
            prompt = self._prompt(q)
            found = self.cache.get(self._key(prompt), prompt)
            if found is not None:
                self._done[q] = found["text"]
                self.seconds.setdefault(q, 0.0)
            else:
                todo[q] = prompt
        if not todo:
            return
        log.info("translating %d question(s) with %s", len(todo), self.llm.name)
        for q, completion in zip(todo, self.llm.generate(list(todo.values()))):
            if completion.error:
                log.warning("no translation for %r: %s", q[:60], completion.error)
                self._done[q] = ""
                continue
            text = clean(completion.text)
            self._done[q] = text
            self.seconds[q] = completion.seconds
            self.cache.put(self._key(todo[q]), todo[q], text=text, seconds=completion.seconds,
                           prompt_tokens=completion.prompt_tokens, answer_tokens=completion.answer_tokens)

    def translation(self, question: str) -> str:
        """The question in the other docs language ("" when none is wanted, or the model gave nothing usable)."""
        if not self.wanted(question):
            return ""
        self.prepare([question])
        text = self._done[question]
        return "" if text.casefold() == question.casefold() else text


def load_rewriter(profile: Profile, llm: ChatModel | None = None) -> QueryRewriter | None:
    """The profile's rewriter (loading its chat model unless given), or None when it rewrites nothing."""
    if profile.retrieval.rewrite == "none":
        return None
    if llm is None:
        from jobs.llm import load_llm

        llm = load_llm(profile)
    return QueryRewriter(llm, GenerationCache(profile.paths.cache / "generations"), profile.retrieval.rewrite_into)
