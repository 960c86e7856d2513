"""Retrieval scores at file level: stable when chunking changes, comparable across stores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

KS = (1, 3, 5)


def hit_at(ranked_files: Sequence[str], expected: Iterable[str], k: int) -> float:
    wanted = set(expected)
    return 1.0 if any(f in wanted for f in ranked_files[:k]) else 0.0


def reciprocal_rank(ranked_files: Sequence[str], expected: Iterable[str]) -> float:
    wanted = set(expected)
    for rank, f in enumerate(ranked_files, start=1):
        if f in wanted:
            return 1.0 / rank
    return 0.0


def scores(ranked_files: Sequence[str], expected: Iterable[str], ks: Sequence[int] = KS) -> dict[str, float]:
    expected = tuple(expected)
    out = {f"hit_at_{k}": hit_at(ranked_files, expected, k) for k in ks}
    out["mrr"] = reciprocal_rank(ranked_files, expected)
    return out


def format_line(means: dict[str, float]) -> str:
    parts = [f"hit@{k.removeprefix('hit_at_')}={v:.2f}" for k, v in means.items() if k.startswith("hit_at_")]
    return " ".join(parts + [f"mrr={means['mrr']:.2f}"])
