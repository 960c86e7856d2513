"""`make serve-llm PROFILE=offline-served`: llama.cpp's OpenAI-compatible server for a profile's [serve] model.

    python -m jobs.tools.serve --profile offline-served [--port 8080]

Runs in the foreground on the host and port of the profile's ``[llm].base_url``, serving the GGUF file as
it is, under the served name ``[llm].model``, with ``[serve].parallel`` slots decoded together
(continuous batching). The key, if the profile names ``api_key_env``, is passed through the environment,
never on the command line. The tests and the benchmark start the same command with ``running()``.
Production serves InternLM2 with LMDeploy or vLLM instead (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

from jobs.common import log as joblog
from jobs.common.config import ROOT, Profile, load_profile, overrides_from_cli
from jobs.common.errors import JobError
from jobs.common.threads import cpu_budget
from jobs.tools.prepare.llama_server import binary

log = logging.getLogger("jobs.tools.serve")

PACKAGE_SCHEME = "package:"


def gguf_path(spec: str) -> Path:
    """``package:<module>/<file>``: a file inside an installed wheel (found without importing it), or a path."""
    if spec.startswith(PACKAGE_SCHEME):
        from jobs.tools.prepare.gguf import find_package_file

        package, _, relative = spec[len(PACKAGE_SCHEME):].partition("/")
        try:
            return find_package_file(package, relative)
        except FileNotFoundError as exc:
            raise JobError(str(exc)) from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise JobError(f"[serve].gguf={spec!r}: no such file")
    return path


def server_binary(profile: Profile) -> str:
    """[serve].binary (a llama-server of your own), else the one `make llama-server` built."""
    if profile.serve.binary:
        path = Path(profile.serve.binary).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise JobError(f"[serve].binary={profile.serve.binary!r}: not an executable file")
        return str(path)
    return str(binary(ROOT / ".cache"))


def command(profile: Profile, port: int | None = None, parallel: int | None = None) -> tuple[list[str], dict]:
    """The server's command line and environment for a profile (port and slots overridable)."""
    if profile.llm.backend != "openai" or not profile.serve.gguf:
        raise JobError(f"profile {profile.name!r} has no local server to start (it needs [llm].backend = "
                       "\"openai\" and a [serve].gguf)")
    url = urlparse(profile.llm.base_url)
    slots = parallel or profile.serve.parallel
    threads = profile.serve.threads or cpu_budget()
    cmd = [server_binary(profile), "--model", str(gguf_path(profile.serve.gguf)),
           "--host", url.hostname or "127.0.0.1", "--port", str(port or url.port or 8080),
           "--alias", profile.llm.model, "--parallel", str(slots),
           "--ctx-size", str(slots * profile.serve.ctx_per_slot), "--threads", str(threads),
           "--threads-batch", str(threads), "--no-webui", "--seed", str(profile.llm.seed)]
    env = {**os.environ, "OMP_WAIT_POLICY": profile.serve.wait_policy.upper()}
    if profile.llm.api_key_env:
        key = os.environ.get(profile.llm.api_key_env)
        if not key:
            raise JobError(f"[llm].api_key_env names {profile.llm.api_key_env}, which is not set")
        env["LLAMA_API_KEY"] = key
    return cmd, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    """Poll /health (bounded in time) until the model is loaded."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise JobError(f"the model server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise JobError(f"the model server at {base} was not ready after {timeout_s:.0f}s")


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after a grace period: a server busy generating may not stop on SIGTERM."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


@contextlib.contextmanager
def running(profile: Profile, port: int | None = None, parallel: int | None = None,
            log_path: Path | None = None) -> Iterator[str]:
    """A server for ``profile`` on 127.0.0.1 (a free port unless given), stopped at the end; yields base_url."""
    port = port or free_port()
    cmd, env = command(profile, port=port, parallel=parallel)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
        if log_path:
            out.close()


@contextlib.contextmanager
def running_chroma(path: Path, port: int | None = None, log_path: Path | None = None) -> Iterator[str]:
    """`chroma run` (it ships in the chromadb wheel) on 127.0.0.1 with data in ``path``; yields its URL."""
    with chroma_process(path, port, log_path) as (_, url):
        yield url


@contextlib.contextmanager
def chroma_process(path: Path, port: int | None = None,
                   log_path: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``running_chroma``, yielding the server's process too (the tests kill it to lose the server mid-job)."""
    import sys

    import chromadb

    from jobs.stores.chroma import client_settings

    port = port or free_port()
    chroma = Path(sys.executable).with_name("chroma")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(chroma), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise JobError(f"chroma run exited with code {proc.returncode} while starting")
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port, settings=client_settings()).heartbeat()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() - started > 60:
                    raise JobError(f"chroma run on port {port} was not ready after 60s") from None
                time.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        if log_path:
            out.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tools.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline-served")
    p.add_argument("--port", type=int, help="default: the port of the profile's [llm].base_url")
    p.add_argument("--parallel", type=int, help="slots (default: the profile's [serve].parallel)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup()
    profile = load_profile(args.profile, overrides_from_cli(args.set, {"serve.parallel": ("--parallel",
                                                                                          args.parallel)}))
    cmd, env = command(profile, port=args.port)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)  # the server itself in the foreground: Ctrl-C stops it
    return 0  # pragma: no cover


if __name__ == "__main__":
    joblog.run_cli(main)
