"""Corpus manifests and their sources: a pinned git ref, tried across mirrors, or a local snapshot.

A manifest (``corpora/<name>.toml``) pins one ref: a commit sha (full or short) or a tag. Sources are
tried in order; git sources are cloned (shallow where the server allows) into the cache and checked out
at the ref, and the commit they resolve it to is verified against a sha pin. A folder source is a
snapshot of one commit; its ``SNAPSHOT.md`` names the commit (and tag), and must agree with the pin,
else the folder is refused. A folder without a ``SNAPSHOT.md`` has no provenance: it is identified by
its content and used with a warning (``--source DIR`` for a local copy).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.common.config import ROOT
from jobs.common.errors import JobError
from jobs.common.urls import redact, redact_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
SHORT_SHA = re.compile(r"^[0-9a-f]{4,39}$")
SNAPSHOT_COMMIT = re.compile(r"Commit:\s*`?([0-9a-f]{40})`?")
SNAPSHOT_TAG = re.compile(r"^\W*Tag:\s*`?([^`\s]+)`?", re.MULTILINE)


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "git" or "folder"
    location: str  # URL / repo path for git, folder path for folder

    def describe(self) -> str:
        """For messages, logs and the store's build record: a URL without its credentials (git gets
        ``location`` as it is)."""
        return f"{self.kind} {redact(self.location)}"


@dataclass(frozen=True)
class Manifest:
    name: str
    url: str
    ref: str
    sources: tuple[SourceSpec, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class Checkout:
    """A corpus ready to read: the folder, the commit it holds, and where it came from."""

    root: Path
    commit: str
    source: SourceSpec
    fell_back: bool
    files: tuple[str, ...]  # corpus-relative posix paths, sorted


def load_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise JobError(f"corpus manifest not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None

    def need(key: str, table: dict, where: str) -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            raise JobError(f"{path}: {where}{key} must be a non-empty string")
        return value.strip()

    name, url, ref = need("name", raw, ""), need("url", raw, ""), need("ref", raw, "")
    sources = []
    for i, src in enumerate(raw.get("sources") or [{"kind": "git", "url": url}], start=1):
        kind = src.get("kind")
        if kind == "git":
            sources.append(SourceSpec("git", need("url", src, f"sources[{i}].")))
        elif kind == "folder":
            sources.append(SourceSpec("folder", str(_project_path(need("path", src, f"sources[{i}].")))))
        else:
            raise JobError(f"{path}: sources[{i}].kind must be 'git' or 'folder', got {kind!r}")
    files = raw.get("files", {})
    include = tuple(files.get("include", ["**/*.md", "**/*.rst"]))
    exclude = tuple(files.get("exclude", []))
    if not include or not all(isinstance(g, str) for g in include + exclude):
        raise JobError(f"{path}: [files] include/exclude must be lists of glob strings")
    return Manifest(name, url, ref, tuple(sources), include, exclude, path)


def _project_path(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (ROOT / path).resolve()


def source_from_override(value: str) -> SourceSpec:
    """``--source``: a git URL, a local git repository, or a plain folder."""
    if "://" in value or value.startswith("git@"):
        return SourceSpec("git", value)
    path = _project_path(value)
    if not path.exists():
        raise JobError(f"--source {value}: no such folder or repository ({path})")
    if (path / ".git").exists() or (path / "HEAD").is_file() and (path / "objects").is_dir():
        return SourceSpec("git", str(path))
    return SourceSpec("folder", str(path))


def fetch(manifest: Manifest, cache_dir: Path, override: SourceSpec | None = None,
          timeout_s: float = 300.0) -> Checkout:
    """Try each source in turn; return the first checkout at the pinned commit, or fail listing all."""
    candidates = (override,) if override else manifest.sources
    failures: list[str] = []
    for i, spec in enumerate(candidates):
        try:
            if spec.kind == "git":
                root, commit = _fetch_git(spec.location, manifest.ref, cache_dir, timeout_s)
            else:
                root, commit = _use_folder(Path(spec.location), manifest.ref)
        except JobError as exc:
            failures.append(f"{spec.describe()}: {exc}")
            log.warning("source %s failed: %s", spec.describe(), exc)
            continue
        fell_back = i > 0
        if fell_back:
            log.warning("fell back to source %s after %d failed source(s)", spec.describe(), i)
        files = select_files(root, manifest.include, manifest.exclude)
        log.info("corpus %s at %s from %s: %d files", manifest.name, commit[:12], spec.describe(), len(files))
        return Checkout(root=root, commit=commit, source=spec, fell_back=fell_back, files=files)
    raise JobError(
        f"no source of corpus {manifest.name!r} ({manifest.path.name}) gave ref {manifest.ref}; tried: "
        + "; ".join(failures)
    )


def _git(args: list[str], cwd: Path | None, timeout_s: float) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise JobError(f"git {args[0]} timed out after {timeout_s:.0f}s") from None
    except FileNotFoundError:
        raise JobError("git is not installed") from None
    if out.returncode != 0:
        msg = redact_text((out.stderr.strip().splitlines() or ["(no message)"])[-1])
        raise JobError(f"git {args[0]} failed: {msg}")
    return out.stdout.strip()


def _fetch_git(url: str, ref: str, cache_dir: Path, timeout_s: float) -> tuple[Path, str]:
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    repo = cache_dir / "sources" / f"{Path(url.rstrip('/')).stem or 'repo'}-{key}"
    if not (repo / ".git").is_dir():
        # A half-made clone from a killed run is useless: start clean.
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        _git(["init", "-q"], repo, timeout_s)
        _git(["remote", "add", "origin", url], repo, timeout_s)
    else:
        _git(["remote", "set-url", "origin", url], repo, timeout_s)

    have = _resolve_local(repo, ref, timeout_s)
    if have is None:
        try:
            # Shallow fetch of exactly the pinned ref: GitHub and modern servers allow it for a sha.
            _git(["fetch", "-q", "--depth", "1", "origin", ref], repo, timeout_s)
            have = _resolve_local(repo, "FETCH_HEAD", timeout_s)
        except JobError as exc:
            log.info("shallow fetch of %s from %s refused (%s); fetching full history", ref, redact(url), exc)
            _git(["fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], repo, timeout_s)
            have = _resolve_local(repo, ref, timeout_s) or _resolve_local(repo, f"origin/{ref}", timeout_s)
        if have is None:
            raise JobError(f"ref {ref} not found in {redact(url)}")
    _git(["checkout", "-q", "--force", "--detach", have], repo, timeout_s)
    _git(["clean", "-q", "-fdx"], repo, timeout_s)
    head = _git(["rev-parse", "HEAD"], repo, timeout_s)
    if (FULL_SHA.match(ref) or SHORT_SHA.match(ref)) and not head.startswith(ref):
        raise JobError(f"checked out {head}, but the manifest pins {ref}")
    return repo, head


def _resolve_local(repo: Path, ref: str, timeout_s: float) -> str | None:
    try:
        return _git(["rev-parse", "--verify", "-q", f"{ref}^{{commit}}"], repo, timeout_s)
    except JobError:
        return None


def _use_folder(folder: Path, ref: str) -> tuple[Path, str]:
    if not folder.is_dir():
        raise JobError(f"folder {folder} does not exist")
    snapshot = folder / "SNAPSHOT.md"
    text = snapshot.read_text(encoding="utf-8", errors="replace") if snapshot.is_file() else ""
    m = SNAPSHOT_COMMIT.search(text)
    if m:
        commit, tags = m.group(1), SNAPSHOT_TAG.findall(text)
        if FULL_SHA.match(ref) or SHORT_SHA.match(ref):
            if not commit.startswith(ref):
                raise JobError(f"snapshot is at commit {commit}, the manifest pins {ref}")
        elif ref not in tags:
            named = f" and tag {', '.join(tags)}" if tags else ""
            raise JobError(f"snapshot is at commit {commit}{named}; the manifest pins {ref!r}, which is neither a "
                           "commit sha nor a tag the snapshot names: pin the commit sha")
        return folder, commit
    # A folder without provenance: identify it by content, so a changed folder is a changed corpus.
    log.warning("folder %s has no SNAPSHOT.md naming its commit: the pin %s cannot be verified; "
                "identifying the folder by its content", folder, ref)
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha1(path.read_bytes()).digest())
    return folder, f"folder-{digest.hexdigest()[:12]}"


def _glob_match(rel: str, pattern: str) -> bool:
    # fnmatch's `*` crosses `/`; `docs/**/*.md` must also match `docs/x.md`, so try without `**/`.
    return fnmatch.fnmatchcase(rel, pattern) or ("**/" in pattern and fnmatch.fnmatchcase(
        rel, pattern.replace("**/", "")))


def select_files(root: Path, include: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[str, ...]:
    """Corpus-relative paths matching include and not exclude; root-level globs stay at the root."""
    out = []
    for path in root.rglob("*"):
        if not path.is_file() or ".git" in path.relative_to(root).parts:
            continue
        rel = path.relative_to(root).as_posix()
        inc = any(_glob_match(rel, g) if "/" in g else rel == Path(rel).name and fnmatch.fnmatchcase(rel, g)
                  for g in include)
        if inc and not any(_glob_match(rel, g) for g in exclude):
            out.append(rel)
    return tuple(sorted(out))
