"""File helpers shared by the jobs: atomic writes, streamed hashes, stale temporary folders."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write beside, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk or a kill mid-write leaves nothing behind: the old file, untouched, and no temp file.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


def publish_folder(out_dir: Path, marker: str, build: Callable[[Path], str]) -> Path:
    """Build a folder atomically: ``build`` fills a private sibling temp folder and returns the text of
    the ``marker`` file, which is written last (a folder with the marker is always whole); then one
    rename puts it in place. A crash leaves only a temp folder that the next call removes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_dirs(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        (tmp / marker).write_text(build(tmp))
        if out_dir.exists() and not (out_dir / marker).is_file():
            shutil.rmtree(out_dir)  # no marker: a leftover of an interrupted, non-atomic writer
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # A concurrent build won the rename; its folder is as good as ours.
            if not (out_dir / marker).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
