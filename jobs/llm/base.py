"""The one interface the eval job talks to, whichever backend answers: render a user message into the
prompt that will be sent, generate answers for prompts (each reported as soon as it exists), and say what
determines an answer (for the cache) and what answered (for the report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Completion:
    text: str
    prompt: str  # exactly what was sent: the rendered chat text, or the JSON of the chat messages
    prompt_tokens: int
    answer_tokens: int
    seconds: float
    error: str = ""  # set when no answer could be produced: recorded and shown, never cached
    timings: dict | None = None  # what a server reports of its own prefill and decode (llama.cpp), if anything


OnResult = Callable[[int, Completion], None]


class ServerLost(Exception):
    """The model server stopped answering mid-run: the answers so far are kept; the run can be resumed."""


class ChatModel(Protocol):
    name: str

    def render(self, user: str) -> str:
        """The prompt for one user turn, the profile's system message included: the same for both modes
        but for the user message, so the bare/RAG comparison is fair."""
        ...

    def generate(self, prompts: list[str], on_result: OnResult | None = None) -> list[Completion]:
        """Greedy answers, in order; ``on_result(index, completion)`` as each one is done."""
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
