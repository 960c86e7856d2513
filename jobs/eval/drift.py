"""What a docs update did to the answers: the files that changed between two runs' corpus commits, the
questions whose retrieved chunks came from them, and the answers that moved for other reasons.

Each run keeps the per-file hashes of the store generation it read (``corpus_files.json``), so two runs
are compared from their own folders, whatever has happened to the store since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from jobs.common.files import atomic_write
from jobs.eval.scoring.attribution import context_chunks
from jobs.eval.scoring.statistics import passed

CORPUS_FILES = "corpus_files.json"


def save_corpus_files(run_dir: Path, commit: str, files: dict[str, str]) -> None:
    atomic_write(run_dir / CORPUS_FILES, json.dumps({"commit": commit, "files": files}, indent=1, sort_keys=True))


def load_corpus_files(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / CORPUS_FILES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class DocsChange:
    commit_before: str
    commit_now: str
    added: list[str]
    changed: list[str]
    removed: list[str]
    touched: pd.DataFrame  # questions whose retrieved chunks came from a changed file, in either run
    moved_otherwise: pd.DataFrame  # answers that changed although no retrieved file did

    @property
    def files(self) -> set[str]:
        return set(self.added) | set(self.changed) | set(self.removed)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "questions touched": int(self.touched["id"].nunique()) if len(self.touched) else 0,
                "touched answers changed": int(self.touched["answer changed"].sum()) if len(self.touched) else 0,
                "answers changed otherwise": len(self.moved_otherwise)}


def _paths(row: pd.Series | None) -> list[str]:
    return [] if row is None else list(dict.fromkeys(str(c.get("path")) for c in context_chunks(row)))


def _verdict(row: pd.Series | None) -> str:
    if row is None:
        return "–"
    if isinstance(row.get("error"), str) and row["error"]:
        return "failed"
    return "pass" if passed(row) else "fail"


def docs_change(now_dir: Path, then_dir: Path, now: pd.DataFrame, then: pd.DataFrame) -> DocsChange | None:
    """None when both runs read the same corpus commit, or a run kept no file list (runs from before)."""
    a, b = load_corpus_files(then_dir), load_corpus_files(now_dir)
    if a is None or b is None or a.get("commit") == b.get("commit"):
        return None
    before, after = a["files"], b["files"]
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    moved = set(added) | set(removed) | set(changed)

    prev = then.set_index(["id", "mode"])
    touched, otherwise = [], []
    for _, r in now.iterrows():
        key = (r["id"], r["mode"])
        old = prev.loc[key] if key in prev.index else None
        files = [p for p in dict.fromkeys(_paths(old) + _paths(r)) if p in moved]
        answer_changed = old is not None and str(old["answer"]) != str(r["answer"])
        entry = {"id": r["id"], "mode": r["mode"], "question": r["question"],
                 "answer before": old["answer"] if old is not None else "", "verdict before": _verdict(old),
                 "answer now": r["answer"], "verdict now": _verdict(r)}
        if files:
            touched.append({**entry, "changed files retrieved": "\n".join(files), "answer changed": answer_changed})
        elif answer_changed:
            otherwise.append(entry)
    columns = ["id", "mode", "question", "changed files retrieved", "answer before", "verdict before",
               "answer now", "verdict now", "answer changed"]
    return DocsChange(commit_before=str(a["commit"]), commit_now=str(b["commit"]), added=added, changed=changed,
                      removed=removed, touched=pd.DataFrame(touched, columns=columns),
                      moved_otherwise=pd.DataFrame(otherwise, columns=[c for c in columns if c not in (
                          "changed files retrieved", "answer changed")]))
