"""Prompt texts. Both modes send the question as the user turn; RAG prepends the retrieved context.

The RAG instructions are written in the question's language: small models copy instructions in the
other language into their answers. They ask the model to quote the context's sentences that answer the
question word for word first, then answer with its exact names, commands, options and numbers (version 4):
users need these verbatim, and a small model otherwise paraphrases them away (decisions D15, D17 in
docs/decisions.md; quote-first costs some false "not covered" answers).
Bump PROMPT_VERSION whenever a template changes: runs record it, and cached answers key on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core import PromptTemplate

PROMPT_VERSION = 4

RAG_TEMPLATES = {
    "en": PromptTemplate(
        "Answer the question using only the context below. First quote, word for word, the sentences of the "
        "context that answer it; then answer, using the exact names, commands, options and numbers it gives. "
        "If the context does not contain the answer, say that the documentation does not cover it.\n\n"
        "Context:\n{context_str}\n\n"
        "Question: {query_str}"
    ),
    "zh": PromptTemplate(
        "请只根据下面的资料回答问题：先逐字引用资料中能回答问题的原句，再作答，"
        "回答时直接使用资料中的名称、命令、参数和数字原文。"
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
