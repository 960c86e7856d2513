"""Documents: MyST markdown and reStructuredText read into sections that keep their heading path.

Markup that carries no meaning for retrieval (toctrees, figures, raw HTML, autodoc) is dropped;
admonitions and tables keep their text; code blocks are kept apart from prose so the chunker can
cap them. Nothing here depends on the embedder.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

CODE = "code"
PROSE = "prose"


@dataclass(frozen=True)
class Block:
    kind: str  # PROSE or CODE
    text: str


@dataclass(frozen=True)
class Section:
    headings: tuple[str, ...]
    blocks: tuple[Block, ...]

    @property
    def heading_path(self) -> str:
        return " > ".join(self.headings)


@dataclass(frozen=True)
class Document:
    path: str  # corpus-relative, posix
    lang: str  # "zh" or "en"
    sha: str  # sha1 of the file's bytes
    sections: tuple[Section, ...]

    @property
    def content_chars(self) -> int:
        return sum(len(b.text.strip()) for s in self.sections for b in s.blocks)


def language_of(path: str) -> str:
    parts = path.lower().replace("-", "_").split("/")
    return "zh" if any(p in ("zh_cn", "zh") or p.endswith("_zh_cn.md") for p in parts) else "en"


def read_document(root: Path, rel: str) -> Document:
    data = (root / rel).read_bytes()
    text = data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\t", "    ")
    parse = parse_rst if rel.endswith(".rst") else parse_markdown
    return Document(path=rel, lang=language_of(rel), sha=hashlib.sha1(data).hexdigest(), sections=parse(text))


# --- shared section builder -------------------------------------------------------------------

class _Builder:
    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []
        self.sections: list[Section] = []
        self.blocks: list[Block] = []
        self.prose: list[str] = []

    def flush_prose(self) -> None:
        text = "\n".join(x for x in self.prose if x != _DROP).strip()
        self.prose = []
        if text:
            self.blocks.append(Block(PROSE, re.sub(r"\n{3,}", "\n\n", text)))

    def add_code(self, lines: list[str]) -> None:
        self.flush_prose()
        code = _dedent(lines)
        if code.strip():
            self.blocks.append(Block(CODE, code.strip("\n")))

    def close_section(self) -> None:
        self.flush_prose()
        if self.blocks:
            self.sections.append(Section(tuple(t for _, t in self.stack), tuple(self.blocks)))
        self.blocks = []

    def heading(self, level: int, title: str) -> None:
        self.close_section()
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        title = clean_inline(title).replace(_DROP, "").strip()
        if title:
            self.stack.append((level, title))

    def result(self) -> tuple[Section, ...]:
        self.close_section()
        return tuple(self.sections)


def _dedent(lines: list[str]) -> str:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return "\n".join(line[cut:] for line in lines)


_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_RST_ROLE = re.compile(r":[a-zA-Z:_-]+:`([^`<]*?)\s*(?:<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_GRID_RULE = re.compile(r"^\s*\+[-=+:]+\+\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


_DROP = "\x00"  # a line that is pure markup (table rules): removed without leaving a blank


def clean_inline(line: str) -> str:
    if _GRID_RULE.match(line) or _TABLE_RULE.match(line):
        return _DROP
    line = _IMAGE.sub("", line)
    line = _MD_LINK.sub(r"\1", line)
    # rst links and roles first: their `<target>` looks like an HTML tag.
    line = _RST_ROLE.sub(r"\1", line)
    line = _RST_LINK.sub(r"\1", line)
    line = _RST_LITERAL.sub(r"\1", line)
    line = _HTML_TAG.sub("", line)
    if line.lstrip().startswith("|") and line.rstrip().endswith("|"):
        # Table rows: padding spaces only cost tokens.
        line = re.sub(r"\s*\|\s*", " | ", line).strip()
    return line.rstrip()


# --- markdown (MyST) ----------------------------------------------------------------------------

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MYST_OPTION = re.compile(r"^\s*:[\w-]+:(\s.*)?$")
_MYST_TARGET = re.compile(r"^\s*\([\w.-]+\)=\s*$")
# MyST directives whose body is markdown prose; any other {directive} body is code or dropped.
_MYST_PROSE = {"tip", "note", "hint", "important", "warning", "attention", "caution", "danger", "error",
               "admonition", "toggle", "seealso", "dropdown", "tab-item", "tab-set", "card", "div"}
_MYST_DROP = {"toctree", "figure", "image", "raw", "autoclass", "autofunction", "automodule",
              "autosummary", "currentmodule", "contents", "include"}


def parse_markdown(text: str) -> tuple[Section, ...]:
    text = _HTML_COMMENT.sub("", text)
    b = _Builder()
    containers: list[tuple[str, int]] = []  # open prose directives: (fence char, length)
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            marker, info = fence.group(2), fence.group(3).strip()
            if not info and containers and marker[0] == containers[-1][0] and len(marker) >= containers[-1][1]:
                containers.pop()
                i += 1
                continue
            directive = re.match(r"^\{([\w-]+)\}", info)
            name = directive.group(1) if directive else ""
            if name in _MYST_PROSE:
                containers.append((marker[0], len(marker)))
                b.prose.append("")
                i += 1
                while i < len(lines) and _MYST_OPTION.match(lines[i]):
                    i += 1
                continue
            body, i = _read_fenced(lines, i + 1, marker)
            if name in _MYST_DROP:
                continue
            while body and _MYST_OPTION.match(body[0]):
                body.pop(0)
            if name == "eval-rst":
                for s in parse_rst("\n".join(body)):
                    b.flush_prose()
                    b.blocks.extend(s.blocks)
                continue
            b.add_code(body)
            continue
        heading = _MD_HEADING.match(line)
        if heading:
            b.heading(len(heading.group(1)), heading.group(2))
        elif not _MYST_TARGET.match(line):
            b.prose.append(clean_inline(line))
        i += 1
    return b.result()


def _read_fenced(lines: list[str], i: int, marker: str) -> tuple[list[str], int]:
    body = []
    while i < len(lines):
        close = _FENCE.match(lines[i])
        if close and not close.group(3).strip() and close.group(2)[0] == marker[0] \
                and len(close.group(2)) >= len(marker):
            return body, i + 1
        body.append(lines[i])
        i += 1
    return body, i


# --- reStructuredText ---------------------------------------------------------------------------

_RST_ADORN = re.compile(r"^([=\-~^\"'`+*#:._])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]+\|\s+)?([\w:-]+)::\s*(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_CODE = {"code", "code-block", "sourcecode", "literalinclude", "highlight", "math"}
_RST_DROP = {"toctree", "figure", "image", "raw", "autoclass", "autofunction", "automodule",
             "autosummary", "currentmodule", "contents", "include", "unicode", "replace", "only",
             "role", "default-role", "meta", "index"}


def _width(s: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def parse_rst(text: str) -> tuple[Section, ...]:
    b = _Builder()
    styles: list[tuple[str, bool]] = []
    lines = text.split("\n")
    i = 0

    def level_of(style: tuple[str, bool]) -> int:
        if style not in styles:
            styles.append(style)
        return styles.index(style) + 1

    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        # Overlined title: adornment, title, adornment.
        if _RST_ADORN.match(line) and i + 2 < len(lines) and lines[i + 1].strip() \
                and _RST_ADORN.match(lines[i + 2]) and lines[i + 2].strip()[0] == line.strip()[0]:
            b.heading(level_of((line.strip()[0], True)), lines[i + 1].strip())
            i += 3
            continue
        if line.strip() and not line[0].isspace() and _RST_ADORN.match(nxt) \
                and len(nxt.strip()) >= min(3, _width(line.strip())) and not _RST_COMMENT.match(line):
            b.heading(level_of((nxt.strip()[0], False)), line.strip())
            i += 2
            continue
        directive = _RST_DIRECTIVE.match(line)
        if directive or _RST_COMMENT.match(line):
            indent = len(line) - len(line.lstrip())
            body, i = _read_indented(lines, i + 1, indent)
            name = directive.group(2) if directive else ""
            if not directive or name in _RST_DROP:
                continue
            while body and _MYST_OPTION.match(body[0]):
                body.pop(0)
            if name in _RST_CODE:
                b.add_code(body)
            else:
                # Admonitions, tables and unknown directives keep their text.
                arg = directive.group(3).strip()
                if arg and name not in ("list-table", "csv-table", "table"):
                    b.prose.append(clean_inline(arg))
                b.prose.extend(clean_inline(x) for x in _dedent(body).split("\n"))
                b.prose.append("")
            continue
        if line.rstrip().endswith("::") and not _RST_DIRECTIVE.match(line):
            # A paragraph ending in `::` introduces a literal block.
            lead = line.rstrip()[:-2].rstrip()
            if lead:
                b.prose.append(clean_inline(lead + (":" if not lead.endswith(":") else "")))
            indent = len(line) - len(line.lstrip())
            body, i = _read_indented(lines, i + 1, indent)
            b.add_code(body)
            continue
        b.prose.append(clean_inline(line))
        i += 1
    return b.result()


def _read_indented(lines: list[str], i: int, indent: int) -> tuple[list[str], int]:
    """Lines of a block indented deeper than `indent` (blank lines included), from index i."""
    body = []
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
        i += 1
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    return body, i
