"""The in-process backend: LlamaIndex's HuggingFaceLLM, with every prompt rendered by the model's chat template.

``HuggingFaceLLM`` defaults are unfair to a bare-vs-RAG comparison: ``chat()`` goes through the chat
template but a query engine calls ``complete()`` with the raw QA text. Here both modes call
``complete()`` with the user message only, and ``completion_to_prompt`` renders it through the same
chat template with the same system prompt, so the two prompts differ only in their user content.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from llama_index.llms.huggingface import HuggingFaceLLM
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from jobs.common.config import LLMConfig, Profile
from jobs.common.device import pick_device, pick_dtype
from jobs.common.errors import JobError
from jobs.llm.base import Completion, OnResult, control_tokens, defuse_control_tokens
from jobs.llm.cache import folder_fingerprint

log = logging.getLogger(__name__)


class AnswerPresencePenalty(LogitsProcessor):
    """OpenAI's presence penalty for generate(): ``penalty`` off the logit of every token the answer holds so
    far. The first call's input is the (padded) prompt, so the prompt is never counted. One per generate()."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        answer = input_ids[:, self.prompt_width:]
        if answer.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, answer, True)
        return scores - self.penalty * seen.to(scores.dtype)


def _decoding(penalty: float) -> dict:
    """generate() kwargs for one call: a fresh processor, since it remembers its call's prompt width."""
    return {"logits_processor": LogitsProcessorList([AnswerPresencePenalty(penalty)])} if penalty else {}


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
                 name: str, device: str, location: str = "") -> None:
        if tokenizer.chat_template is None:
            raise JobError(f"llm {name!r}: the tokenizer has no chat template; bare and RAG prompts need one")
        self.cfg = cfg
        self.name = name
        self.location = location or name
        self.device = device
        self.tokenizer = tokenizer
        # Built once: every prompt is defused against it.
        self.control_tokens = control_tokens([*tokenizer.all_special_tokens,
                                              *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                if t.special)])
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
        return render_chat(self.tokenizer, self.cfg.system_prompt, defuse_control_tokens(user, self.control_tokens),
                           strip_bos=self.cfg.strip_bos_from_template)

    def complete(self, user: str) -> Completion:
        return self.generate([self.render(user)])[0]

    @property
    def window(self) -> int:
        """Tokens the model can attend to: prompt and answer together."""
        return self.hf.context_window

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        """Greedy answers to rendered prompts, in order; ``on_result(index, completion)`` as each is done.
        batch_size 1 goes through HuggingFaceLLM one prompt at a time; larger batches go through batched
        generate() with identical answers. A prompt that cannot fit the window with its answer is not
        run: it comes back as a failed completion saying so."""
        out: list[Completion | None] = [None] * len(prompts)

        def done(i: int, completion: Completion) -> None:
            out[i] = completion
            if on_result is not None:
                on_result(i, completion)

        lengths = [len(self.tokenizer(p)["input_ids"]) for p in prompts]
        runnable = []
        for i, n in enumerate(lengths):
            if n + self.cfg.max_new_tokens > self.window:
                done(i, Completion("", prompts[i], n, 0, 0.0, error=(
                    f"prompt of {n} tokens + {self.cfg.max_new_tokens} new tokens exceeds the model's window "
                    f"of {self.window} tokens")))
            else:
                runnable.append(i)
        if self.cfg.batch_size <= 1:
            for i in runnable:
                done(i, self._one(prompts[i], presence_penalty))
        else:
            for batch in self.batches([lengths[i] for i in runnable]):
                rows = [runnable[j] for j in batch]
                for i, completion in zip(rows, self._batch([prompts[i] for i in rows], presence_penalty)):
                    done(i, completion)
        return out  # type: ignore[return-value]

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped longest first (least padding), each batch within the row and token budgets."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if batches:
                cur = batches[-1]
                rows = len(cur) + 1
                longest = max(lengths[cur[0]], lengths[i]) + self.cfg.max_new_tokens
                if rows <= self.cfg.batch_size and rows * longest <= self.cfg.max_batch_tokens:
                    cur.append(i)
                    continue
            batches.append([i])
        return batches

    def _one(self, prompt: str, presence_penalty: float = 0.0) -> Completion:
        torch.manual_seed(self.cfg.seed)
        started = time.perf_counter()
        # HuggingFaceLLM.complete() passes no per-call kwargs to generate(): its generate_kwargs, for this call.
        kwargs = self.hf.generate_kwargs
        self.hf.generate_kwargs = {**kwargs, **_decoding(presence_penalty)}
        try:
            with torch.inference_mode():
                response = self.hf.complete(prompt, formatted=True)
        finally:
            self.hf.generate_kwargs = kwargs
        seconds = time.perf_counter() - started
        prompt_tokens = len(self.tokenizer(prompt)["input_ids"])
        output = response.raw["model_output"][0]
        return Completion(text=response.text.strip(), prompt=prompt, prompt_tokens=prompt_tokens,
                          answer_tokens=int(output.shape[-1]) - prompt_tokens, seconds=seconds)

    def _batch(self, prompts: list[str], presence_penalty: float = 0.0) -> list[Completion]:
        torch.manual_seed(self.cfg.seed)
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        width = max(len(ids) for ids in encoded)
        pad = self.hf.generate_kwargs["pad_token_id"]
        # Left padding: every row's last prompt token sits at the same position, where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
                                      **self.hf.generate_kwargs, **_decoding(presence_penalty))
        seconds = (time.perf_counter() - started) / len(prompts)  # amortised per answer
        results = []
        stops = set(self.stop_ids)
        for prompt, ids, row in zip(prompts, encoded, out[:, width:].tolist()):
            # Each row stops at its own first stop id (finished rows are padded after it).
            end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            results.append(Completion(text=text, prompt=prompt, prompt_tokens=len(ids), answer_tokens=end,
                                      seconds=seconds))
        return results

    @property
    def questions_per_step(self) -> int:
        return max(1, self.cfg.batch_size)

    def close(self) -> None:
        pass

    @functools.cached_property
    def _weights(self) -> str:
        # Hashing a local model folder reads files: once per process, not once per batch.
        location = Path(self.location)
        return folder_fingerprint(location) if location.is_dir() else ""

    def fingerprint(self) -> dict:
        """What determines an answer besides the prompt: the cache key's model part."""
        return {"model": self.name, "revision": self.cfg.revision, "weights": self._weights,
                "dtype": str(self.model.dtype), "device": self.device.split(":")[0],
                "max_new_tokens": self.cfg.max_new_tokens, "do_sample": False, "stop_ids": self.stop_ids,
                "seed": self.cfg.seed}

    def identity(self) -> dict[str, str | int | float | bool]:
        return {"llm": self.name, "llm_backend": "hf (in process)", "llm_revision": self.cfg.revision,
                "llm_device": self.device,
                "llm_dtype": str(self.model.dtype).removeprefix("torch."),
                "max_new_tokens": self.cfg.max_new_tokens, "do_sample": False, "seed": self.cfg.seed,
                "stop_ids": ",".join(map(str, self.stop_ids))}


def load_hf(profile: Profile) -> ChatLLM:
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
    return ChatLLM(cfg, model, tokenizer, cfg.model, device, location)
