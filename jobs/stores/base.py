"""The one interface both store backends offer the jobs: a reader that sees one published generation from
start to end, and a writer (the only one at a time) that builds the next generation beside the live one
and publishes it in one atomic step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import chromadb

if TYPE_CHECKING:
    from jobs.stores.lexical import BM25Index


@dataclass
class Base:
    """What an ingest builds on: the newest sound generation (read only), or nothing."""

    collection: chromadb.Collection | None
    info: dict  # its build record
    is_live: bool  # it is the live generation (else: a fallback from a damaged one, or nothing)
    rebuilt: bool = False  # a store was there, but nothing usable to build on
    has_lexical: bool = True


@dataclass
class Generation:
    """The next generation while it is written: a collection nobody reads yet."""

    name: str
    collection: chromadb.Collection


class Writer(Protocol):
    def base(self) -> Base: ...

    def empty(self) -> Base:
        """Nothing to build on: the next generation starts empty (a rebuild)."""
        ...

    def create(self, base: Base, exclude: set[str]) -> Generation:
        """The next generation, holding ``base``'s chunks but those in ``exclude`` (vectors copied, never
        re-embedded)."""
        ...

    def check_healthy(self) -> None:
        """Raise the job's one-line error now if this writer can no longer publish (its server is gone, its
        lease lost), so a long ingest stops instead of working for nothing; cheap enough to call between slices
        of work. A no-op where nothing can be lost (the embedded store)."""
        ...

    def publish(self, gen: Generation, info: dict, lexical: BM25Index) -> str:
        """Record the build info, keep the lexical index with the generation, make it live in one step,
        and collect generations nobody needs; returns the live generation's name."""
        ...


class Reader(Protocol):
    collection: chromadb.Collection
    info: dict
    generation: str  # the name of the generation read, the same from start to end

    def lexical(self) -> BM25Index: ...

    def close(self) -> None: ...
