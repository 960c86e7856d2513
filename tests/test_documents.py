"""Documents (jobs.ingest.documents): markdown and reStructuredText read into sections with their heading paths;
links, images and pure markup dropped, code blocks kept apart from prose and as written."""

from __future__ import annotations

import hashlib

import pytest

from jobs.ingest.documents import CODE, PROSE, language_of, parse_markdown, parse_rst, read_document
from tests.conftest import MINI_CORPUS


def outline(sections) -> list[tuple[str, list[str]]]:
    """(heading path, block kinds) per section."""
    return [(s.heading_path, [b.kind for b in s.blocks]) for s in sections]


def texts(sections, kind: str) -> list[str]:
    return [b.text for s in sections for b in s.blocks if b.kind == kind]


def test_markdown_sections_keep_their_heading_path():
    doc = read_document(MINI_CORPUS, "README.md")
    assert outline(doc.sections) == [("Lumen", [PROSE]), ("Lumen > Supported models", [PROSE]),
                                     ("Lumen > Installation", [CODE, PROSE])]
    assert doc.sections[1].headings == ("Lumen", "Supported models")
    assert texts(doc.sections, CODE) == ["pip install lumen-toolkit"]
    # Table rows keep their cells (padding squeezed), the rule line under the header is dropped.
    assert doc.sections[1].blocks[0].text == "| Model | LoRA | Full |\n| Pico-7M | yes | yes |\n| Nano-30M | yes | no |"
    assert (doc.path, doc.lang) == ("README.md", "en")
    assert doc.sha == hashlib.sha1((MINI_CORPUS / "README.md").read_bytes()).hexdigest()


def test_a_heading_closes_the_sections_at_its_level_and_below():
    sections = parse_markdown("# A\n\na\n\n## B\n\nb\n\n### C\n\nc\n\n## D\n\nd\n\n# E\n\ne\n")
    assert [s.heading_path for s in sections] == ["A", "A > B", "A > B > C", "A > D", "E"]
    assert [s.blocks[0].text for s in sections] == ["a", "b", "c", "d", "e"]


def test_myst_admonitions_are_prose_and_their_options_are_dropped():
    doc = read_document(MINI_CORPUS, "docs/en/config.md")
    rate = next(s for s in doc.sections if s.heading_path == "Configuration > Learning rate")
    assert [b.kind for b in rate.blocks] == [PROSE]
    assert "Lower the learning rate when the loss spikes" in rate.blocks[0].text
    assert ":class:" not in rate.blocks[0].text and "{tip}" not in rate.blocks[0].text
    logging = next(s for s in doc.sections if s.heading_path == "Configuration > Logging")
    assert [b.kind for b in logging.blocks] == [PROSE, CODE]
    assert logging.blocks[1].text.splitlines()[::15] == ["step 1 loss 9.81 lr 0.0003 tokens 4096",
                                                          "step 16 loss 8.55 lr 0.0003 tokens 65536"]


def test_links_images_html_and_comments_are_dropped_from_prose_but_code_is_kept_as_written():
    sections = parse_markdown(
        "# Guide ![badge](https://ci.example/badge.svg)\n\n"
        "See ![logo](img/logo.png) the [install guide](https://example.invalid/install) and <b>bold</b> words."
        "<!-- a hidden\nnote -->\n\n"
        "```python\n# a comment, not a heading\nurl = \"[not a link](x)\"  # <b>kept</b>\n```\n\n"
        "```{toctree}\n:maxdepth: 1\n\nintro\n```\n\n"
        "```{figure} img/arch.png\nThe architecture.\n```\n\n"
        "(a-target)=\n"
        "Last words.\n")
    assert outline(sections) == [("Guide", [PROSE, CODE, PROSE])]
    prose = " ".join(texts(sections, PROSE))
    assert prose == "See  the install guide and bold words. Last words."
    for gone in ("logo", "https://", "<b>", "hidden", "intro", "architecture", "a-target", "badge"):
        assert gone not in prose
    assert texts(sections, CODE) == ['# a comment, not a heading\nurl = "[not a link](x)"  # <b>kept</b>']


def test_an_unclosed_fence_keeps_the_rest_as_code():
    sections = parse_markdown("# T\n\nintro\n\n~~~~\nline 1\n    line 2\n")
    assert outline(sections) == [("T", [PROSE, CODE])]
    assert texts(sections, CODE) == ["line 1\n    line 2"]


def test_rst_titles_by_adornment_style_and_literal_blocks():
    doc = read_document(MINI_CORPUS, "docs/zh_cn/quickstart.rst")
    assert outline(doc.sections) == [("快速上手", [PROSE]), ("快速上手 > 准备数据", [PROSE]),
                                     ("快速上手 > 启动训练", [PROSE, CODE]),
                                     ("快速上手 > 启动训练 > 显存不足", [PROSE])]
    assert doc.lang == "zh"
    prepare = doc.sections[1].blocks[0].text
    assert "包含 messages 字段" in prepare and "``" not in prepare  # inline literal markup dropped
    assert "缓存是否命中取决于" in prepare and ".. tip::" not in prepare  # an admonition keeps its text
    start = doc.sections[2]
    assert start.blocks[0].text == "使用下面的命令启动训练:"  # the `::` that opens a literal block becomes ':'
    assert start.blocks[1].text == "lumen train --model pico-7m --data train.jsonl"


def test_rst_links_roles_and_dropped_directives():
    sections = parse_rst(
        "Title\n=====\n\n"
        "Read `the guide <https://example.invalid/g>`_ and :doc:`the intro <intro>` or :func:`run`.\n\n"
        ".. image:: a.png\n\n"
        ".. figure:: b.png\n\n   A caption about the figure.\n\n"
        ".. a comment\n   that goes on\n\n"
        ".. code-block:: python\n   :linenos:\n\n   x = 1\n   if x:\n       y = 2\n\n"
        "Sub\n---\n\nThe end.\n")
    assert outline(sections) == [("Title", [PROSE, CODE]), ("Title > Sub", [PROSE])]
    assert sections[0].blocks[0].text == "Read the guide and the intro or run."
    assert sections[0].blocks[1].text == "x = 1\nif x:\n    y = 2"  # options dropped, indentation kept


def test_a_bom_and_crlf_read_as_the_plain_file(tmp_path):
    plain = (MINI_CORPUS / "docs/zh_cn/faq.md").read_bytes()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/faq.md").write_bytes(b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n"))
    damaged = read_document(tmp_path, "docs/faq.md")
    assert damaged.sections == read_document(MINI_CORPUS, "docs/zh_cn/faq.md").sections
    assert [s.heading_path for s in damaged.sections] == ["常见问题 > 支持 Windows 吗？", "常见问题 > 如何恢复训练？"]
    assert damaged.sha != hashlib.sha1(plain).hexdigest()  # the hash is of the bytes as they are


def test_content_chars_counts_the_text_without_headings():
    assert read_document(MINI_CORPUS, "docs/en/stub.md").content_chars == len("Coming soon...")
    assert parse_markdown("# Only a heading\n") == ()


@pytest.mark.parametrize(("path", "lang"), [
    ("docs/zh_cn/faq.md", "zh"), ("docs/zh/intro.md", "zh"), ("README_zh-CN.md", "zh"), ("README.md", "en"),
    ("docs/en/config.md", "en"), ("docs/zhongwen.md", "en"),
])
def test_language_from_the_path(path, lang):
    assert language_of(path) == lang
