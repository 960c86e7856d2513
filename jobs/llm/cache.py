"""Generation cache: answers on disk, keyed by everything that determines them.

The key is a hash of the model's identity (hub id + revision, or a fingerprint of a local folder),
dtype and device type, the decoding settings, the prompt template version and the full rendered
prompt. One file per entry, written beside and renamed into place: a crash leaves no torn entry, and
deleting the folder at any time only costs regeneration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from jobs.common.files import atomic_write
from jobs.llm.base import ChatModel, Completion, OnResult, WrappedChatModel

log = logging.getLogger(__name__)

_SMALL = 16 << 20


def folder_fingerprint(folder: Path) -> str:
    """Content hash of a local model folder: small files whole, large ones by size and both ends."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") and rel != ".complete":
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _SMALL:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


# What an entry holds besides the prompt it answers, and the types a sound entry has.
_FIELDS: dict[str, type | tuple[type, ...]] = {"text": str, "prompt_tokens": int, "answer_tokens": int,
                                               "seconds": (int, float)}


def prompt_sha1(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def _checksum(entry: dict) -> str:
    fields = {k: entry.get(k) for k in (*_FIELDS, "prompt_sha1")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class GenerationCache:
    """Answers on disk. ``enabled=False`` (``--no-cache``) stops reads only: what is generated still refreshes
    the cache. Entries are checked when read (shape, the prompt they answer, a checksum of the answer): an
    entry that is damaged or was edited by hand is regenerated, never reused. A cache folder that cannot be
    written costs the caching, never an answer."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = root
        self.enabled = enabled
        self.writable = True
        self.rejected = 0  # entries found damaged or edited this run (regenerated)
        self._said: set[str] = set()

    @staticmethod
    def key(fingerprint: dict, prompt: str) -> str:
        blob = json.dumps({"llm": fingerprint, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, prompt: str) -> dict | None:
        """The sound entry answering ``prompt`` under ``key``, or None (missing, damaged or edited)."""
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder at all): nothing to reject
            return None
        except (OSError, ValueError) as exc:
            return self._reject(path, f"unreadable ({type(exc).__name__})")
        if not isinstance(value, dict):
            return self._reject(path, f"a JSON {type(value).__name__}, not an entry")
        wrong = [k for k, t in _FIELDS.items()
                 if not isinstance(value.get(k), t) or isinstance(value.get(k), bool)]
        if wrong:
            return self._reject(path, f"missing or mistyped field(s) {', '.join(wrong)}")
        if value.get("prompt_sha1") != prompt_sha1(prompt):
            return self._reject(path, "it answers another prompt")
        if value.get("sha256") != _checksum(value):
            return self._reject(path, "its answer was changed after it was written (checksum mismatch)"
                                if "sha256" in value else "it has no checksum (written before entries had one)")
        return value

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        # Each kind of damage is a warning once (a cache of old entries would otherwise fill the log).
        kind = why.split(" (")[0]
        level = logging.DEBUG if kind in self._said else logging.WARNING
        self._said.add(kind)
        log.log(level, "cache entry %s is not used (%s): regenerating it", path, why)
        return None

    def put(self, key: str, prompt: str, *, text: str, prompt_tokens: int, answer_tokens: int,
            seconds: float) -> None:
        """Store an answer with its prompt (what exactly was asked can always be read back) and a checksum."""
        if not self.writable:
            return
        entry = {"text": text, "prompt_tokens": int(prompt_tokens), "answer_tokens": int(answer_tokens),
                 "seconds": float(seconds), "prompt_sha1": prompt_sha1(prompt), "prompt": prompt}
        entry["sha256"] = _checksum(entry)
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(entry, ensure_ascii=False))
        except OSError as exc:
            self.writable = False  # said once; the run goes on without caching
            log.warning("cannot write the generation cache in %s (%s): answers are kept in the run but not "
                        "cached from now on", self.root, exc.strerror or exc)


class CachedChatModel(WrappedChatModel):
    """Any ChatModel, answering from a GenerationCache where it can: the one caching routine of the job's answers
    and of its query rewrites.

    An entry is keyed by the wrapped model's fingerprint, the caller's ``key`` (what else shapes the text: the
    prompt template's version) and the presence penalty when one is set (entries cached without one stay
    valid), with the full prompt. ``generate`` reports each completion as soon as it is ready, ``cached`` saying
    where it came from: sound entries first (``GenerationCache.get`` checks each), then the wrapped model's
    answers to the rest, each reported before it is cached (the answer belongs to the run first; a cache
    folder that cannot be written costs only the caching). Failed completions are reported, never cached."""

    def __init__(self, llm: ChatModel, cache: GenerationCache, key: dict | None = None) -> None:
        super().__init__(llm)
        self.cache = cache
        self.key_parts = dict(key or {})

    def fingerprint(self) -> dict:
        return {**self.llm.fingerprint(), **self.key_parts}

    def entry_key(self, prompt: str, presence_penalty: float = 0.0) -> str:
        fingerprint = self.fingerprint()
        if presence_penalty:  # keyed only when set: what was cached without it stays valid
            fingerprint["presence_penalty"] = presence_penalty
        return self.cache.key(fingerprint, prompt)

    def generate(self, prompts: list[str], on_result: OnResult | None = None, *,
                 presence_penalty: float = 0.0) -> list[Completion]:
        out: list[Completion | None] = [None] * len(prompts)

        def done(i: int, completion: Completion) -> None:
            out[i] = completion
            if on_result is not None:
                on_result(i, completion)

        keys = [self.entry_key(p, presence_penalty) for p in prompts]
        missing = []
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            found = self.cache.get(key, prompt)
            if found is None:
                missing.append(i)
            else:
                done(i, Completion(text=found["text"], prompt=prompt, prompt_tokens=found["prompt_tokens"],
                                   answer_tokens=found["answer_tokens"], seconds=found["seconds"], cached=True))

        def generated(k: int, completion: Completion) -> None:
            i = missing[k]
            done(i, completion)  # the run's first; the cache only saves a later run the time
            if not completion.error:
                self.cache.put(keys[i], prompts[i], text=completion.text, prompt_tokens=completion.prompt_tokens,
                               answer_tokens=completion.answer_tokens, seconds=completion.seconds)

        if missing:
            returned = self.llm.generate([prompts[i] for i in missing], on_result=generated,
                                         presence_penalty=presence_penalty)
            for k, completion in enumerate(returned or []):  # a backend that returned some without reporting them
                if out[missing[k]] is None and completion is not None:
                    generated(k, completion)
        return out  # type: ignore[return-value]
