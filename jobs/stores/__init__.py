"""The store, one module per backend behind one interface (jobs.stores.base):

- ``embedded``: a Chroma folder on this machine (PersistentClient), generations swapped by a symlink; the
  one-machine default;
- ``server``: a Chroma server (``chroma run``, or Chroma's distributed deployment: the same HTTP API),
  generations as blue/green collections behind one pointer.

The jobs call ``open_reader`` and ``open_writer``, never a backend.
"""

from __future__ import annotations

import contextlib

from jobs.config import Profile
from jobs.stores.base import Base, Generation, Reader, Writer
from jobs.stores.chroma import DamagedStore

__all__ = ["Base", "DamagedStore", "Generation", "Reader", "Writer", "describe", "open_reader", "open_writer"]


def describe(profile: Profile) -> str:
    """Where the profile's store is, for messages."""
    from jobs.config import ROOT

    s = profile.store
    if s.url:
        return f"{s.url} ({s.tenant}/{s.database}, collection {s.collection})"
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
