"""What every store backend shares: the collection's index settings, its build record, and reading it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import chromadb
from chromadb.config import Settings

from jobs.common.errors import JobError

BUILD_PREFIX = "build."
LEXICAL = "lexical"  # the BM25 index's folder (inside a generation, or in the local cache)
# The vector index. Chroma's defaults (ef 100/100, multithreaded inserts) build a different HNSW graph
# each time, so two builds of one corpus can retrieve differently; at a docs-sized store, search this wide is
# exact up to ties and costs milliseconds, so a rebuild cannot move a nightly score (decision D06).
HNSW = {"space": "cosine", "ef_construction": 200, "ef_search": 500}
INDEX_SPEC = "hnsw " + " ".join(f"{k}={v}" for k, v in HNSW.items())
# Settings whose change makes every stored vector, chunk boundary or the index wrong: a full rebuild.
REBUILD_KEYS = ("embedder", "embedder_dtype", "embedder_dim", "embedder_window", "query_prefix", "passage_prefix",
                "chunk_size", "chunk_overlap", "code_max_lines", "chunker_version", "index")
PAGE = 2000


class DamagedStore(JobError):
    """A generation whose files are not what was published (truncated, overwritten) or that Chroma cannot read."""


def client_settings() -> Settings:
    return Settings(anonymized_telemetry=False, allow_reset=False)


@dataclass(frozen=True)
class StoredChunk:
    id: str
    text_sha: str
    metadata: dict


def read_build_info(collection: chromadb.Collection) -> dict:
    meta = collection.metadata or {}
    return {k[len(BUILD_PREFIX):]: v for k, v in meta.items() if k.startswith(BUILD_PREFIX)}


def build_metadata(info: dict) -> dict:
    """Flatten build info for Chroma's collection metadata (str/int/float/bool only)."""
    out = {}
    for k, v in info.items():
        out[BUILD_PREFIX + k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True)
    return out


def pages(collection: chromadb.Collection, include: list[str], page: int = PAGE):
    """Every record of a collection, a page at a time (one request each on a server)."""
    offset = 0
    while True:
        got = collection.get(include=include, limit=page, offset=offset)
        yield got
        if len(got["ids"]) < page:
            return
        offset += page


def chunk_texts(collection: chromadb.Collection) -> tuple[list[str], list[str], list[dict]]:
    """Every chunk's id, text and metadata, in store order (what a lexical index is built from)."""
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict] = []
    for got in pages(collection, ["documents", "metadatas"]):
        ids += list(got["ids"])
        texts += list(got["documents"])
        metas += list(got["metadatas"])
    return ids, texts, metas


def read_chunks(collection: chromadb.Collection) -> dict[str, StoredChunk]:
    out: dict[str, StoredChunk] = {}
    for got in pages(collection, ["metadatas"]):
        for cid, meta in zip(got["ids"], got["metadatas"]):
            out[cid] = StoredChunk(cid, str(meta.get("text_sha", "")), dict(meta))
    return out


def get_collection(c: chromadb.ClientAPI, name: str, *, create: bool) -> chromadb.Collection:
    # embedding_function=None: Chroma's default would download an ONNX model. We always pass vectors.
    if create:
        return c.get_or_create_collection(name=name, embedding_function=None, configuration={"hnsw": dict(HNSW)})
    try:
        return c.get_collection(name=name, embedding_function=None)
    except Exception as exc:  # chromadb raises NotFoundError / ValueError depending on version
        raise JobError(f"collection {name!r} not found in store: {str(exc).splitlines()[0]}") from None


def check_collection(coll: chromadb.Collection, info: dict, what: str) -> None:
    """The record count agrees with the build record, and the vector index loads and answers."""
    count = coll.count()
    if "chunks" in info and count != info["chunks"]:
        raise DamagedStore(f"{what}: {count} chunks stored, its build record says {info['chunks']}")
    if count:
        first = coll.get(limit=1, include=["embeddings"])
        coll.query(query_embeddings=[list(first["embeddings"][0])], n_results=1)
