"""Embeddings: LlamaIndex's HuggingFaceEmbedding for every profile, plus the facts chunking needs.

The same class loads an HF hub id (``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` honoured by
huggingface_hub itself), a local folder, or a folder prepared by ``make models``.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass

from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from tokenizers import Tokenizer

from jobs.config import EmbedderConfig, Profile
from jobs.device import pick_device
from jobs.errors import JobError

log = logging.getLogger(__name__)


@dataclass
class Embedder:
    model: HuggingFaceEmbedding
    name: str  # as configured: what the store records and compares
    location: str  # the resolved id or folder actually loaded
    dim: int
    window: int  # max tokens the model reads, special tokens included
    query_prefix: str
    passage_prefix: str
    device: str

    @functools.cached_property
    def _counter(self) -> Tokenizer:
        # A private copy of the model's own fast tokenizer without padding or truncation: some
        # tokenizer.json files pad every encoding to the window, which would make every count equal.
        tok = copy.deepcopy(self.model._model.tokenizer.backend_tokenizer)
        tok.no_padding()
        tok.no_truncation()
        return tok

    def token_ids(self, text: str) -> list[int]:
        return self._counter.encode(text, add_special_tokens=False).ids

    def count_tokens(self, text: str) -> int:
        return len(self.token_ids(text))

    @property
    def special_tokens(self) -> int:
        return len(self._counter.encode("", add_special_tokens=True).ids)

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

    def embed_query(self, text: str) -> list[float]:
        return self.model.get_query_embedding(text)

    def identity(self) -> dict[str, str | int]:
        """What a store must agree with to be queried by this embedder."""
        return {
            "embedder": self.name,
            "embedder_dim": self.dim,
            "embedder_window": self.window,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
        }


def load_embedder(profile: Profile, cfg: EmbedderConfig | None = None) -> Embedder:
    cfg = cfg or profile.embedder
    location = profile.resolve_model(cfg.model)
    device = pick_device(cfg.device)
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    started = time.perf_counter()
    try:
        model = HuggingFaceEmbedding(
            model_name=location,
            # None (not "") when unset: LlamaIndex would otherwise guess an instruction from the name.
            query_instruction=cfg.query_prefix or None,
            text_instruction=cfg.passage_prefix or None,
            embed_batch_size=cfg.batch_size,
            device=device,
            normalize=True,
            **kwargs,
        )
    except OSError as exc:
        raise JobError(
            f"cannot load embedder {cfg.model!r} ({location}): {str(exc).splitlines()[0]}. "
            "Use a local folder, set HF_ENDPOINT to a reachable mirror, or run `make models`"
        ) from None
    st = model._model
    # The prompts actually applied (LlamaIndex may infer one from the model name when none is set).
    prompts = getattr(st, "prompts", {}) or {}
    dim = st.get_embedding_dimension()
    window = int(st.max_seq_length)
    log.info("embedder %s on %s: dim=%d window=%d tokens (loaded in %.1fs)",
             cfg.model, device, dim, window, time.perf_counter() - started)
    return Embedder(
        model=model,
        name=cfg.model,
        location=location,
        dim=int(dim),
        window=window,
        query_prefix=prompts.get("query") or "",
        passage_prefix=prompts.get("text") or "",
        device=device,
    )
