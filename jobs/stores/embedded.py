"""The embedded store (Chroma's PersistentClient, the one-machine default): immutable generations swapped
atomically, leases for readers, a lock for the one writer, and a record of what built it.

Layout for a store path ``stores/xtuner`` (a folder: it may be created by hand or be a mounted volume)::

    stores/xtuner/current         -> symlink to the live generation
    stores/xtuner/gens/<gen>/     Chroma PersistentClient folders (the live one and the previous one)
    stores/xtuner/gens/<gen>/MANIFEST.json   sha256 of every file of the generation, written last
    stores/xtuner/ingest.lock     flock held by the one ingest that may write

A published generation is never written again. Chroma writes to its sqlite file whenever a client
merely opens it, so nobody opens a published generation: an ingest applies its changes to a private
copy and publishes that copy with one ``rename`` of a symlink; a reader (eval, check) verifies and opens
a private copy too (milliseconds at this corpus size). Kill -9 at any moment leaves the old generation or
the new one live, never half of one. A reader holds a shared lease on its generation while it reads,
and garbage collection skips leased generations, so a publish can never delete what an eval is reading.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import chromadb

from jobs.common.errors import JobError
from jobs.common.files import pid_alive
from jobs.stores.base import Base, Generation
from jobs.stores.chroma import (
    LEXICAL,
    DamagedStore,
    check_collection,
    client_settings,
    get_collection,
    read_build_info,
)

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LEASE = ".lease"  # readers hold it shared; garbage collection needs it exclusive
SQLITE = "chroma.sqlite3"
_READER_PREFIX = "rag-store-reader-"
_RESOLVE_TRIES = 20


# ---- layout ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    root: Path  # the store path as configured
    link: Path  # the symlink naming the live generation
    gens: Path
    lock: Path


def layout(store: Path) -> Layout:
    """Where a store keeps its parts. An empty folder is adopted; a folder of other files is refused."""
    if store.exists() and not store.is_dir():
        raise JobError(f"store {store} is a file, not a store folder: pick another --store")
    if store.is_dir():
        foreign = sorted(p.name for p in store.iterdir() if p.name not in ("current", "gens", "ingest.lock"))
        if foreign:
            raise JobError(
                f"store {store} is a folder with other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}), not a store written by jobs.ingest: "
                "empty it or pick another --store"
            )
    return Layout(store, store / "current", store / "gens", store / "ingest.lock")


def gens_dir(store: Path) -> Path:
    return layout(store).gens


def live_generation(store: Path) -> Path | None:
    link = layout(store).link
    if not link.is_symlink():
        return None
    target = link.resolve()
    return target if target.is_dir() else None


# ---- write access ------------------------------------------------------------------------------

_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _read_only(store: Path, path: Path | str, outcome: str = "nothing was published") -> JobError:
    return JobError(f"store {store} cannot be written: {path} is read-only (a read-only mount, an immutable "
                    f"folder or no permission), and an ingest needs write access to the store folder; {outcome}")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(store: Path) -> None:
    """Refuse, before anything is locked, embedded or written, a store this process cannot write: its folder
    (the live link is swapped there), its generations' folder and its lock file (or, where they do not exist
    yet, the folder they would be created in)."""
    lay = layout(store)
    for path in (lay.link.parent, lay.gens, lay.lock):
        found = _nearest_existing(path)
        if not os.access(found, os.W_OK):
            raise _read_only(store, found, "nothing was written")


@contextlib.contextmanager
def _writes_to(store: Path) -> Iterator[None]:
    """A read-only error on one of the store's own paths becomes the one line (what ``check_writable`` could
    not see in advance: an ACL, a mount made read-only meanwhile); any other error passes unchanged."""
    lay = layout(store)
    parts = (lay.root, lay.link.parent, lay.gens, lay.lock)
    try:
        yield
    except OSError as exc:
        names = [Path(os.fsdecode(n)) for n in (exc.filename, exc.filename2) if n]
        ours = [n for n in names if any(n == p or n.is_relative_to(p) for p in parts)]
        if exc.errno in _READ_ONLY and ours:
            raise _read_only(store, ours[0].parent if ours[0].name.startswith(".") else ours[0]) from None
        raise


@contextlib.contextmanager
def ingest_lock(store: Path) -> Iterator[None]:
    """Refuse a second concurrent ingest of the same store. The OS drops the lock if we die."""
    path = layout(store).lock
    with _writes_to(store):
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


# ---- integrity ---------------------------------------------------------------------------------

def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, LEASE))


def write_manifest(gen: Path) -> None:
    """The sha256 of every file, written last: a generation with a manifest is whole."""
    from jobs.common.files import atomic_write, sha256_file

    files = {rel: sha256_file(gen / rel) for rel in _files(gen)}
    atomic_write(gen / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


def _copy_verified(src: Path, dest: Path) -> None:
    """Copy a generation, checking each file against its manifest while it is read (one pass)."""
    import hashlib

    manifest_path = src / MANIFEST
    expected: dict[str, str] | None = None
    if manifest_path.is_file():
        try:
            expected = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DamagedStore(f"{manifest_path}: unreadable manifest ({exc})") from None
    present = _files(src)
    if expected is not None and sorted(expected) != present:
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        raise DamagedStore(f"generation {src.name}: files differ from its manifest (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    for rel in present:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(src / rel, "rb") as fin, open(target, "wb") as fout:
            while block := fin.read(1 << 20):
                digest.update(block)
                fout.write(block)
        if expected is not None and digest.hexdigest() != expected[rel]:
            raise DamagedStore(f"generation {src.name}: {rel} is not the file that was published "
                               "(checksum mismatch: truncated or overwritten)")
    if expected is not None:
        shutil.copy2(manifest_path, dest / MANIFEST)


def _sqlite_problem(folder: Path) -> str | None:
    """SQLite's own quick check, read-only: None when the database is sound."""
    path = folder / SQLITE
    if not path.is_file():
        return f"{SQLITE} missing"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"{SQLITE}: {exc}"
    result = "; ".join(str(r[0]) for r in rows[:3])
    return None if result == "ok" else f"{SQLITE}: {result}"


@contextlib.contextmanager
def private_copy(gen: Path) -> Iterator[Path]:
    _remove_stale_reader_copies()
    copy = Path(tempfile.mkdtemp(prefix=f"{_READER_PREFIX}{os.getpid()}-"))
    try:
        _copy_verified(gen, copy)
        yield copy
    except DamagedStore:
        raise
    except OSError as exc:
        raise DamagedStore(f"generation {gen.name}: cannot be read ({exc})") from None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _remove_stale_reader_copies() -> None:
    """Private copies left by killed readers (their pid is in the name)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_READER_PREFIX}*"):
        pid = path.name.removeprefix(_READER_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class OpenCopy:
    client: chromadb.ClientAPI
    collection: chromadb.Collection
    info: dict

    def close(self) -> None:
        self.client.close()


def create_collection(folder: Path, name: str) -> OpenCopy:
    """An empty collection in a new working copy."""
    c = chromadb.PersistentClient(path=str(folder), settings=client_settings())
    return OpenCopy(c, get_collection(c, name, create=True), {})


def open_copy(copy: Path, gen: Path, name: str) -> OpenCopy:
    """Open a private copy of ``gen`` with Chroma; every way it can be broken is a DamagedStore."""
    problem = _sqlite_problem(copy)
    if problem:
        raise DamagedStore(f"generation {gen.name}: {problem}")
    try:
        c = chromadb.PersistentClient(path=str(copy), settings=client_settings())
    except Exception as exc:  # noqa: BLE001 - chromadb raises its own InternalError / sqlite errors
        raise DamagedStore(f"generation {gen.name}: Chroma cannot open it ({str(exc).splitlines()[0]})") from None
    try:
        coll = get_collection(c, name, create=False)
    except JobError:
        c.close()
        raise  # not damage: the store holds no such collection (another profile's, or a renamed one)
    try:
        info = read_build_info(coll)
        check_collection(coll, info, f"generation {gen.name}")
    except DamagedStore:
        c.close()
        raise
    except Exception as exc:  # noqa: BLE001
        c.close()
        raise DamagedStore(f"generation {gen.name}: Chroma cannot read it ({str(exc).splitlines()[0]})") from None
    return OpenCopy(c, coll, info)


# ---- leases ------------------------------------------------------------------------------------

@contextlib.contextmanager
def lease(store: Path) -> Iterator[Path]:
    """The live generation, held with a shared lease until the block ends: garbage collection skips it."""
    for _ in range(_RESOLVE_TRIES):
        gen = live_generation(store)
        if gen is None:
            raise JobError(f"no store at {store}: run `make ingest` (or python -m jobs.ingest) first")
        try:
            fd = os.open(gen / LEASE, os.O_RDONLY)
        except FileNotFoundError:
            if not gen.is_dir():
                continue  # collected between resolving and opening: resolve again
            fd = _create_lease(gen)  # a generation from before leases
        except PermissionError:
            fd = -1  # a read-only store nobody can collect from: no lease needed
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_SH)
            if not gen.is_dir():
                continue  # collected while we waited for the lease
            yield gen
            return
        finally:
            if fd >= 0:
                os.close(fd)
    raise JobError(f"store {store}: the live generation kept changing while it was being opened; try again")


def _create_lease(gen: Path) -> int:
    try:
        return os.open(gen / LEASE, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return -1


# ---- writing -----------------------------------------------------------------------------------

def new_generation(store: Path, base: Path | None) -> Path:
    """A private working copy of ``base`` (verified against its manifest), or an empty folder."""
    root = layout(store).gens
    root.mkdir(parents=True, exist_ok=True)
    # Microseconds: names sort by age, and two runs in one second never collide.
    gen = root / f"g{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.tmp"
    gen.mkdir()
    if base is not None:
        try:
            _copy_verified(base, gen)
        except BaseException:
            shutil.rmtree(gen, ignore_errors=True)
            raise
        (gen / MANIFEST).unlink(missing_ok=True)  # the copy will change: its manifest is written at publish
    return gen


def publish(store: Path, gen: Path) -> Path:
    """Seal ``gen`` (manifest, lease file) and make it live with one atomic rename of a symlink."""
    lay = layout(store)
    lay.root.parent.mkdir(parents=True, exist_ok=True)
    if lay.link != lay.root:
        lay.root.mkdir(exist_ok=True)
    write_manifest(gen)
    (gen / LEASE).touch()
    final = gen.with_name(gen.name.removesuffix(".tmp"))
    os.replace(gen, final)
    tmp_link = lay.link.with_name(f".{lay.link.name}.link-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        os.symlink(os.path.relpath(final, lay.link.parent), tmp_link)
        os.replace(tmp_link, lay.link)
    except BaseException:
        # Not live: back to a working copy, which the writer removes (never a finished-looking orphan).
        with contextlib.suppress(OSError):
            tmp_link.unlink()
        with contextlib.suppress(OSError):
            os.replace(final, gen)
        raise
    _fsync_dir(lay.link.parent)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finished_generations(store: Path) -> list[Path]:
    """Published generations, newest first."""
    root = layout(store).gens
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("g") and "." not in p.name),
                  key=lambda p: p.name, reverse=True)


def collect_garbage(store: Path, keep: int = 2) -> int:
    """Delete working copies of killed ingests, and generations beyond the newest ``keep`` (the live one
    always kept) that no reader holds. Called under the ingest lock, so no other working copy is live."""
    root = layout(store).gens
    if not root.is_dir():
        return 0
    keep_set = set(finished_generations(store)[:keep]) | {live_generation(store)}
    removed = 0
    for p in root.iterdir():
        if not p.is_dir() or p in keep_set:
            continue
        if p.name.endswith(".tmp") or ".deleting-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        else:
            removed += _delete_unleased(p)
    return removed


def _delete_unleased(gen: Path) -> int:
    try:
        fd = os.open(gen / LEASE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("keeping generation %s: a reader holds it", gen.name)
            return 0
        # Renamed first, under the lease: a reader that opens the lease now finds the name gone and retries.
        doomed = gen.with_name(f"{gen.name}.deleting-{os.getpid()}")
        os.replace(gen, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return 1
    finally:
        os.close(fd)



class Snapshot:
    """A read-only view of the live generation: leased for as long as it is open, verified against its
    manifest, and opened from a private copy, so a reader can neither damage the store nor lose it to
    a publish."""

    def __init__(self, store: Path, collection: str) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self.generation = self._stack.enter_context(lease(store))
            self.folder = self._stack.enter_context(private_copy(self.generation))
            opened = open_copy(self.folder, self.generation, collection)
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(opened.close)
        self.client, self.collection, self.info = opened.client, opened.collection, opened.info

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the interface (jobs.stores.base) ---------------------------------------------------------

class EmbeddedReader:
    def __init__(self, store: Path, collection: str) -> None:
        self.store = store
        self.snapshot = Snapshot(store, collection)
        self.collection, self.info = self.snapshot.collection, self.snapshot.info
        self.generation = self.snapshot.generation.name

    def lexical(self):  # noqa: ANN201 - BM25Index, imported lazily
        from jobs.stores.lexical import BM25Index

        try:
            return BM25Index.load(self.snapshot.folder / LEXICAL)
        except ValueError as exc:
            raise JobError(f"store {self.store} has no usable lexical index ({exc}); re-run `make ingest`") from None

    def close(self) -> None:
        self.snapshot.close()


class EmbeddedWriter:
    """The one ingest of a store folder (an flock). The base is a private, verified copy of the newest sound
    generation, and the next generation is that same copy changed in place, then published."""

    def __init__(self, store: Path, collection: str) -> None:
        self.store, self.name = store, collection
        self._folder: Path | None = None
        self._opened: OpenCopy | None = None
        self._published = False

    def base(self) -> Base:
        live = live_generation(self.store)
        candidates = ([live] if live else []) + [g for g in finished_generations(self.store) if g != live]
        for gen in candidates:
            folder = None
            try:
                folder = new_generation(self.store, gen)
                opened = open_copy(folder, gen, self.name)
            except DamagedStore as exc:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                log.warning("%s%s; trying the previous generation", "live " if gen == live else "", exc)
                continue
            except JobError as exc:  # no such collection: nothing to build on
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("store settings changed (%s): rebuilding from scratch", exc)
                return self.empty()
            if gen != live:
                log.warning("recovering from generation %s (the live one is damaged)", gen.name)
            self._folder, self._opened = folder, opened
            return Base(opened.collection, opened.info, is_live=gen == live,
                        has_lexical=(folder / LEXICAL).is_dir())
        if candidates:
            log.warning("no sound generation left in %s: rebuilding from scratch", self.store)
        return self.empty(rebuilt=bool(candidates))

    def empty(self, rebuilt: bool = True) -> Base:
        self.close()
        self._folder = new_generation(self.store, None)
        return Base(None, {}, is_live=False, rebuilt=rebuilt)

    def create(self, base: Base, exclude: set[str]) -> Generation:
        # The base is already a private copy: it becomes the next generation; the plan applied to it
        # deletes and rewrites what ``exclude`` names.
        if self._opened is None:
            self._opened = create_collection(self._folder, self.name)
        return Generation(self._folder.name, self._opened.collection)

    def check_healthy(self) -> None:
        """Nothing to lose mid-ingest: the store is a folder on this machine, its lock held by this process."""

    def publish(self, gen: Generation, info: dict, lexical) -> str:  # noqa: ANN001 - BM25Index
        from jobs.stores.chroma import build_metadata

        gen.collection.modify(metadata=build_metadata(info))
        shutil.rmtree(self._folder / LEXICAL, ignore_errors=True)
        lexical.save(self._folder / LEXICAL)  # published with the vectors in the same swap
        self._opened.close()  # Chroma has flushed everything: the folder is final
        self._opened = None
        final = publish(self.store, self._folder)
        self._published = True
        collect_garbage(self.store)
        return final.name

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None
        if self._folder is not None and not self._published:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None


@contextlib.contextmanager
def writer(store: Path, collection: str) -> Iterator[EmbeddedWriter]:
    check_writable(store)
    with ingest_lock(store), _writes_to(store):
        collect_garbage(store)
        w = EmbeddedWriter(store, collection)
        try:
            yield w
        finally:
            w.close()
