"""The served backend: the job as a client of an OpenAI-compatible chat server (LMDeploy or vLLM for InternLM2
on GPUs, llama.cpp's server for the packaged models here), through LlamaIndex's ``OpenAILike``, async, with
up to ``concurrency`` requests in flight.

Both modes send the same system message and differ only in the user message, as in process; the server
applies the model's own chat template. Decoding is greedy (temperature 0, the profile's seed and
``max_new_tokens``). The server is probed before the first question: it must be up, serve the configured
model, and accept the key. Transient failures (connection errors, timeouts, 429, 5xx) are retried with
LlamaIndex's own backoff policy; a request that still fails becomes a failed answer with its error, and a
server that stops answering altogether stops the run, keeping every answer so far for ``--resume``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import time
from typing import Any

import httpx

from jobs.common.config import LLMConfig, Profile
from jobs.common.errors import JobError
from jobs.common.urls import redact, redact_text
from jobs.llm.base import Completion, OnResult, ServerLost, defuse_control_tokens

log = logging.getLogger(__name__)

# Fields of a /v1/models entry that change without the model changing (start time, request counters).
_VOLATILE = ("created",)


def api_key(cfg: LLMConfig) -> str:
    """The key from the environment variable the profile names; servers without auth accept any."""
    if not cfg.api_key_env:
        return "none"
    value = os.environ.get(cfg.api_key_env, "")
    if not value:
        raise JobError(f"[llm].api_key_env names {cfg.api_key_env}, but that environment variable is not set")
    return value


def _describe(exc: BaseException) -> str:
    return redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))


def probe(cfg: LLMConfig, key: str) -> dict:
    """The server's entry for the configured model, after checking it is up, serves it, and takes the key.
    Every failure is one line naming the URL."""
    url = cfg.base_url.rstrip("/")
    shown = redact(url)  # what messages say: never the credentials a URL may carry
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(timeout=min(cfg.timeout_s, 30.0)) as client:
            listed = client.get(f"{url}/models", headers=headers)
            if listed.status_code in (401, 403):
                raise JobError(f"model server {shown} refused the API key (HTTP {listed.status_code}): "
                               f"check ${cfg.api_key_env or '(no api_key_env set)'}")
            if listed.status_code != 200:
                raise JobError(f"model server {shown}: GET /models answered HTTP {listed.status_code}")
            models = listed.json().get("data") or []
            entry = next((m for m in models if cfg.model == m.get("id") or cfg.model in (m.get("aliases") or [])),
                         None)
            if entry is None:
                served = ", ".join(str(m.get("id")) for m in models) or "nothing"
                raise JobError(f"model server {shown} does not serve {cfg.model!r} (it serves: {served}); "
                               "set [llm].model to the served name")
            # Listing models needs no key on some servers (llama.cpp): one token of chat checks the key too.
            tried = client.post(f"{url}/chat/completions", headers=headers, json={
                "model": cfg.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1,
                "temperature": 0})
            if tried.status_code in (401, 403):
                raise JobError(f"model server {shown} refused the API key (HTTP {tried.status_code}): "
                               f"check ${cfg.api_key_env or '(no api_key_env set)'}")
            if tried.status_code != 200:
                raise JobError(f"model server {shown}: a one-token chat request answered HTTP {tried.status_code}: "
                               f"{tried.text[:200]}")
    except httpx.HTTPError as exc:
        raise JobError(f"cannot reach the model server at {shown} ({_describe(exc)}): is it running? "
                       "(`make serve-llm PROFILE=...` starts the local one)") from None
    except ValueError as exc:
        raise JobError(f"model server {shown}: GET /models did not return JSON ({exc})") from None
    return {k: v for k, v in entry.items() if k not in _VOLATILE}


class ServedLLM:
    """A chat model behind an OpenAI-compatible server."""

    def __init__(self, cfg: LLMConfig, served: dict, key: str) -> None:
        from llama_index.llms.openai.utils import create_retry_decorator

        self.cfg = cfg
        self.name = cfg.model
        self.served = served
        self._key = key
        # LlamaIndex's policy for OpenAI: connection errors, timeouts, 429 and 5xx, random exponential
        # backoff honouring Retry-After, bounded in count and in time.
        self._retry = create_retry_decorator(max_retries=cfg.max_retries + 1, random_exponential=True,
                                             stop_after_delay_seconds=cfg.timeout_s, min_seconds=0.5,
                                             max_seconds=10)

    def render(self, user: str) -> str:
        messages = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []) + [
            {"role": "user", "content": defuse_control_tokens(user)}]
        return json.dumps(messages, ensure_ascii=False)

    @property
    def questions_per_step(self) -> int:
        # Requests are in flight together across questions: hand over enough to keep every slot busy.
        return max(32, 4 * self.cfg.concurrency)

    def _client(self, http: httpx.AsyncClient, presence_penalty: float = 0.0) -> Any:
        from llama_index.llms.openai_like import OpenAILike

        return OpenAILike(
            async_http_client=http,
            model=self.cfg.model, api_base=self.cfg.base_url, api_key=self._key, is_chat_model=True, temperature=0.0,
            max_tokens=self.cfg.max_new_tokens, timeout=self.cfg.timeout_s,
            # Sent only when set: what a server counts toward it is its own (vLLM: the generated tokens only;
            # llama.cpp's server: the last repeat_last_n tokens of prompt and answer, ggml-org/llama.cpp#3727).
            additional_kwargs={"seed": self.cfg.seed,
                               **({"presence_penalty": presence_penalty} if presence_penalty else {})},
            # Retries are ours (below), counted once: the client's and LlamaIndex's would multiply.
            max_retries=0, reuse_client=True,
            context_window=int((self.served.get("meta") or {}).get("n_ctx") or 4096),
        )

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        # One event loop per call, and a client made inside it: an async HTTP client is bound to its loop.
        return asyncio.run(self._generate(prompts, on_result, presence_penalty))

    async def _generate(self, prompts: list[str], on_result: OnResult | None,
                        presence_penalty: float) -> list[Completion]:
        import openai

        # Our own HTTP client, closed inside this loop (the SDK's own would be collected after it closed).
        http = httpx.AsyncClient(timeout=self.cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=self.cfg.concurrency * 2),
                                 event_hooks={"response": [_remember_reply]})
        llm = self._client(http, presence_penalty)
        out: list[Completion | None] = [None] * len(prompts)
        gate = asyncio.Semaphore(self.cfg.concurrency)

        async def one(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                attempts = [0]
                try:
                    completion = await self._ask(llm, prompts[i], started, attempts)
                except openai.APITimeoutError:
                    completion = self._failed(prompts[i], started, f"timed out: no reply within llm.timeout_s="
                                              f"{self.cfg.timeout_s:g}s {_tries(attempts[0])}")
                except openai.APIConnectionError as exc:
                    raise ServerLost(f"lost the model server at {redact(self.cfg.base_url)} ({_describe(exc)}; "
                                     f"{_tries(attempts[0])})") from None
                except openai.APIStatusError as exc:
                    completion = self._failed(prompts[i], started, f"HTTP {exc.status_code}: {_server_message(exc)} "
                                              f"{_tries(attempts[0])}")
                except Exception as exc:  # noqa: BLE001 - any reply that is not a chat completion
                    # A body that is not JSON (a proxy's HTML error page with status 200), no choices, no message:
                    # one failed answer, like any other failed request, never the whole night.
                    completion = self._failed(prompts[i], started, f"malformed reply from the server: "
                                              f"{_LAST_REPLY.get() or 'no reply read'} ({_describe(exc)[:120]})")
            out[i] = completion
            if on_result is not None:
                on_result(i, completion)

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await http.aclose()
        return out  # type: ignore[return-value]

    async def _ask(self, llm: Any, prompt: str, started: float, attempts: list[int]) -> Completion:
        from llama_index.core.llms import ChatMessage

        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in json.loads(prompt)]

        async def attempt() -> Any:
            attempts[0] += 1  # counted here: what an error message says was tried is what was sent
            return await llm.achat(messages)

        response = await self._retry(attempt)()
        if not isinstance(getattr(response.message, "content", None), (str, type(None))):
            raise ValueError(f"the reply's message content is a {type(response.message.content).__name__}")
        usage = getattr(response.raw, "usage", None)
        extra = getattr(response.raw, "model_extra", None) or {}
        return Completion(text=(response.message.content or "").strip(), prompt=prompt,
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          answer_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          seconds=time.perf_counter() - started, timings=extra.get("timings"))

    def _failed(self, prompt: str, started: float, error: str) -> Completion:
        log.warning("request failed: %s", error)
        return Completion("", prompt, 0, 0, time.perf_counter() - started, error=error)

    def fingerprint(self) -> dict:
        """The served model as the server describes it, and the decoding: not the URL (the same model on
        another host or port answers the same)."""
        return {"backend": "openai", "model": self.cfg.model, "served": self.served,
                "max_new_tokens": self.cfg.max_new_tokens, "temperature": 0.0, "seed": self.cfg.seed}

    def identity(self) -> dict[str, str | int | float | bool]:
        meta = self.served.get("meta") or {}
        described = ", ".join(f"{k} {meta[k]}" for k in ("n_params", "ftype", "n_ctx") if k in meta)
        return {"llm": self.cfg.model,
                "llm_backend": f"openai ({redact(self.cfg.base_url)}, {self.cfg.concurrency} in flight)",
                "llm_server_model": f"{self.served.get('id')} (owned by {self.served.get('owned_by', '?')}"
                                    + (f"; {described})" if described else ")"),
                "max_new_tokens": self.cfg.max_new_tokens, "do_sample": False, "seed": self.cfg.seed}

    def close(self) -> None:
        pass


# The last HTTP reply of the request in flight in this task (each request runs in its own task, and so has its
# own context): what a malformed reply looked like, for its error message.
_LAST_REPLY: contextvars.ContextVar[str] = contextvars.ContextVar("last_reply", default="")


async def _remember_reply(response: httpx.Response) -> None:
    await response.aread()
    text = " ".join(response.text[:120].split())
    _LAST_REPLY.set(f"HTTP {response.status_code} {response.headers.get('content-type', 'without a content type')}"
                    f" {text!r}")


def _tries(attempts: int) -> str:
    return "(1 attempt, no retry)" if attempts <= 1 else f"(after {attempts} attempts)"


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message") if isinstance(
            body.get("error"), dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(exc).splitlines()[0][:300]


def load_openai(profile: Profile) -> ServedLLM:
    cfg = profile.llm
    if not cfg.model:
        raise JobError(f"profile {profile.name!r} names no [llm].model (the served model name)")
    key = api_key(cfg)
    served = probe(cfg, key)
    log.info("llm %s served at %s (%s)", cfg.model, redact(cfg.base_url), served.get("owned_by", "?"))
    return ServedLLM(cfg, served, key)
