"""Chunking (jobs.ingest.chunking) with MiniLM's own tokenizer: every chunk fits the window the way the embedder
reads it (passage prefix and special tokens included), consecutive chunks overlap, long code is capped."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.common.config import ChunkingConfig
from jobs.common.errors import JobError
from jobs.ingest.chunking import Chunker, cap_code, split_sentences
from jobs.ingest.documents import Document, parse_markdown, read_document
from tests.conftest import MINI_CORPUS

WINDOW = 256  # MiniLM's max_seq_length
FACTS = "# Facts\n\n" + " ".join(f"Fact {i} is short." for i in range(1, 31)) + "\n"


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str):
    """MiniLM's tokenizer as the embedder counts with it (its tokenizer.json pads and truncates to 128: not here)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(minilm_path) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def measure(minilm_path: str):
    """Tokens the embedder reads for a passage, counted independently of the chunker: the whole text, prefix
    first, through transformers' tokenizer with its special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    return lambda text: len(tok(text, truncation=False)["input_ids"])


def make_chunker(tokenizer, *, size: int = 48, overlap: int = 8, code_max_lines: int = 6,
                 prefix: str = "passage: ") -> Chunker:
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return Chunker(ChunkingConfig(size=size, overlap=overlap, code_max_lines=code_max_lines),
                   count_tokens=lambda text: len(ids(text)), token_ids=ids, passage_prefix=prefix,
                   special_tokens=len(tokenizer.encode("", add_special_tokens=True).ids), window=WINDOW)


def corpus_documents() -> list[Document]:
    rels = sorted(p.relative_to(MINI_CORPUS).as_posix() for p in MINI_CORPUS.rglob("*") if p.is_file())
    sentence = "句话讲的是训练时如何节省显存，以及为什么要开启梯度检查点。"
    long_zh = "# 长文\n\n" + "".join(f"第{i}{sentence}" for i in range(20))
    return [*(read_document(MINI_CORPUS, rel) for rel in rels),
            Document("facts.md", "en", "0", parse_markdown(FACTS)),
            Document("long_zh.md", "zh", "0", parse_markdown(long_zh))]


def body(chunk) -> str:
    """A chunk's text without its heading line."""
    return chunk.text.split("\n", 1)[1]


@pytest.mark.parametrize("prefix", ["", "passage: ", "Represent this document for retrieving relevant passages: "])
def test_every_chunk_fits_the_window_with_its_prefix_and_special_tokens(tokenizer, measure, prefix):
    chunker = make_chunker(tokenizer, size=48, prefix=prefix)
    chunks = [c for doc in corpus_documents() for c in chunker.chunk(doc)]
    assert len(chunks) > 20  # the size really forced splitting
    for c in chunks:
        assert c.n_tokens == measure(prefix + c.text) <= 48, c.text
    # The longer the prefix, the less room for text: more chunks.
    assert len(chunks) > len([c for doc in corpus_documents() for c in make_chunker(tokenizer, size=64,
                                                                                      prefix=prefix).chunk(doc)])


def test_chunks_start_with_their_heading_path_and_are_numbered_per_file(tokenizer):
    doc = read_document(MINI_CORPUS, "docs/zh_cn/quickstart.rst")
    chunks = make_chunker(tokenizer, size=64).chunk(doc)  # room for the whole heading path (64 // 4 tokens)
    assert [c.ordinal for c in chunks] == list(range(len(chunks))) and len(chunks) > len(doc.sections)
    assert [c.id for c in chunks[:2]] == ["docs/zh_cn/quickstart.rst#0000", "docs/zh_cn/quickstart.rst#0001"]
    for c in chunks:
        assert c.text.startswith(c.heading + "\n") and c.path == doc.path and c.lang == "zh" and c.file_sha == doc.sha
    assert {c.heading for c in chunks} == {s.heading_path for s in doc.sections}
    assert chunks[0].metadata("abc")["commit"] == "abc" and chunks[0].metadata("abc")["n_tokens"] == chunks[0].n_tokens


def test_a_deep_heading_path_leaves_most_of_the_window_to_the_text(tokenizer):
    heading = "\n\n".join("#" * (i + 1) + f" Level {i} heading with quite a few words in it" for i in range(6))
    doc = Document("deep.md", "en", "0", parse_markdown(heading + "\n\nThe text under the deepest heading.\n"))
    chunker = make_chunker(tokenizer, size=64)
    (chunk,) = chunker.chunk(doc)
    shown = chunk.text.split("\n", 1)[0]
    assert chunk.heading.count(" > ") == 5 and shown != chunk.heading  # cut from the top ...
    assert chunk.heading.endswith(shown) and shown.startswith("Level")  # ... keeping the deepest levels
    assert len(tokenizer.encode(shown, add_special_tokens=False).ids) <= 64 // 4
    assert body(chunk) == "The text under the deepest heading."


def test_consecutive_chunks_overlap_by_whole_sentences(tokenizer):
    doc = Document("facts.md", "en", "0", parse_markdown(FACTS))
    overlapping = make_chunker(tokenizer, overlap=8).chunk(doc)
    assert len(overlapping) >= 3
    for before, after in zip(overlapping, overlapping[1:]):
        first = body(after).split(". ")[0] + "."
        assert body(before).endswith(first)  # the next chunk repeats the last sentence (~5 tokens <= 8)
    # Without overlap every sentence is in exactly one chunk, in order.
    apart = make_chunker(tokenizer, overlap=0).chunk(doc)
    assert " ".join(body(c) for c in apart) == FACTS.split("\n\n", 1)[1].strip()
    assert len(apart) < len(overlapping) or sum(len(c.text) for c in apart) < sum(len(c.text) for c in overlapping)


def test_long_code_is_capped_before_chunking(tokenizer):
    doc = read_document(MINI_CORPUS, "docs/en/config.md")  # a 16-line training log
    text = "\n".join(c.text for c in make_chunker(tokenizer, code_max_lines=6).chunk(doc))
    assert "step 6 loss" in text and "step 7 loss" not in text and "… (10 more lines)" in text
    uncapped = "\n".join(c.text for c in make_chunker(tokenizer, code_max_lines=100).chunk(doc))
    assert "step 16 loss" in uncapped and "more lines)" not in uncapped


def test_cap_code_cuts_lines_and_long_lines():
    code = "\n".join(f"line {i}" for i in range(1, 11))
    assert cap_code(code, 10) == code
    assert cap_code(code, 4) == "line 1\nline 2\nline 3\nline 4\n… (6 more lines)"
    assert cap_code("x" * 500, 3) == "x" * 160  # a minified or base64 line cannot swamp a chunk


def test_sentences_end_at_chinese_marks_and_at_ascii_marks_before_a_space():
    assert split_sentences("第一句。第二句！Third one. Fourth? v1.5 stays\nnext") == [
        "第一句。", "第二句！", "Third one. ", "Fourth? ", "v1.5 stays\n", "next"]


def test_a_size_beyond_the_window_is_refused(tokenizer):
    with pytest.raises(JobError, match=r"\[chunking\]\.size=512 exceeds the embedder's window of 256 tokens"):
        make_chunker(tokenizer, size=512)
