"""The one interface the eval job talks to, whichever backend answers: render a user message into the
prompt that will be sent, generate answers for prompts (each reported as soon as it exists), and say what
determines an answer (for the cache) and what answered (for the report)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

# Chat-control tokens as chat models spell them: ChatML and its kin (`<|im_start|>`, `<|im_end|>`,
# `<|endoftext|>`, Llama 3's `<|eot_id|>`), and SentencePiece's `<s>` / `</s>`.
CONTROL_TOKENS = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>")
# Invisible, and no tokenizer's special-token matcher sees through it.
_BREAK = "\u200b"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt: str  # exactly what was sent: the rendered chat text, or the JSON of the chat messages
    prompt_tokens: int
    answer_tokens: int
    seconds: float
    error: str = ""  # set when no answer could be produced: recorded and shown, never cached
    timings: dict | None = None  # what a server reports of its own prefill and decode (llama.cpp), if anything
    cached: bool = False  # read back from the generation cache (jobs.llm.cache.CachedChatModel), not generated now


OnResult = Callable[[int, Completion], None]


def control_tokens(specials: Iterable[str] = ()) -> re.Pattern[str]:
    """What ``defuse_control_tokens`` breaks: a model's own special tokens and the usual spellings."""
    names = sorted({s for s in specials if s and len(s) > 1}, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, names), CONTROL_TOKENS.pattern])) if names else CONTROL_TOKENS


def defuse_control_tokens(text: str, pattern: re.Pattern[str] = CONTROL_TOKENS) -> str:
    """``text`` with every chat-control token in it broken by an invisible character.

    Tokenizers read special-token strings in a prompt as the control tokens themselves, and servers encode
    the templated chat the same way. XTuner's chat-template pages quote `<|im_start|>user ... <|im_end|>`: put
    into a prompt as they are, they end the user turn early and make up an assistant turn that "already
    answered" (the public questions "你是谁" and "xtuner是什么?" retrieve a passage quoting a whole
    "你是谁？ / 我是书生浦语。" exchange). Retrieved text and questions are content, never control: each match
    of ``pattern`` (a model's own special tokens, from ``control_tokens``, or the usual spellings above) is
    broken after its first character, so it reaches the model as plain text.
    """
    return pattern.sub(lambda m: m.group(0)[0] + _BREAK + m.group(0)[1:], text)


class ServerLost(Exception):
    """The model server stopped answering mid-run: the answers so far are kept; the run can be resumed."""


class ChatModel(Protocol):
    name: str

    def render(self, user: str) -> str:
        """The prompt for one user turn, the profile's system message included: the same for both modes
        but for the user message, so the bare/RAG comparison is fair. Chat-control tokens inside the user
        message are defused (``defuse_control_tokens``): they are content, not structure."""
        ...

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        """Greedy answers, in order; ``on_result(index, completion)`` as each one is done. ``presence_penalty``
        (OpenAI's) counts the tokens generated so far, never the prompt's."""
        ...

    def fingerprint(self) -> dict:
        """Everything besides the prompt that determines an answer: the cache key's model part."""
        ...

    def identity(self) -> dict[str, str | int | float | bool]:
        """What answered, for the report's header (no secrets)."""
        ...

    @property
    def questions_per_step(self) -> int:
        """How many questions the eval retrieves for before handing their prompts over together."""
        ...

    def close(self) -> None: ...


class WrappedChatModel:
    """A ChatModel around another that changes only what ``generate`` does (caching, cleaning the text): the
    rest is the wrapped model's. Subclasses override ``generate``."""

    def __init__(self, llm: ChatModel) -> None:
        self.llm = llm

    @property
    def name(self) -> str:
        return self.llm.name

    def render(self, user: str) -> str:
        return self.llm.render(user)

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        return self.llm.generate(prompts, on_result, presence_penalty=presence_penalty)

    def fingerprint(self) -> dict:
        return self.llm.fingerprint()

    def identity(self) -> dict[str, str | int | float | bool]:
        return self.llm.identity()

    @property
    def questions_per_step(self) -> int:
        return self.llm.questions_per_step

    def close(self) -> None:
        self.llm.close()
