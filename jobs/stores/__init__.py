"""The store, one module per backend behind one interface (jobs.stores.base):

- ``embedded``: a Chroma folder on this machine (PersistentClient), generations swapped by a symlink; the
  one-machine default;
- ``server``: a Chroma server (``chroma run``, or Chroma's distributed deployment: the same HTTP API),
  generations as blue/green collections behind one pointer.

The jobs call ``open_reader`` and ``open_writer``, never a backend.
"""

from __future__ import annotations

import contextlib

from jobs.common.config import Profile
from jobs.common.errors import JobError
from jobs.stores.base import Base, Generation, Reader, Writer
from jobs.stores.chroma import DamagedStore

__all__ = ["Base", "DamagedStore", "Generation", "Reader", "Writer", "break_lease", "describe", "open_reader",
           "open_writer"]


def describe(profile: Profile) -> str:
    """Where the profile's store is, for messages (a URL without its credentials)."""
    from jobs.common.config import ROOT
    from jobs.common.urls import redact

    s = profile.store
    if s.url:
        return f"{redact(s.url)} ({s.tenant}/{s.database}, collection {s.collection})"
    return str(s.path.relative_to(ROOT)) if s.path.is_relative_to(ROOT) else str(s.path)


def open_reader(profile: Profile) -> Reader:
    """The live generation, for reading from start to end (close it when done)."""
    if profile.store.url:
        from jobs.stores.server import ServerReader

        return ServerReader(profile)
    from jobs.stores.embedded import EmbeddedReader

    return EmbeddedReader(profile.store.path, profile.store.collection)


def open_writer(profile: Profile) -> contextlib.AbstractContextManager[Writer]:
    """The single writer of the store, as a context: a second concurrent ingest is refused."""
    if profile.store.url:
        from jobs.stores.server import writer

        return writer(profile)
    from jobs.stores.embedded import writer as embedded_writer

    return embedded_writer(profile.store.path, profile.store.collection)


def break_lease(profile: Profile, force: bool = False) -> str:
    """Clear a server store's single-writer lease by hand (``python -m jobs.ingest --break-lease``)."""
    if not profile.store.url:
        raise JobError(f"--break-lease: store {describe(profile)} is a folder store: its lock is an flock that "
                       "the OS releases when its holder dies, there is no lease to break (it is for a store on a "
                       "Chroma server, --store-url)")
    from jobs.stores.server import break_lease as server_break_lease

    return server_break_lease(profile, force)
