"""Prompt texts. Both modes send the question as the user turn; RAG prepends the retrieved context.

Bump PROMPT_VERSION whenever a template changes: runs record it, and cached answers key on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core import PromptTemplate

PROMPT_VERSION = 1

# One bilingual template: the instructions are short and in both languages, so a Chinese question
# is answered in Chinese and an English one in English, and the model is told to abstain.
RAG_TEMPLATE = PromptTemplate(
    "Answer the question using only the context below, in the language of the question. "
    "If the context does not contain the answer, say that the documentation does not cover it.\n"
    "请只根据下面的资料回答问题，用提问的语言作答；如果资料中没有答案，请回答“文档中没有提到”。\n\n"
    "Context / 资料:\n{context_str}\n\n"
    "Question / 问题: {query_str}"
)


def format_context(chunks: Sequence[tuple[str, str, str]]) -> str:
    """(path, heading, text) triples as numbered passages naming their source."""
    return "\n\n".join(f"[{i}] ({path}) {text}" for i, (path, _heading, text) in enumerate(chunks, start=1))


def bare_user_message(question: str) -> str:
    return question


def rag_user_message(question: str, chunks: Sequence[tuple[str, str, str]]) -> str:
    return RAG_TEMPLATE.format(context_str=format_context(chunks), query_str=question)
