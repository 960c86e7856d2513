"""Question sets: a CSV read and validated in full before any model loads.

Columns: id, question, language, expected_keywords, expected_sources, category, notes. Lists are
``|``-separated. Every bad row is reported (file, row, field), then the job stops.

Categories are the file's own (``howto``, ``paraphrase``, ...): the report groups by whatever the file
has. Two names carry meaning: ``negative`` questions expect an abstention (no keywords), and ``identity``
questions (who are you?) may have no keywords.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.common.errors import JobError

COLUMNS = ("id", "question", "language", "expected_keywords", "expected_sources", "category", "notes")
# Optional columns: a reviewer's notes, and a short reference answer for answer judges.
OPTIONAL = ("notes", "reference_answer")
NEGATIVE, IDENTITY = "negative", "identity"
LANGUAGES = ("zh", "en")
_CATEGORY = re.compile(r"^[\w-]{1,40}$")
# Control characters but tab and newlines (a pasted error message keeps its lines), and the invisible
# bidirectional overrides that make text read other than it is.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    language: str
    expected_keywords: tuple[str, ...]
    expected_sources: tuple[str, ...]
    category: str
    notes: str = ""
    reference: str = ""  # a short correct answer (optional), for answer judges


@dataclass(frozen=True)
class QuestionSet:
    path: Path
    sha256: str
    questions: tuple[Question, ...]


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split("|") if v.strip())


def load_questions(path: Path, max_chars: int | None = None) -> QuestionSet:
    """Read and validate; raise one JobError listing every problem (one line each). Questions longer than
    ``max_chars`` are refused (the profile's ``eval.max_question_chars``)."""
    if not path.is_file():
        raise JobError(f"{path}: question file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM from Excel is fine
    except UnicodeDecodeError as exc:
        raise JobError(f"{path}: not UTF-8 (byte {exc.start}): save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL]
    if missing:
        raise JobError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'empty'})")
    reader.fieldnames = header
    errors: list[str] = []
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for row_no, row in enumerate(reader, start=2):  # row 1 is the header
        if None in row:
            errors.append(f"{path}:{row_no}: more fields than columns (unquoted comma?)")
            continue
        row = {k: (v or "").strip() for k, v in row.items()}

        def bad(field: str, why: str, row_no: int = row_no) -> None:
            errors.append(f"{path}:{row_no}: {field}: {why}")

        for field, value in row.items():
            control = _CONTROL.search(value)
            if control:
                # A NUL or an escape sequence is never part of a question; it would reach the report and the CSVs.
                bad(field, f"control character U+{ord(control.group()):04X} at position {control.start() + 1}")

        qid = row["id"]
        if not qid:
            bad("id", "empty")
        elif qid in seen:
            bad("id", f"duplicate {qid!r} (first on row {seen[qid]})")
        else:
            seen[qid] = row_no
        if not row["question"]:
            bad("question", "empty")
        elif max_chars is not None and len(row["question"]) > max_chars:
            bad("question", f"{len(row['question'])} characters, more than eval.max_question_chars={max_chars}")
        if row["language"] not in LANGUAGES:
            bad("language", f"{row['language']!r} is not one of {', '.join(LANGUAGES)}")
        if not _CATEGORY.match(row["category"]):
            bad("category", f"{row['category']!r}: a name of 1-40 letters, digits, - or _")
        keywords = _split(row["expected_keywords"])
        if row["category"] not in (NEGATIVE, IDENTITY) and not keywords:
            bad("expected_keywords", f"empty for a {row['category']!r} question")
        if row["category"] == NEGATIVE and keywords:
            bad("expected_keywords", "a negative question expects an abstention, not keywords")
        questions.append(Question(
            id=qid, question=row["question"], language=row["language"], expected_keywords=keywords,
            expected_sources=_split(row["expected_sources"]), category=row["category"],
            notes=row.get("notes", ""), reference=row.get("reference_answer", ""),
        ))
    if errors:
        raise JobError(f"{len(errors)} problem(s) in {path}:\n" + "\n".join(errors))
    if not questions:
        raise JobError(f"{path}: no questions")
    return QuestionSet(path=path, sha256=hashlib.sha256(data).hexdigest(), questions=tuple(questions))
