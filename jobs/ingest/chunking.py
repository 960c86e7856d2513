"""Chunks: sections split to fit the embedder's window, measured with the embedder's own tokenizer.

Each chunk is ``heading path`` + a piece of its section, packed by LlamaIndex's ``SentenceSplitter``
(paragraphs, then sentences with Chinese and English punctuation, then clauses, then words). The
budget is counted the way the embedder reads the text: passage prefix and special tokens included,
so no chunk is ever silently truncated. Long code and log dumps are capped first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from llama_index.core.node_parser import SentenceSplitter

from jobs.common.config import ChunkingConfig
from jobs.common.errors import JobError
from jobs.ingest.documents import CODE, Document

# Sentence ends: Chinese full stops and marks need no following space; ASCII ones do.
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?;])\s+|\n")
# Clause-level fallback for over-long sentences: Chinese and ASCII commas, colons, enumeration comma.
_CLAUSE = r"[^,;:，；：、。！？\n]+[,;:，；：、。！？\n]?"
_MAX_CODE_LINE = 160


@dataclass(frozen=True)
class Chunk:
    id: str
    path: str
    lang: str
    heading: str
    ordinal: int
    text: str
    n_tokens: int  # as the embedder reads it: prefix and special tokens included
    file_sha: str

    @property
    def text_sha(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()

    def metadata(self, commit: str) -> dict[str, str | int]:
        return {
            "path": self.path,
            "heading": self.heading,
            "lang": self.lang,
            "commit": commit,
            "ordinal": self.ordinal,
            "n_tokens": self.n_tokens,
            "text_sha": self.text_sha,
            "file_sha": self.file_sha,
        }


def cap_code(code: str, max_lines: int) -> str:
    lines = [line[:_MAX_CODE_LINE] for line in code.split("\n")]
    if len(lines) <= max_lines:
        return "\n".join(lines)
    return "\n".join(lines[:max_lines] + [f"… ({len(lines) - max_lines} more lines)"])


def split_sentences(text: str) -> list[str]:
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if end > start:
            parts.append(text[start:end])
            start = end
    if start < len(text):
        parts.append(text[start:])
    return [p for p in parts if p]


class Chunker:
    """Splits documents into chunks of at most ``cfg.size`` embedder tokens."""

    def __init__(self, cfg: ChunkingConfig, *, count_tokens: Callable[[str], int],
                 token_ids: Callable[[str], list[int]], passage_prefix: str, special_tokens: int,
                 window: int) -> None:
        if cfg.size > window:
            raise JobError(
                f"[chunking].size={cfg.size} exceeds the embedder's window of {window} tokens: chunks "
                f"would be silently truncated; set chunking.size <= {window}"
            )
        self.cfg = cfg
        self.count_tokens = count_tokens
        self.token_ids = token_ids
        self.prefix = passage_prefix
        self.fixed = special_tokens + (count_tokens(passage_prefix) if passage_prefix else 0)
        self._splitters: dict[int, SentenceSplitter] = {}

    def _splitter(self, budget: int) -> SentenceSplitter:
        if budget not in self._splitters:
            self._splitters[budget] = SentenceSplitter(
                chunk_size=budget,
                chunk_overlap=min(self.cfg.overlap, budget // 4),
                tokenizer=self.token_ids,
                paragraph_separator="\n\n",
                separator=" ",
                chunking_tokenizer_fn=split_sentences,
                secondary_chunking_regex=_CLAUSE,
            )
        return self._splitters[budget]

    def full_tokens(self, text: str) -> int:
        return self.fixed + self.count_tokens(text)

    def chunk(self, doc: Document) -> list[Chunk]:
        chunks: list[Chunk] = []
        for section in doc.sections:
            heading = self._fit_heading(section.heading_path)
            head = f"{heading}\n" if heading else ""
            body = "\n\n".join(
                cap_code(b.text, self.cfg.code_max_lines) if b.kind == CODE else b.text
                for b in section.blocks
            )
            # A small margin: token counts are not exactly additive across the join.
            budget = self.cfg.size - self.fixed - self.count_tokens(head) - 2
            for piece in self._splitter(max(budget, 8)).split_text(body):
                piece = piece.strip()
                if not piece:
                    continue
                text = self._fit(head + piece)
                chunks.append(Chunk(
                    id=f"{doc.path}#{len(chunks):04d}",
                    path=doc.path,
                    lang=doc.lang,
                    heading=section.heading_path,
                    ordinal=len(chunks),
                    text=text,
                    n_tokens=self.full_tokens(text),
                    file_sha=doc.sha,
                ))
        return chunks

    def _fit_heading(self, heading: str) -> str:
        # A deep heading path must leave most of the window to the text itself.
        limit = self.cfg.size // 4
        while heading and self.count_tokens(heading) > limit:
            parts = heading.split(" > ")
            heading = " > ".join(parts[1:]) if len(parts) > 1 else heading[: len(heading) * 3 // 4]
        return heading

    def _fit(self, text: str) -> str:
        """Last guard: cut at a token boundary if the joined text still exceeds the window."""
        while self.full_tokens(text) > self.cfg.size:
            over = self.full_tokens(text) - self.cfg.size
            text = text[: max(1, len(text) - max(1, over))].rstrip()
        return text
