"""Keyword scores: how many expected keywords an answer contains, after normalisation.

Normalisation is NFKC (full-width and half-width forms become equal), case folding, and whitespace
folded to single spaces, applied to the answer and the keywords alike.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def keyword_hits(answer: str, keywords: Sequence[str]) -> list[bool]:
    norm = normalise(answer)
    return [normalise(k) in norm for k in keywords]


def keyword_hit_rate(answer: str, keywords: Sequence[str]) -> float | None:
    """Fraction of keywords found; None when the question expects none (nothing to score)."""
    if not keywords:
        return None
    hits = keyword_hits(answer, keywords)
    return sum(hits) / len(hits)


def abstained(answer: str, phrases: Sequence[str]) -> bool:
    """The answer says the docs do not cover it / the model does not know."""
    norm = normalise(answer)
    return any(normalise(p) in norm for p in phrases)
