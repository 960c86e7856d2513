"""The answering model, one backend per module behind one interface (jobs.llm.base.ChatModel):

- ``huggingface``: in process, transformers through LlamaIndex's HuggingFaceLLM (the one-machine default);
- ``openai_chat``: a client of an OpenAI-compatible server (LMDeploy, vLLM, llama.cpp's server).

The eval job calls ``load_llm`` and the interface, never a backend.
"""

from __future__ import annotations

from jobs.common.config import Profile
from jobs.llm.base import ChatModel, Completion, OnResult, ServerLost

__all__ = ["ChatModel", "Completion", "OnResult", "ServerLost", "load_llm"]


def load_llm(profile: Profile) -> ChatModel:
    """The profile's answering model, loaded (in process) or probed (served)."""
    if profile.llm.backend == "openai":
        from jobs.llm.openai_chat import load_openai

        return load_openai(profile)
    from jobs.llm.huggingface import load_hf

    return load_hf(profile)
