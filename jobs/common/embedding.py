"""Embeddings: LlamaIndex's HuggingFaceEmbedding for every profile, plus the facts chunking needs.

The same class loads an HF hub id (``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` honoured by
huggingface_hub itself), a local folder, or a folder prepared by ``make models``. The model loads on
first use, so an ingest that finds nothing changed never pays for it.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from tokenizers import Tokenizer

from jobs.common.config import EmbedderConfig, Profile
from jobs.common.device import pick_device, pick_dtype
from jobs.common.errors import JobError

log = logging.getLogger(__name__)


class Embedder:
    def __init__(self, cfg: EmbedderConfig, location: str) -> None:
        self.cfg = cfg
        self.name = cfg.model  # as configured: what the store records and compares
        self.location = location  # the resolved id or folder actually loaded
        # The configured prefixes are authoritative (LlamaIndex would otherwise guess one from the name).
        self.query_prefix = cfg.query_prefix
        self.passage_prefix = cfg.passage_prefix

    @functools.cached_property
    def device(self) -> str:
        return pick_device(self.cfg.device)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return pick_dtype(self.cfg.dtype, self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @functools.cached_property
    def model(self):  # noqa: ANN201 - llama_index HuggingFaceEmbedding, imported lazily (slow import)
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        kwargs = {"revision": self.cfg.revision} if self.cfg.revision else {}
        started = time.perf_counter()
        try:
            model = HuggingFaceEmbedding(
                model_name=self.location,
                query_instruction=self.query_prefix or None,
                text_instruction=self.passage_prefix or None,
                embed_batch_size=self.cfg.batch_size,
                device=self.device,
                normalize=True,
                **kwargs,
            )
        except OSError as exc:
            raise JobError(
                f"cannot load embedder {self.name!r} ({self.location}): {str(exc).splitlines()[0]}. "
                "Use a local folder, set HF_ENDPOINT to a reachable mirror, or run `make models`"
            ) from None
        model._model.prompts = {"query": self.query_prefix, "text": self.passage_prefix}
        if self.dtype != torch.float32:
            model._model.to(self.dtype)
        log.info("embedder %s on %s (%s): dim=%d window=%d tokens (loaded in %.1fs)", self.name, self.device,
                 self.dtype_name, model._model.get_embedding_dimension(), model._model.max_seq_length,
                 time.perf_counter() - started)
        return model

    @property
    def dim(self) -> int:
        return int(self.model._model.get_embedding_dimension())

    @property
    def window(self) -> int:
        """Max tokens the model reads, special tokens included; the rest is silently truncated."""
        return int(self.model._model.max_seq_length)

    @property
    def _tokenizer(self) -> Tokenizer:
        tok = self.model._model.tokenizer.backend_tokenizer
        # sentence-transformers sets padding/truncation on this shared tokenizer for its own calls,
        # and some tokenizer.json files pad to the window: counts must see neither.
        if tok.padding is not None:
            tok.no_padding()
        if tok.truncation is not None:
            tok.no_truncation()
        return tok

    def token_ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count_tokens(self, text: str) -> int:
        return len(self.token_ids(text))

    @property
    def special_tokens(self) -> int:
        return len(self._tokenizer.encode("", add_special_tokens=True).ids)

    def embed_passages(self, texts: list[str], show_progress: bool = True) -> list[list[float]]:
        """Embed in length-sorted batches (less padding), returned in input order."""
        if not texts:
            return []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        vectors = self.model.get_text_embedding_batch([texts[i] for i in order], show_progress=show_progress)
        out: list[list[float]] = [[] for _ in texts]
        for i, vec in zip(order, vectors):
            out[i] = vec
        return out

    def spec(self) -> dict[str, str]:
        """The part of the identity known without loading the model."""
        return {"embedder": self.name, "query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix}

    def identity(self) -> dict[str, str | int]:
        """What a store must agree with to be queried by this embedder (loads the model)."""
        return {**self.spec(), "embedder_dim": self.dim, "embedder_window": self.window}


def load_embedder(profile: Profile, cfg: EmbedderConfig | None = None) -> Embedder:
    cfg = cfg or profile.embedder
    return Embedder(cfg, profile.resolve_model(cfg.model))
