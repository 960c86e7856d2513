"""The persistent Chroma store: generations swapped atomically, a lock, and a record of what built it.

Layout for a store path ``stores/xtuner``::

    stores/xtuner                 -> symlink to the live generation
    stores/.xtuner.gens/<gen>/    Chroma PersistentClient folders (the live one and the previous one)
    stores/.xtuner.lock           flock held by the one ingest that may write

An ingest never writes to the live generation: it copies it, applies its changes to the copy,
closes Chroma, then swaps the symlink with one ``rename``. A kill -9 at any moment therefore leaves
the old generation live (and a stale copy that the next run deletes) or the new one: never a
half-built store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import chromadb
from chromadb.config import Settings

from jobs.errors import JobError

log = logging.getLogger(__name__)

BUILD_PREFIX = "build."
LEXICAL = "lexical"  # the BM25 index's folder inside a generation
# The vector index. Chroma's defaults (ef 100/100, multithreaded inserts) build a different HNSW graph
# each time, and two builds of the same corpus disagreed on 2 of 69 questions' top-20; at a docs-sized
# store, search this wide is exact up to ties and costs milliseconds, so a rebuild cannot move a nightly score.
HNSW = {"space": "cosine", "ef_construction": 200, "ef_search": 500}
INDEX_SPEC = "hnsw " + " ".join(f"{k}={v}" for k, v in HNSW.items())
# Settings whose change makes every stored vector, chunk boundary or the index wrong: a full rebuild.
REBUILD_KEYS = ("embedder", "embedder_dtype", "embedder_dim", "embedder_window", "query_prefix", "passage_prefix",
                "chunk_size", "chunk_overlap", "code_max_lines", "chunker_version", "index")
_GET_PAGE = 2000


def _settings() -> Settings:
    return Settings(anonymized_telemetry=False, allow_reset=False)


def gens_dir(store: Path) -> Path:
    return store.parent / f".{store.name}.gens"


def lock_path(store: Path) -> Path:
    return store.parent / f".{store.name}.lock"


def live_generation(store: Path) -> Path | None:
    if store.is_symlink():
        target = store.resolve()
        return target if target.is_dir() else None
    if store.exists():
        raise JobError(
            f"store {store} is a plain folder, not a store written by jobs.ingest (expected a link to "
            f"{gens_dir(store)}/...): move it away or pick another --store"
        )
    return None


@contextlib.contextmanager
def ingest_lock(store: Path) -> Iterator[None]:
    """Refuse a second concurrent ingest of the same store. The OS drops the lock if we die."""
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise JobError(f"store {store} is locked by another ingest (pid {holder}); try again later") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def client(folder: Path) -> Iterator[chromadb.ClientAPI]:
    c = chromadb.PersistentClient(path=str(folder), settings=_settings())
    try:
        yield c
    finally:
        c.close()


@dataclass(frozen=True)
class StoredChunk:
    id: str
    text_sha: str
    metadata: dict


def read_build_info(collection: chromadb.Collection) -> dict:
    meta = collection.metadata or {}
    return {k[len(BUILD_PREFIX):]: v for k, v in meta.items() if k.startswith(BUILD_PREFIX)}


def read_chunks(collection: chromadb.Collection) -> dict[str, StoredChunk]:
    out: dict[str, StoredChunk] = {}
    offset = 0
    while True:
        page = collection.get(include=["metadatas"], limit=_GET_PAGE, offset=offset)
        for cid, meta in zip(page["ids"], page["metadatas"]):
            out[cid] = StoredChunk(cid, str(meta.get("text_sha", "")), dict(meta))
        if len(page["ids"]) < _GET_PAGE:
            return out
        offset += _GET_PAGE


def get_collection(c: chromadb.ClientAPI, name: str, *, create: bool) -> chromadb.Collection:
    # embedding_function=None: Chroma's default would download an ONNX model. We always pass vectors.
    if create:
        return c.get_or_create_collection(
            name=name, embedding_function=None, configuration={"hnsw": dict(HNSW)}
        )
    try:
        return c.get_collection(name=name, embedding_function=None)
    except Exception as exc:  # chromadb raises NotFoundError / ValueError depending on version
        raise JobError(f"collection {name!r} not found in store: {exc}") from None


def new_generation(store: Path, live: Path | None) -> Path:
    """A private copy of the live generation (or an empty folder) to apply changes to."""
    root = gens_dir(store)
    root.mkdir(parents=True, exist_ok=True)
    # Microseconds: names sort by age, and two runs in one second never collide.
    gen = root / f"g{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.tmp"
    if live is not None:
        shutil.copytree(live, gen)
    else:
        gen.mkdir()
    return gen


def publish(store: Path, gen: Path) -> Path:
    """Make ``gen`` live with one atomic rename of a symlink; keep the previous generation."""
    final = gen.with_name(gen.name.removesuffix(".tmp"))
    os.replace(gen, final)
    tmp_link = store.with_name(f".{store.name}.link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    os.symlink(os.path.relpath(final, store.parent), tmp_link)
    os.replace(tmp_link, store)
    _fsync_dir(store.parent)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def collect_garbage(store: Path, keep: int = 2) -> int:
    """Delete stale copies from killed runs and all but the newest ``keep`` generations (live kept)."""
    root = gens_dir(store)
    if not root.is_dir():
        return 0
    live = live_generation(store)
    removed = 0
    gens = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    finished = [p for p in gens if not p.name.endswith(".tmp")]
    for p in gens:
        if p == live:
            continue
        if p.name.endswith(".tmp") or p not in finished[:keep]:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


def open_for_query(store: Path, collection: str, identity: dict
                   ) -> tuple[chromadb.ClientAPI, chromadb.Collection, dict, Path]:
    """Open the live generation read-only, refusing a store built by another embedder."""
    live = live_generation(store)
    if live is None:
        raise JobError(f"no store at {store}: run `make ingest` (or python -m jobs.ingest) first")
    c = chromadb.PersistentClient(path=str(live), settings=_settings())
    coll = get_collection(c, collection, create=False)
    info = read_build_info(coll)
    mismatch = {k: (info.get(k), v) for k, v in identity.items() if info.get(k) != v}
    if mismatch:
        c.close()
        what = ", ".join(f"{k}: store has {a!r}, query uses {b!r}" for k, (a, b) in mismatch.items())
        raise JobError(f"store {store} was built with another embedder ({what}); re-run `make ingest`")
    return c, coll, info, live


def build_metadata(info: dict) -> dict:
    """Flatten build info for Chroma's collection metadata (str/int/float/bool only)."""
    out = {}
    for k, v in info.items():
        out[BUILD_PREFIX + k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True)
    return out
