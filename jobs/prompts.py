"""Prompt texts. Both modes send the question as the user turn; RAG prepends the retrieved context.

The RAG instructions are written in the question's language: small models copy instructions in the
other language into their answers. They ask for the context's exact names, commands, options and numbers
(version 3): users need them verbatim, and a small model otherwise paraphrases them away. Measured with
offline-zh on both development sets, RAG keyword hit pooled 0.255 -> 0.271 (dev 0.34 -> 0.40, hard 0.17 -> 0.15;
each within noise). Bump PROMPT_VERSION whenever a template changes: runs record it,
and cached answers key on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core import PromptTemplate

PROMPT_VERSION = 3

RAG_TEMPLATES = {
    "en": PromptTemplate(
        "Answer the question using only the context below, and use the exact names, commands, options and "
        "numbers it gives. If the context does not contain the answer, say that the documentation does not "
        "cover it.\n\n"
        "Context:\n{context_str}\n\n"
        "Question: {query_str}"
    ),
    "zh": PromptTemplate(
        "请只根据下面的资料回答问题，回答时直接使用资料中的名称、命令、参数和数字原文。"
        "如果资料中没有答案，请回答“文档中没有提到”。\n\n"
        "资料：\n{context_str}\n\n"
        "问题：{query_str}"
    ),
}


def format_context(chunks: Sequence[tuple[str, str, str]]) -> str:
    """(path, heading, text) triples as numbered passages naming their source."""
    return "\n\n".join(f"[{i}] ({path}) {text}" for i, (path, _heading, text) in enumerate(chunks, start=1))


def bare_user_message(question: str) -> str:
    return question


def rag_user_message(question: str, chunks: Sequence[tuple[str, str, str]], language: str = "en") -> str:
    template = RAG_TEMPLATES.get(language, RAG_TEMPLATES["en"])
    return template.format(context_str=format_context(chunks), query_str=question)
