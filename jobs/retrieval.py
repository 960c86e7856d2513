"""Retrieval over the store through LlamaIndex (VectorStoreIndex over ChromaVectorStore)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import NodeWithScore
from llama_index.vector_stores.chroma import ChromaVectorStore

from jobs import store as st
from jobs.config import Profile
from jobs.embedding import Embedder


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    path: str
    heading: str
    score: float  # cosine similarity
    text: str


def _cosine(node: NodeWithScore) -> float:
    # ChromaVectorStore reports exp(-distance); with the cosine space, distance = 1 - cosine.
    return 1.0 + math.log(node.score) if node.score and node.score > 0 else 0.0


class StoreRetriever:
    """Opens the live store (refusing another embedder's) and retrieves top-k chunks."""

    def __init__(self, profile: Profile, embedder: Embedder) -> None:
        self.client, self.collection, self.build_info = st.open_for_query(
            profile.store.path, profile.store.collection, embedder.identity()
        )
        vector_store = ChromaVectorStore(chroma_collection=self.collection)
        self.index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embedder.model)

    def retrieve(self, question: str, k: int) -> list[Hit]:
        nodes = self.index.as_retriever(similarity_top_k=k).retrieve(question)
        return [
            Hit(chunk_id=n.node.node_id, path=str(n.node.metadata.get("path", "")),
                heading=str(n.node.metadata.get("heading", "")), score=_cosine(n),
                text=n.node.get_content())
            for n in nodes
        ]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StoreRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
