"""The store on a Chroma server (``chroma run``, or Chroma's distributed deployment: the same HTTP API), for
teams that ingest on one machine and evaluate on another, or let other services query the same docs.

A symlink cannot be swapped on a server, so generations are blue/green collections::

    <collection>__live                  the pointer: its metadata names the live and the previous generation,
                                        and holds the single writer's lease (holder, token, expiry)
    <collection>__g<UTC time>-<rand>    one collection per generation, its build record in its metadata
    <collection>__r<rand>               a reader's lease on the generation it reads (generation, expiry)

An ingest writes a new generation collection: it copies over what is unchanged (vectors reused, never
re-embedded), applies its changes, checks the count, then switches the pointer with one metadata write.
Readers resolve the pointer once and hold a lease on that generation until they close: an eval never mixes
two generations, and garbage collection (under the writer's lease) deletes only generations that are
neither live, previous, nor leased, and the leftovers of killed ingests.

The single-writer lease: an ingest takes it when it is free or expired, waits a moment and reads it back to
be sure it won (two ingests racing both read the same winner), renews it every ``lease_s``/3 while it runs,
and checks it again just before publishing. Guaranteed: two ingests never both write one store unless one
of them stalls for longer than ``lease_s`` (then the other takes over, and the stalled one finds out at its
next check, at the latest before its publish). Not guaranteed: Chroma has no compare-and-swap, so a writer
paused between its last check and the pointer write could still publish over a newer one; expiry compares
the writers' wall clocks (keep them in sync). Readers need write access too: their leases are collections.

The BM25 index has no folder beside the vectors here. It is rebuilt from the generation's documents on a
machine's first use and cached under ``.cache/lexical/<server>/<generation>/``: a generation never changes
once published, so its name is a sound key (the ingest that builds a generation caches its index at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import chromadb

from jobs.config import Profile
from jobs.errors import JobError
from jobs.stores.base import Base, Generation
from jobs.stores.chroma import (
    HNSW,
    LEXICAL,
    DamagedStore,
    build_metadata,
    check_collection,
    chunk_texts,
    client_settings,
    get_collection,
    pages,
    read_build_info,
)

log = logging.getLogger(__name__)

POINTER = "__live"
GENERATION = "__g"
READER = "__r"
_SETTLE_S = 0.5  # between writing the lease and reading it back: two racing writers see the same winner


def _url(profile: Profile) -> str:
    return profile.store.url.rstrip("/")


def connect(profile: Profile) -> chromadb.ClientAPI:
    """A client of the profile's server; every way that can fail is one line naming the URL."""
    s = profile.store
    url = urlparse(s.url)
    headers = {}
    if s.auth_token_env:
        token = os.environ.get(s.auth_token_env)
        if not token:
            raise JobError(f"[store].auth_token_env names {s.auth_token_env}, which is not set")
        headers["x-chroma-token"] = token
    where = f"Chroma server {_url(profile)}"
    try:
        client = chromadb.HttpClient(host=url.hostname or "localhost", port=url.port or (443 if url.scheme == "https"
                                                                                          else 8000),
                                     ssl=url.scheme == "https", headers=headers, tenant=s.tenant,
                                     database=s.database, settings=client_settings())
        client.heartbeat()
    except Exception as exc:  # noqa: BLE001 - chromadb raises ValueError, NotFoundError, auth and httpx errors
        raise JobError(_explain(exc, where, profile)) from None
    return client


def _explain(exc: BaseException, where: str, profile: Profile) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if "could not connect" in lowered or "connect" in type(exc).__name__.lower():
        return f"cannot reach the Chroma server at {_url(profile)}: is it running? (`make serve-store` starts a local one)"
    if "tenant" in lowered and "not found" in lowered:
        return f"{where} has no tenant {profile.store.tenant!r} ({text})"
    if "database" in lowered and "not found" in lowered:
        return f"{where} has no database {profile.store.database!r} in tenant {profile.store.tenant!r}"
    if any(x in lowered for x in ("401", "403", "unauthorized", "forbidden", "auth")):
        return (f"{where} refused the token ({text}): check ${profile.store.auth_token_env or '(no auth_token_env)'}")
    return f"{where}: {type(exc).__name__}: {text}"


def _collection(client: chromadb.ClientAPI, name: str) -> chromadb.Collection | None:
    try:
        return client.get_collection(name=name, embedding_function=None)
    except Exception:  # noqa: BLE001 - NotFoundError, or ValueError on older servers
        return None


def _pointer_meta(client: chromadb.ClientAPI, name: str) -> dict:
    ptr = _collection(client, name + POINTER)
    return dict(ptr.metadata or {}) if ptr is not None else {}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class _Heartbeat:
    """Calls ``beat`` every ``every_s`` seconds on a daemon thread until stopped."""

    def __init__(self, every_s: float, beat) -> None:  # noqa: ANN001
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s, beat), daemon=True)
        self._thread.start()

    def _run(self, every_s: float, beat) -> None:  # noqa: ANN001
        while not self._stop.wait(every_s):
            try:
                beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease is checked before use
                log.warning("lease renewal failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- readers -----------------------------------------------------------------------------------

class ServerReader:
    """The live generation of a server store, resolved once and leased until ``close``."""

    def __init__(self, profile: Profile) -> None:
        self.profile, self.name = profile, profile.store.collection
        self.client = connect(profile)
        self.where = f"Chroma server {_url(profile)}, collection {self.name}"
        self._lease: chromadb.Collection | None = None
        self._beat: _Heartbeat | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        for _ in range(5):
            live = str(_pointer_meta(self.client, self.name).get("live") or "")
            if not live:
                raise JobError(f"no store at {self.where}: run `make ingest` with this --store-url first")
            self._take_lease(live)
            coll = _collection(self.client, live)
            if coll is None:  # collected between resolving and leasing: resolve again
                self._drop_lease()
                continue
            self.generation, self.collection = live, coll
            self.info = read_build_info(coll)
            try:
                check_collection(coll, self.info, f"generation {live}")
            except DamagedStore:
                raise
            except Exception as exc:  # noqa: BLE001
                raise DamagedStore(f"generation {live}: {exc}") from None
            return
        raise JobError(f"{self.where}: the live generation kept changing while it was being opened; try again")

    def _take_lease(self, generation: str) -> None:
        ttl = self.profile.store.lease_s
        meta = {"generation": generation, "holder": f"{socket.gethostname()}:{os.getpid()}",
                "expires": time.time() + ttl}
        self._lease = self.client.create_collection(f"{self.name}{READER}{uuid.uuid4().hex[:12]}",
                                                    embedding_function=None, metadata=meta)

        def renew() -> None:
            self._lease.modify(metadata={**meta, "expires": time.time() + ttl})

        self._beat = _Heartbeat(ttl / 3, renew)

    def _drop_lease(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._lease is not None:
            with contextlib.suppress(Exception):
                self.client.delete_collection(self._lease.name)
            self._lease = None

    def lexical(self):  # noqa: ANN201 - BM25Index
        return lexical_index(self.profile, self.generation, self.collection)

    def close(self) -> None:
        self._drop_lease()


def _cache_dir(profile: Profile, generation: str) -> Path:
    s = profile.store
    server = hashlib.sha1(f"{_url(profile)}|{s.tenant}|{s.database}".encode()).hexdigest()[:12]
    return profile.paths.cache / LEXICAL / server / generation


def lexical_index(profile: Profile, generation: str, collection: chromadb.Collection):  # noqa: ANN201
    """The generation's BM25 index: from the local cache, else rebuilt from its documents and cached."""
    from jobs.files import publish_folder
    from jobs.lexical import BM25Index, index_chunks

    folder = _cache_dir(profile, generation)
    if folder.is_dir():
        try:
            index = BM25Index.load(folder / LEXICAL)
            if len(index) == collection.count():
                return index
        except ValueError as exc:
            log.warning("rebuilding the cached lexical index of %s: %s", generation, exc)
    started = time.perf_counter()
    # Built as the generation's own record says (the ingest that published it used the same setting).
    index = index_chunks(*chunk_texts(collection), int(read_build_info(collection).get("heading_weight", 1)))
    cache_lexical(profile, generation, index, publish_folder)
    log.info("built the lexical index of %s from %d documents in %.1fs (cached in %s)", generation, len(index),
             time.perf_counter() - started, folder)
    return index


def cache_lexical(profile: Profile, generation: str, index, publish_folder=None) -> None:  # noqa: ANN001
    if publish_folder is None:
        from jobs.files import publish_folder
    folder = _cache_dir(profile, generation)
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)

    def build(tmp: Path) -> str:
        index.save(tmp / LEXICAL)
        return generation

    publish_folder(folder, ".complete", build)


# ---- the writer --------------------------------------------------------------------------------

class ServerWriter:
    def __init__(self, profile: Profile, client: chromadb.ClientAPI) -> None:
        self.profile, self.client, self.name = profile, client, profile.store.collection
        self.where = f"Chroma server {_url(profile)}, collection {self.name}"
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._building: str | None = None
        self._lock = threading.Lock()  # the heartbeat and the publish both write the pointer
        self._beat: _Heartbeat | None = None
        self.pointer = _collection(client, self.name + POINTER) or self._create_pointer()

    def _create_pointer(self) -> chromadb.Collection:
        # Not get_or_create: given metadata, it would overwrite an existing pointer's.
        try:
            return self.client.create_collection(self.name + POINTER, embedding_function=None,
                                                 metadata={"live": "", "previous": ""})
        except Exception:  # noqa: BLE001 - another ingest created it first
            found = _collection(self.client, self.name + POINTER)
            if found is None:
                raise
            return found

    # -- the lease --
    def _meta(self) -> dict:
        return _pointer_meta(self.client, self.name)

    def acquire(self) -> None:
        meta = self._meta()
        now = time.time()
        held = meta.get("lease_token") and float(meta.get("lease_expires") or 0) > now
        if held and meta.get("lease_token") != self.token:
            raise JobError(f"{self.where} is being written by another ingest ({meta.get('lease_holder')}, lease "
                           f"until {_iso(float(meta['lease_expires']))}); try again later")
        if meta.get("lease_token"):
            log.warning("taking over the expired lease of %s (expired %s)", meta.get("lease_holder"),
                        _iso(float(meta.get("lease_expires") or 0)))
        self._write_lease(meta)
        time.sleep(_SETTLE_S)
        if self._meta().get("lease_token") != self.token:
            raise JobError(f"{self.where}: another ingest took the lease at the same moment; try again later")
        self._beat = _Heartbeat(self.profile.store.lease_s / 3, self.renew)

    def _write_lease(self, meta: dict, **changes: object) -> None:
        with self._lock:
            self.pointer.modify(metadata={**meta, "lease_holder": self.holder, "lease_token": self.token,
                                          "lease_expires": time.time() + self.profile.store.lease_s, **changes})

    def renew(self) -> None:
        meta = self._meta()
        if meta.get("lease_token") == self.token:
            self._write_lease(meta)

    def _check_lease(self) -> dict:
        meta = self._meta()
        if meta.get("lease_token") != self.token:
            raise JobError(f"{self.where}: this ingest lost its lease to {meta.get('lease_holder')} (it stalled for "
                           "longer than store.lease_s?); nothing was published")
        return meta

    def release(self) -> None:
        if self._beat is not None:
            self._beat.stop()
        with contextlib.suppress(Exception):
            meta = self._meta()
            if meta.get("lease_token") == self.token:
                with self._lock:
                    self.pointer.modify(metadata={**meta, "lease_holder": "", "lease_token": "",
                                                  "lease_expires": 0.0})

    # -- the interface --
    def base(self) -> Base:
        meta = self._meta()
        for key in ("live", "previous"):
            name = str(meta.get(key) or "")
            coll = _collection(self.client, name) if name else None
            if coll is None:
                continue
            info = read_build_info(coll)
            try:
                check_collection(coll, info, f"generation {name}")
            except Exception as exc:  # noqa: BLE001
                log.warning("%s generation %s is not sound (%s); trying the previous one", key, name, exc)
                continue
            if key == "previous":
                log.warning("recovering from generation %s (the live one is not sound)", name)
            return Base(coll, info, is_live=key == "live")
        return Base(None, {}, is_live=False, rebuilt=bool(meta.get("live")))

    def empty(self) -> Base:
        return Base(None, {}, is_live=False, rebuilt=True)

    def create(self, base: Base, exclude: set[str]) -> Generation:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        name = f"{self.name}{GENERATION}{stamp}-{uuid.uuid4().hex[:6]}"
        self._building = name
        coll = self.client.create_collection(name=name, embedding_function=None,
                                             configuration={"hnsw": dict(HNSW)}, metadata={"state": "building"})
        if base.collection is not None:
            for got in pages(base.collection, ["embeddings", "documents", "metadatas"], page=1000):
                keep = [i for i, cid in enumerate(got["ids"]) if cid not in exclude]
                if keep:
                    coll.add(ids=[got["ids"][i] for i in keep], embeddings=[got["embeddings"][i] for i in keep],
                             documents=[got["documents"][i] for i in keep],
                             metadatas=[got["metadatas"][i] for i in keep])
        return Generation(name, coll)

    def publish(self, gen: Generation, info: dict, lexical) -> str:  # noqa: ANN001 - BM25Index
        gen.collection.modify(metadata=build_metadata(info))
        check_collection(gen.collection, info, f"generation {gen.name}")
        cache_lexical(self.profile, gen.name, lexical)
        meta = self._check_lease()
        live = str(meta.get("live") or "")
        self._write_lease(meta, live=gen.name, previous=live)  # the one write that publishes
        self._building = None
        self.collect_garbage()
        return gen.name

    def collect_garbage(self) -> int:
        """Delete generations that are not live, previous or leased by a reader, and expired reader leases."""
        meta = self._meta()
        now = time.time()
        keep = {str(meta.get("live") or ""), str(meta.get("previous") or ""), self._building or ""}
        names = [c.name if hasattr(c, "name") else str(c) for c in self.client.list_collections()]
        for name in names:
            if name.startswith(self.name + READER):
                lease = _collection(self.client, name)
                if lease is None:
                    continue
                if float((lease.metadata or {}).get("expires") or 0) < now:
                    with contextlib.suppress(Exception):
                        self.client.delete_collection(name)
                else:
                    keep.add(str((lease.metadata or {}).get("generation")))
        removed = 0
        for name in names:
            if name.startswith(self.name + GENERATION) and name not in keep:
                with contextlib.suppress(Exception):
                    self.client.delete_collection(name)
                    removed += 1
                    log.info("deleted generation %s", name)
        return removed

    def close(self) -> None:
        if self._building is not None:  # a failed ingest: its half-built generation goes now
            with contextlib.suppress(Exception):
                self.client.delete_collection(self._building)
            self._building = None
        self.release()


@contextlib.contextmanager
def writer(profile: Profile) -> Iterator[ServerWriter]:
    client = connect(profile)
    w = ServerWriter(profile, client)
    w.acquire()
    try:
        w.collect_garbage()
        yield w
    finally:
        w.close()
