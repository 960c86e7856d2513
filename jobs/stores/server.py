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

The single-writer lease: an ingest takes it when it is free or expired (or at once when its holder was an
ingest on this very host, same host name, boot and PID namespace, whose process is gone: a killed ingest does
not block the next one for ``lease_s``), waits a moment and reads it back to be sure it won (two ingests racing
both read the same winner), renews it every ``lease_s``/3 while it runs, and checks it again just before
publishing. ``break_lease`` (``python -m jobs.ingest --break-lease``) lets an operator clear it by hand.
Guaranteed: two ingests never both write one store unless one of them stalls for longer than ``lease_s`` (then
the other takes over, and the stalled one finds out at its next check, at the latest before its publish), or
its lease is broken by hand. Not guaranteed: Chroma has no compare-and-swap, so a writer paused between its
last check and the pointer write could still publish over a newer one; expiry compares the writers' wall
clocks (keep them in sync). Readers need write access too: their leases are collections.

Losing the server mid-ingest: a failed renewal marks the writer unhealthy; the ingest checks the writer between
slices of its embedding (``check_healthy``: the server answers and the lease is still ours), and a connection
error of any call to the server becomes one line (exit 4, ``EXIT_STOPPED``): nothing was published, the live
generation is as it was, run the ingest again.

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
import httpx

from jobs.common.config import Profile
from jobs.common.errors import EXIT_STOPPED, JobError
from jobs.common.files import pid_alive
from jobs.stores.base import Base, Generation
from jobs.stores.chroma import (
    HNSW,
    LEXICAL,
    DamagedStore,
    build_metadata,
    check_collection,
    chunk_texts,
    client_settings,
    pages,
    read_build_info,
)
from jobs.common.urls import redact, redact_text

log = logging.getLogger(__name__)

POINTER = "__live"
GENERATION = "__g"
READER = "__r"
_SETTLE_S = 0.5  # between writing the lease and reading it back: two racing writers see the same winner
_CHECK_EVERY_S = 1.0  # check_healthy asks the server at most this often (one small GET)
# What a dead or unreachable server raises from any call (refused, reset, cut off mid-answer, timed out).
LOST = (httpx.TransportError,)


def _url(profile: Profile) -> str:
    """The server's URL as messages and logs show it: never with credentials."""
    return redact(profile.store.url.rstrip("/"))


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def lost_server(profile: Profile, exc: BaseException) -> JobError:
    """The one line for a server that went away during an ingest (exit 4: stopped half-way, run it again)."""
    return JobError(f"lost the Chroma server at {_url(profile)} during the ingest ({_reason(exc)}): nothing was "
                    "published, the store is as it was; run the ingest again", exit_code=EXIT_STOPPED)


@contextlib.contextmanager
def _server_calls(profile: Profile) -> Iterator[None]:
    """Connection errors of the server calls inside become ``lost_server``'s one line."""
    try:
        yield
    except LOST as exc:
        raise lost_server(profile, exc) from None


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
    text = redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    lowered = text.lower()
    if "could not connect" in lowered or "connect" in type(exc).__name__.lower():
        return (f"cannot reach the Chroma server at {_url(profile)}: is it running? (`make serve-store` starts a "
                "local one)")
    if "tenant" in lowered and "not found" in lowered:
        return f"{where} has no tenant {profile.store.tenant!r} ({text})"
    if "database" in lowered and "not found" in lowered:
        return f"{where} has no database {profile.store.database!r} in tenant {profile.store.tenant!r}"
    if any(x in lowered for x in ("401", "403", "unauthorized", "forbidden", "auth")):
        return (f"{where} refused the token ({text}): check ${profile.store.auth_token_env or '(no auth_token_env)'}")
    return f"{where}: {type(exc).__name__}: {text}"


def _collection(client: chromadb.ClientAPI, name: str) -> chromadb.Collection | None:
    """The collection, or None when the server has none of that name (a server that does not answer raises)."""
    try:
        return client.get_collection(name=name, embedding_function=None)
    except LOST:
        raise
    except Exception:  # noqa: BLE001 - NotFoundError, or ValueError on older servers
        return None


def _pointer_meta(client: chromadb.ClientAPI, name: str) -> dict:
    ptr = _collection(client, name + POINTER)
    return dict(ptr.metadata or {}) if ptr is not None else {}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class _Heartbeat:
    """Calls ``beat`` every ``every_s`` seconds on a daemon thread until stopped; a beat that fails is logged
    and handed to ``failed`` (the writer then checks the server at once)."""

    def __init__(self, every_s: float, beat, failed=None) -> None:  # noqa: ANN001
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s, beat, failed), daemon=True)
        self._thread.start()

    def _run(self, every_s: float, beat, failed) -> None:  # noqa: ANN001
        while not self._stop.wait(every_s):
            try:
                beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease is checked before use
                log.warning("lease renewal failed: %s", _reason(exc))
                if failed is not None:
                    failed(exc)

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
        except LOST as exc:
            self.close()
            raise JobError(f"lost the Chroma server at {_url(profile)} while opening the store ({_reason(exc)})") \
                from None
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
    server = hashlib.sha1(f"{s.url.rstrip('/')}|{s.tenant}|{s.database}".encode()).hexdigest()[:12]
    return profile.paths.cache / LEXICAL / server / generation


def lexical_index(profile: Profile, generation: str, collection: chromadb.Collection):  # noqa: ANN201
    """The generation's BM25 index: from the local cache, else rebuilt from its documents and cached."""
    from jobs.common.files import publish_folder
    from jobs.stores.lexical import BM25Index, index_chunks

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
        from jobs.common.files import publish_folder
    folder = _cache_dir(profile, generation)
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)

    def build(tmp: Path) -> str:
        index.save(tmp / LEXICAL)
        return generation

    publish_folder(folder, ".complete", build)


# ---- the writer --------------------------------------------------------------------------------

def _host_id() -> str:
    """This machine's boot and PID namespace: a pid recorded under the same host name and host id is one this
    process can check (two containers may share a host name, never a PID namespace)."""
    parts = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip(),
                 lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return ":".join(parts)


def _local_pid(meta: dict) -> int | None:
    """The lease holder's pid when it was a process of this host (and PID namespace), else None."""
    host, _, pid = str(meta.get("lease_holder") or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or str(meta.get("lease_host") or "") != _host_id():
        return None
    return int(pid)


def _dead_local_holder(meta: dict) -> bool:
    pid = _local_pid(meta)
    return pid is not None and pid != os.getpid() and not pid_alive(pid)


class ServerWriter:
    def __init__(self, profile: Profile, client: chromadb.ClientAPI) -> None:
        self.profile, self.client, self.name = profile, client, profile.store.collection
        self.where = f"Chroma server {_url(profile)}, collection {self.name}"
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._building: str | None = None
        self._lock = threading.Lock()  # the heartbeat and the publish both write the pointer
        self._beat: _Heartbeat | None = None
        self._missed: BaseException | None = None  # the heartbeat's last failure, until a check clears it
        self._checked = 0.0
        self.pointer = _collection(client, self.name + POINTER) or self._create_pointer()

    def _create_pointer(self) -> chromadb.Collection:
        # Not get_or_create: given metadata, it would overwrite an existing pointer's.
        try:
            return self.client.create_collection(self.name + POINTER, embedding_function=None,
                                                 metadata={"live": "", "previous": ""})
        except LOST:
            raise
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
            if _dead_local_holder(meta):
                log.warning("taking over the lease of %s at once: that ingest ran on this host and its process is "
                            "gone (the lease would have held until %s)", meta.get("lease_holder"),
                            _iso(float(meta["lease_expires"])))
            else:
                raise JobError(f"{self.where} is being written by another ingest ({meta.get('lease_holder')}, lease "
                               f"until {_iso(float(meta['lease_expires']))}); try again later, or break the lease "
                               "with `python -m jobs.ingest --break-lease` if that ingest is gone")
        elif meta.get("lease_token"):
            log.warning("taking over the expired lease of %s (expired %s)", meta.get("lease_holder"),
                        _iso(float(meta.get("lease_expires") or 0)))
        self._write_lease(meta)
        time.sleep(_SETTLE_S)
        if self._meta().get("lease_token") != self.token:
            raise JobError(f"{self.where}: another ingest took the lease at the same moment; try again later")
        self._checked = time.monotonic()
        self._beat = _Heartbeat(self.profile.store.lease_s / 3, self.renew, self._missed_beat)

    def _write_lease(self, meta: dict, **changes: object) -> None:
        with self._lock:
            self.pointer.modify(metadata={**meta, "lease_holder": self.holder, "lease_token": self.token,
                                          "lease_host": _host_id(),
                                          "lease_expires": time.time() + self.profile.store.lease_s, **changes})

    def renew(self) -> None:
        meta = self._meta()
        if meta.get("lease_token") == self.token:
            self._write_lease(meta)
        else:  # taken over or broken: the ingest stops at its next check
            self._missed_beat(JobError("the lease is no longer this ingest's"))

    def _missed_beat(self, exc: BaseException) -> None:
        self._missed = exc

    def _check_lease(self) -> dict:
        meta = self._meta()
        if meta.get("lease_token") != self.token:
            by = meta.get("lease_holder") or "nobody (it was broken with --break-lease?)"
            raise JobError(f"{self.where}: this ingest lost its lease to {by} (it stalled for longer than "
                           "store.lease_s, or the lease was broken); nothing was published")
        return meta

    def check_healthy(self) -> None:
        """Raise the one-line error at once when the server is gone or the lease lost (asks the server at most
        every ``_CHECK_EVERY_S``, and right after a failed renewal)."""
        if self._missed is None and time.monotonic() - self._checked < _CHECK_EVERY_S:
            return
        with _server_calls(self.profile):
            self._check_lease()
            if self._missed is not None:  # the renewal failed, but the server answers again: renew now
                log.info("the Chroma server answers again after a failed lease renewal")
                self._missed = None
                self.renew()
        self._checked = time.monotonic()

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
            except LOST:
                raise
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
        # From here the generation may be live: a failure must not delete it (if the pointer write did not
        # land, the next ingest collects it as a leftover).
        self._building = None
        try:
            self._write_lease(meta, live=gen.name, previous=live)  # the one write that publishes
        except LOST as exc:
            raise JobError(f"lost the Chroma server at {_url(self.profile)} while publishing {gen.name} "
                           f"({_reason(exc)}): it may or may not be live; run the ingest again (it publishes "
                           "nothing more if it is)", exit_code=EXIT_STOPPED) from None
        try:
            self.collect_garbage()
        except Exception as exc:  # noqa: BLE001 - published: what is left over, the next ingest collects
            log.warning("published %s, but could not collect old generations (%s): the next ingest will",
                        gen.name, _reason(exc))
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
    """The single writer; any connection error of a server call made inside (by the writer or on its
    collections) is ``lost_server``'s one line, exit 4."""
    client = connect(profile)
    with _server_calls(profile):
        w = ServerWriter(profile, client)
        w.acquire()
    try:
        with _server_calls(profile):
            w.collect_garbage()
            yield w
    finally:
        w.close()


def break_lease(profile: Profile, force: bool = False) -> str:
    """Clear the single-writer lease by hand (``python -m jobs.ingest --break-lease``); returns what was done.
    Refused when its holder is an ingest alive on this host, unless ``force``. An ingest whose lease is broken
    stops at its next check and publishes nothing."""
    client = connect(profile)
    where = f"Chroma server {_url(profile)}, collection {profile.store.collection}"
    try:
        pointer = _collection(client, profile.store.collection + POINTER)
        meta = dict(pointer.metadata or {}) if pointer is not None else {}
        if not meta.get("lease_token"):
            return f"no lease is held on {where}: nothing to break"
        holder, expires = meta.get("lease_holder") or "(unknown)", float(meta.get("lease_expires") or 0)
        pid = _local_pid(meta)
        if pid is not None and pid_alive(pid) and not force:
            raise JobError(f"the lease of {where} is held by {holder}, an ingest alive on this host (pid {pid}): "
                           "stop it first, or break the lease anyway with --break-lease --force")
        pointer.modify(metadata={**meta, "lease_holder": "", "lease_token": "", "lease_host": "",
                                 "lease_expires": 0.0})
    except LOST as exc:
        raise JobError(f"lost the Chroma server at {_url(profile)} ({_reason(exc)}): the lease was not broken") \
            from None
    state = f"expired {_iso(expires)}" if expires < time.time() else f"held until {_iso(expires)}"
    return f"broke the lease of {holder} on {where} ({state})"
