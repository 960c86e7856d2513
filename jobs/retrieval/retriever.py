"""Retrieval over the store: dense (LlamaIndex over Chroma), lexical (BM25), or both fused (RRF or scores).

Dense and lexical retrievers fail on different questions (paraphrases vs exact identifiers, Chinese
pages for English questions); fusing the two keeps what each finds. The mode and the fusion are settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import NodeWithScore
from llama_index.vector_stores.chroma import ChromaVectorStore

from jobs import stores
from jobs.common.config import Profile
from jobs.common.embedding import Embedder
from jobs.common.errors import JobError
from jobs.retrieval.fusion import Hit, fuse
from jobs.retrieval.rewrite import QueryRewriter
from jobs.stores.chroma import pages
from jobs.stores.lexical import BM25Index, lexical_spec


def _cosine(node: NodeWithScore) -> float:
    # ChromaVectorStore reports exp(-distance); with the cosine space, distance = 1 - cosine.
    return 1.0 + math.log(node.score) if node.score and node.score > 0 else 0.0


def retrieval_seconds(retriever: StoreRetriever, questions: Sequence[str], k: int) -> list[float]:
    """Seconds of each question's retrieval (embed + search + fusion), after one warm-up retrieval that pays
    for loading what the first query touches."""
    retriever.retrieve(questions[0], k)
    seconds = []
    for q in questions:
        started = time.perf_counter()
        retriever.retrieve(q, k)
        seconds.append(time.perf_counter() - started)
    return seconds


class StoreRetriever:
    """Opens the live store (refusing another embedder's) and retrieves top-k chunks in one mode."""

    def __init__(self, profile: Profile, embedder: Embedder, mode: str | None = None,
                 rewriter: QueryRewriter | None = None) -> None:
        self.mode = mode or profile.retrieval.mode
        self.rrf_k = profile.retrieval.rrf_k
        self.fusion = profile.retrieval.fusion
        self.fusion_depth = profile.retrieval.fusion_depth
        self.bm25_weight = profile.retrieval.bm25_weight
        self.rewrite_weight = profile.retrieval.rewrite_weight
        self.rewriter = rewriter  # set after the chat model loads (the store is checked before it)
        try:
            self.reader = stores.open_reader(profile)
        except stores.DamagedStore as exc:
            raise JobError(f"store {stores.describe(profile)} is damaged ({exc}): run `make ingest "
                           f"PROFILE={profile.name}` to repair it (it falls back to the previous generation, or "
                           "rebuilds)") from None
        try:
            self._check_identity(profile, embedder)
            self.lexical: BM25Index | None = None
            if self.mode in ("bm25", "hybrid"):
                self._check_lexical(profile)
                self.lexical = self.reader.lexical()
        except BaseException:
            self.reader.close()
            raise
        self.collection, self.build_info = self.reader.collection, self.reader.info
        vector_store = ChromaVectorStore(chroma_collection=self.collection)
        self.index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embedder.model)

    def _check_identity(self, profile: Profile, embedder: Embedder) -> None:
        """Refuse a store built by another embedder (or with other prefixes): its vectors mean nothing here."""
        info = self.reader.info
        mismatch = {k: (info.get(k), v) for k, v in embedder.identity().items() if info.get(k) != v}
        if mismatch:
            what = ", ".join(f"{k}: store has {a!r}, query uses {b!r}" for k, (a, b) in mismatch.items())
            raise JobError(f"store {stores.describe(profile)} was built with another embedder ({what}); "
                           "re-run `make ingest`")

    @property
    def generation(self) -> str:
        return self.reader.generation

    def file_hashes(self) -> dict[str, str]:
        """Every source file the store holds, with the sha1 of the bytes it was chunked from."""
        return {str(m.get("path")): str(m.get("file_sha", "")) for got in pages(self.collection, ["metadatas"])
                for m in got["metadatas"]}

    def _check_lexical(self, profile: Profile) -> None:
        built, wanted = self.reader.info.get("lexical"), lexical_spec(profile.retrieval.heading_weight)
        if built is not None and built != wanted:
            raise JobError(f"store {stores.describe(profile)}: its lexical index is '{built}', the profile asks for "
                           f"'{wanted}': re-run `make ingest PROFILE={profile.name}` (it rebuilds the lexical index "
                           "only)")

    def paths(self) -> set[str]:
        return set(self.file_hashes())

    def dense(self, question: str, k: int) -> list[Hit]:
        nodes = self.index.as_retriever(similarity_top_k=k).retrieve(question)
        return [Hit(chunk_id=n.node.node_id, path=str(n.node.metadata.get("path", "")),
                    heading=str(n.node.metadata.get("heading", "")), score=_cosine(n), text=n.node.get_content())
                for n in nodes]

    def _fetch(self, scored: list[tuple[str, float]]) -> list[Hit]:
        if not scored:
            return []
        page = self.collection.get(ids=[cid for cid, _ in scored], include=["documents", "metadatas"])
        found = {cid: (doc, meta) for cid, doc, meta in zip(page["ids"], page["documents"], page["metadatas"])}
        hits = []
        for cid, score in scored:
            if cid in found:
                text, meta = found[cid]
                hits.append(Hit(chunk_id=cid, path=str(meta.get("path", "")), heading=str(meta.get("heading", "")),
                                score=score, text=text))
        return hits

    def bm25(self, question: str, k: int) -> list[Hit]:
        assert self.lexical is not None
        return self._fetch(self.lexical.search(question, k))

    def hybrid(self, question: str, k: int) -> list[Hit]:
        depth = max(k, self.fusion_depth)
        return fuse(self.dense(question, depth), self.bm25(question, depth), k, self.rrf_k, self.bm25_weight,
                    self.fusion)

    def describe(self) -> str:
        lexical = self.build_info.get("lexical", "")
        heading = f", {lexical.split(', ')[1]}" if ", heading" in lexical else ""
        fusion = f"RRF k={self.rrf_k}" if self.fusion == "rrf" else "relative-score fusion"
        out = self.mode if self.mode != "hybrid" else (
            f"hybrid ({fusion}, bm25 weight {self.bm25_weight:g}, depth {self.fusion_depth}{heading})")
        if self.rewriter is not None:
            out += f" + the question's {self.rewriter.describe()} (weight {self.rewrite_weight:g})"
        return out

    def rewrite_of(self, question: str) -> str:
        """The rewritten query retrieval also used for ``question`` ("" when none)."""
        return self.rewriter.translation(question) if self.rewriter is not None else ""

    def retrieve(self, question: str, k: int) -> list[Hit]:
        search = getattr(self, self.mode)
        rewritten = self.rewrite_of(question)
        if not rewritten:
            return search(question, k)
        # Both queries' rankings fused like the two retrievers: files first, each file's best chunks in turn.
        # By rank: the two lists' scores are already fused scores, not comparable across queries.
        depth = max(k, self.fusion_depth)
        return fuse(search(question, depth), search(rewritten, depth), k, self.rrf_k, self.rewrite_weight)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> StoreRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
