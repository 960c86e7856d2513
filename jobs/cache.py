"""Generation cache: answers on disk, keyed by everything that determines them.

The key is a hash of the model's identity (hub id + revision, or a fingerprint of a local folder),
dtype and device type, the decoding settings, the prompt template version and the full rendered
prompt. One file per entry, written beside and renamed into place: a crash leaves no torn entry, and
deleting the folder at any time only costs regeneration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from jobs.files import atomic_write

log = logging.getLogger(__name__)

_SMALL = 16 << 20


def folder_fingerprint(folder: Path) -> str:
    """Content hash of a local model folder: small files whole, large ones by size and both ends."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") and rel != ".complete":
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _SMALL:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


class GenerationCache:
    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = root
        self.enabled = enabled

    @staticmethod
    def key(fingerprint: dict, prompt: str) -> str:
        blob = json.dumps({"llm": fingerprint, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring an unreadable cache entry %s", self._path(key))
            return None
        return value

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(value, ensure_ascii=False))
