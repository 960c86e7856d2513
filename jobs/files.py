"""File helpers shared by the jobs: atomic writes, streamed hashes, stale temporary folders."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write beside, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Delete ``<out_dir>.tmp-<pid>`` folders whose writer is gone (a live pid may be a concurrent build)."""
    for tmp in Path(out_dir).parent.glob(f"{glob.escape(Path(out_dir).name)}.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            log.info("removing stale temporary folder %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
