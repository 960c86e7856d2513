"""The answering model: LlamaIndex's HuggingFaceLLM, with every prompt rendered by the model's chat template.

``HuggingFaceLLM`` defaults are unfair to a bare-vs-RAG comparison: ``chat()`` goes through the chat
template but a query engine calls ``complete()`` with the raw QA text. Here both modes call
``complete()`` with the user message only, and ``completion_to_prompt`` renders it through the same
chat template with the same system prompt, so the two prompts differ only in their user content.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from llama_index.llms.huggingface import HuggingFaceLLM
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from jobs.config import LLMConfig, Profile
from jobs.device import pick_device, pick_dtype
from jobs.errors import JobError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt: str  # exactly what was tokenized
    prompt_tokens: int
    answer_tokens: int
    seconds: float


def load_kwargs(cfg: LLMConfig, location: str) -> dict:
    """from_pretrained kwargs for model and tokenizer: remote code only at a pinned revision."""
    kwargs: dict = {}
    is_local = Path(location).is_dir()
    if cfg.trust_remote_code:
        if not cfg.revision and not is_local:
            raise JobError(
                f"llm {cfg.model!r} runs remote code (trust_remote_code=true) but [llm].revision is empty: "
                "pin the hub commit you reviewed with --set llm.revision=<sha> (or use a local folder)"
            )
        kwargs["trust_remote_code"] = True
    if cfg.revision and not is_local:
        kwargs["revision"] = cfg.revision
    return kwargs


def render_chat(tokenizer: PreTrainedTokenizerBase, system: str, user: str, *, strip_bos: bool) -> str:
    """One user turn through the model's chat template, ready for generation."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if strip_bos and bos and text.startswith(bos):
        # The tokenizer adds BOS itself when it encodes this text: keep exactly one.
        text = text[len(bos):]
    return text


class ChatLLM:
    """A chat model that answers one user message at a time, greedily, through HuggingFaceLLM."""

    def __init__(self, cfg: LLMConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 name: str, device: str) -> None:
        if tokenizer.chat_template is None:
            raise JobError(f"llm {name!r}: the tokenizer has no chat template; bare and RAG prompts need one")
        self.cfg = cfg
        self.name = name
        self.device = device
        self.tokenizer = tokenizer
        self.model = model
        stop_ids = list(cfg.stop_ids) or [tokenizer.eos_token_id]
        self.stop_ids = [int(i) for i in stop_ids if i is not None]
        self.hf = HuggingFaceLLM(
            model=model,
            tokenizer=tokenizer,
            model_name=name,
            tokenizer_name=name,
            context_window=int(getattr(model.config, "max_position_embeddings", 4096)),
            max_new_tokens=cfg.max_new_tokens,
            stopping_ids=self.stop_ids,
            generate_kwargs={"do_sample": False, "eos_token_id": self.stop_ids,
                             "pad_token_id": tokenizer.pad_token_id or self.stop_ids[0]},
            completion_to_prompt=self.render,
            is_chat_model=False,
            # Some tokenizers emit token_type_ids, which causal LMs' generate() rejects.
            tokenizer_outputs_to_remove=["token_type_ids"],
        )

    def render(self, user: str) -> str:
        return render_chat(self.tokenizer, self.cfg.system_prompt, user,
                           strip_bos=self.cfg.strip_bos_from_template)

    def complete(self, user: str) -> Completion:
        torch.manual_seed(self.cfg.seed)
        prompt = self.render(user)
        started = time.perf_counter()
        with torch.inference_mode():
            response = self.hf.complete(user)
        seconds = time.perf_counter() - started
        prompt_tokens = len(self.tokenizer(prompt)["input_ids"])
        output = response.raw["model_output"][0]
        return Completion(text=response.text.strip(), prompt=prompt, prompt_tokens=prompt_tokens,
                          answer_tokens=int(output.shape[-1]) - prompt_tokens, seconds=seconds)

    def identity(self) -> dict[str, str | int | float | bool]:
        return {"llm": self.name, "llm_revision": self.cfg.revision, "llm_device": self.device,
                "llm_dtype": str(self.model.dtype).removeprefix("torch."),
                "max_new_tokens": self.cfg.max_new_tokens, "do_sample": False, "seed": self.cfg.seed,
                "stop_ids": ",".join(map(str, self.stop_ids))}


def load_llm(profile: Profile) -> ChatLLM:
    cfg = profile.llm
    if not cfg.model:
        raise JobError(f"profile {profile.name!r} names no [llm].model")
    location = profile.resolve_model(cfg.model)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    kwargs = load_kwargs(cfg, location)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, torch_dtype=dtype, **kwargs,
            # SDPA where the architecture supports it; remote-code models pick their own.
            **({} if cfg.trust_remote_code else {"attn_implementation": "sdpa"}),
        )
    except OSError as exc:
        raise JobError(
            f"cannot load llm {cfg.model!r} ({location}): {str(exc).splitlines()[0]}. Use a local folder, "
            "set HF_ENDPOINT to a reachable mirror, or run `make models`"
        ) from None
    model.to(device).eval()
    log.info("llm %s on %s (%s) loaded in %.1fs", cfg.model, device, dtype, time.perf_counter() - started)
    return ChatLLM(cfg, model, tokenizer, cfg.model, device)
