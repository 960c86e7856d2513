"""`make llama-server`: build llama.cpp's OpenAI-compatible server from source, once, offline.

llama.cpp publishes no server binary on the package registry; the llama-cpp-python sdist (pinned, its sha256
checked) vendors llama.cpp's source, and CMake builds the one ``llama-server`` target from it: no web UI
(its assets would be downloaded), no TLS, no tests or examples, static llama/ggml libraries. On 2 cores
the build takes about 6 minutes; the result is cached under ``.cache/llama.cpp/`` per CPU (``GGML_NATIVE``
tunes it to the machine that builds it) and published atomically, so a killed build leaves nothing half-made.

    python -m jobs.tools.prepare.llama_server [--cache .cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from jobs.common import log as joblog
from jobs.common.config import ROOT
from jobs.common.errors import JobError
from jobs.common.files import publish_folder, sha256_file
from jobs.common.threads import cpu_budget

log = logging.getLogger("jobs.tools.prepare.llama_server")

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DGGML_CCACHE=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)
MARKER = ".complete"
BINARY = "llama-server"


def cpu_key() -> str:
    """A native build runs on CPUs with the same instruction set: the cache is keyed by it."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def folder(cache: Path) -> Path:
    return cache / "llama.cpp" / f"llama-server-{SDIST.split('==')[1]}-{platform.machine()}-{cpu_key()}"


def binary(cache: Path) -> Path:
    """The built server, or a one-line error saying how to build it."""
    path = folder(cache) / BINARY
    if not (folder(cache) / MARKER).is_file() or not path.is_file():
        raise JobError(f"llama.cpp's server is not built ({path} missing): run `make llama-server` "
                       "(about 6 minutes on 2 cores, once)")
    return path


def _run(cmd: list[str], cwd: Path, logfile: Path, what: str) -> None:
    with open(logfile, "ab") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise JobError(f"{what} failed (exit {done.returncode}): {tail[0][:300]}; full log: {logfile}")


def _build(out: Path) -> str:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        logfile = out / "build.log"
        log.info("downloading the %s sdist (llama.cpp's source)", SDIST)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(work),
              "-q"], work, logfile, f"pip download {SDIST}")
        sdist = work / SDIST_FILE
        if sha256_file(sdist) != SDIST_SHA256:
            raise JobError(f"{SDIST_FILE}: sha256 {sha256_file(sdist)} is not the pinned {SDIST_SHA256}")
        src = work / "src"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDORED)]
            for m in members:
                m.name = m.name[len(VENDORED):]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
        (src / ".git").unlink(missing_ok=True)  # a stale submodule link in the sdist: git would complain
        jobs = str(cpu_budget())
        log.info("building llama-server with %s job(s) (log: %s)", jobs, logfile)
        _run(["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS], work, logfile, "cmake configure")
        _run(["cmake", "--build", str(src / "build"), "--target", BINARY, "-j", jobs], work, logfile, "cmake build")
        shutil.copy2(src / "build" / "bin" / BINARY, out / BINARY)
    seconds = time.perf_counter() - started
    log.info("llama-server built in %.0fs", seconds)
    return json.dumps({"sdist": SDIST, "sha256": SDIST_SHA256, "cmake": list(CMAKE_FLAGS), "cpu": cpu_key(),
                       "build_seconds": round(seconds, 1)}, indent=1)


def build(cache: Path) -> Path:
    """The server binary, built if it is not there yet (idempotent)."""
    if not shutil.which("cmake"):
        raise JobError("cmake is not installed: llama.cpp's server is built from source with cmake and a C++ compiler")
    target = folder(cache)
    if not (target / MARKER).is_file():
        publish_folder(target, MARKER, _build)
    return binary(cache)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tools.prepare.llama_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    path = build(args.cache)
    print(path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    joblog.run_cli(main)
