"""Run folders: an append-only progress log that survives kill -9, and the final files written atomically.

    eval/reports/<run_id>/run.json          what the run is (config, models, corpus, question hash)
    eval/reports/<run_id>/progress.jsonl    one line per finished (question, mode), fsynced
    eval/reports/<run_id>/results.csv|jsonl, summary.json, report.md   written at the end
    eval/reports/latest.md                  points to the newest finished run
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from jobs.common.errors import JobError
from jobs.common.files import atomic_write

log = logging.getLogger(__name__)

PROGRESS = "progress.jsonl"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
RESULTS = "results.jsonl"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, reports_dir: Path, profile_name: str, info: dict) -> RunDir:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = reports_dir / f"{stamp}-{profile_name}"
        n = 1
        while path.exists():
            n += 1
            path = reports_dir / f"{stamp}-{profile_name}-{n}"
        path.mkdir(parents=True)
        run = cls(path)
        atomic_write(path / RUN_INFO, json.dumps({**info, "run_id": run.run_id}, indent=2, ensure_ascii=False))
        return run

    @classmethod
    def resume(cls, reports_dir: Path, profile_name: str, info: dict, run: str | None) -> RunDir:
        """The named run, or the newest unfinished run of this profile with the same settings and questions."""
        if run:
            path = Path(run) if Path(run).is_dir() else reports_dir / run
            if not (path / RUN_INFO).is_file():
                raise JobError(f"--resume {run}: no run folder at {path}")
            if path.resolve().parent != reports_dir.resolve():
                # Its history row, baseline and latest.md link belong with the reports folder it was run in.
                raise JobError(f"--resume {run}: that run is not in the reports folder {reports_dir}; resume it "
                               f"with --reports {path.resolve().parent}")
            if (path / SUMMARY).is_file():
                raise JobError(f"--resume {run}: that run is finished; start a new one instead")
            differs = _differs(path, info)
            if differs:
                raise JobError(f"--resume {path.name}: that run used other settings ({', '.join(differs)} differ); "
                               "start a new run instead")
        else:
            unfinished = sorted((p for p in reports_dir.glob(f"*-{profile_name}*")
                                 if (p / RUN_INFO).is_file() and not (p / SUMMARY).is_file()),
                                key=_started, reverse=True)
            if not unfinished:
                raise JobError(f"--resume: no unfinished run of profile {profile_name!r} in {reports_dir}")
            matching = [p for p in unfinished if not _differs(p, info)]
            if not matching:
                listed = "; ".join(f"{p.name} ({', '.join(_differs(p, info))} differ)" for p in unfinished[:5])
                raise JobError(f"--resume: no unfinished run of profile {profile_name!r} used these settings and "
                               f"questions (unfinished: {listed}); start a new run, or resume one with its settings")
            path = matching[0]
        log.info("resuming run %s", path.name)
        return cls(path)

    def info(self) -> dict:
        return json.loads((self.path / RUN_INFO).read_text(encoding="utf-8"))

    def done(self) -> dict[tuple[str, str], dict]:
        """Finished records by (question id, mode). Every sound line is kept; a line that is not a record
        (damaged, or without its id and mode) is skipped and named, and that answer is asked again. A torn
        last line (killed mid-write) is cut off, so that the next append starts on a line of its own."""
        path = self.path / PROGRESS
        if not path.is_file():
            return {}
        data = path.read_bytes()
        out: dict[tuple[str, str], dict] = {}
        skipped: list[str] = []
        lines = data.split(b"\n")
        torn = lines.pop()  # after the last newline: b"" when the file ends on a line boundary
        for number, raw in enumerate(lines, start=1):
            why = _not_a_record(raw)
            if why:
                skipped.append(f"line {number} ({why})")
                continue
            rec = json.loads(raw)
            out[(rec["id"], rec["mode"])] = rec
        if skipped:
            log.warning("%s: skipped %d line(s) that are not answer records: %s; those answers are asked again",
                        path, len(skipped), ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
        if torn:
            log.warning("%s: dropping a torn record at the end (line %d, written when the run was killed)",
                        path, len(lines) + 1)
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(torn))
        return out

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        # One write of a whole line, then fsync: after a crash the file ends at a line boundary or
        # with one torn line that done() drops.
        fd = os.open(self.path / PROGRESS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def results(self) -> pd.DataFrame:
        """A finished run's answers with what it scored them, one row per question and mode (results.jsonl), read
        the way a run builds its own table from its records: numbers exactly as written."""
        lines = (self.path / RESULTS).read_text(encoding="utf-8").splitlines()
        return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def _not_a_record(raw: bytes) -> str:
    """Why a progress line is not an answer record ("" when it is one)."""
    if not raw.strip():
        return "empty"
    try:
        rec = json.loads(raw)
    except ValueError:
        return "not JSON"
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("id"), str) or rec.get("mode") not in ("bare", "rag"):
        return "no question id or mode"
    return ""


def _read_info(path: Path) -> dict:
    try:
        return json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _differs(path: Path, info: dict) -> list[str]:
    old = _read_info(path)
    return [k for k in ("questions_sha256", "experiment") if old.get(k) != info.get(k)]


def _started(path: Path) -> str:
    return str(_read_info(path).get("started_at", ""))


def point_latest(reports_dir: Path, run: RunDir, headline: str) -> None:
    rel = f"{run.run_id}/report.md"
    atomic_write(reports_dir / "latest.md",
                 f"# Latest run\n\n[{run.run_id}]({rel})\n\n{headline}\n")


def format_sources(retrieved: object) -> str:
    """Retrieved chunks as stored in a result row (JSON or a list), one "score path § heading" per line."""
    if isinstance(retrieved, str):
        items = json.loads(retrieved) if retrieved else []
    else:  # a list from results.jsonl; NaN where a row has none
        items = retrieved if isinstance(retrieved, list) else []
    return "\n".join(f"{h['score']:.3f} {h['path']}" + (f" § {h['heading']}" if h.get("heading") else "")
                     for h in items)
