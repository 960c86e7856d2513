"""Lexical (BM25) retrieval over chunk texts, beside the dense Chroma retriever.

Scoring is ``bm25s`` (Okapi BM25, Lucene variant, k1=1.5, b=0.75); tokenisation is ours, because
neither bm25s's regex nor a whitespace split handles Chinese or code identifiers.

The index is saved into a folder inside a store generation (``lexical/``: bm25s files, ``meta.json``
with ids, tokenizer and parameters, and ``manifest.json`` with a sha256 per file). That generation is
written once, before the store publishes it with one atomic swap, so the index is exactly as crash-safe
as the vectors beside it and needs no swapping of its own. The manifest's hashes turn a damaged file
into a clear error rather than silently wrong scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.common.files import sha256_file

if TYPE_CHECKING:
    import bm25s

# Bump when tokenize() output changes: an index built with other tokens would silently score wrong.
TOKENIZER_VERSION = 1
FORMAT = "bm25-index"
FORMAT_VERSION = 1
_META = "meta.json"
_MANIFEST = "manifest.json"

# Han (+ extensions, compatibility ideographs) and kana: scripts written without spaces.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_ALNUM = rf"[^\W_{_CJK}]"
# A word, or an identifier glued by _ - . (flash_attn, cpu-offload, fsdp.cpu_offload, 550.127.08).
_TOKEN_RE = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>{_ALNUM}+(?:[_\-.]+{_ALNUM}+)*)")
_CAMEL_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_ATOM_SPLIT = re.compile(r"[_\-.]+")

# Tiny lists: question words that every query carries and that only add noise to the score.
_STOP_EN = frozenset(
    "a an and are as at be by can do does for from how i in into is it of on or that the this to was what "
    "when where which who why with you your".split()
)
_STOP_ZH = frozenset("的 了 是 在 和 与 吗 呢 什么 哪些 哪个 哪种 如何 怎么 怎样 为什么 是否 有什么".split())


@dataclass(frozen=True)
class Tokenizer:
    """NFKC + casefold tokeniser for mixed Chinese/English technical text.

    Runs of Chinese characters become overlapping character bigrams (``unigrams`` adds single characters);
    on the XTuner docs this matched jieba word segmentation in retrieval quality at a fifth of the cost and
    without a dictionary. ``parts`` also emits the pieces of glued identifiers (``cpu-offload`` -> ``cpu``,
    ``offload``) and ``camel`` the CamelCase pieces (``GRPOLossConfig`` -> ``grpo``, ``loss``, ``config``),
    so a query naming one piece still matches; the whole identifier is always kept.
    """

    unigrams: bool = False
    parts: bool = True
    camel: bool = True
    stopwords: bool = True

    @property
    def name(self) -> str:
        flags = [f for f, on in (("unigram", self.unigrams), ("parts", self.parts), ("camel", self.camel),
                                 ("stop", self.stopwords)) if on]
        return f"lexical-v{TOKENIZER_VERSION}:bigram" + "".join(f"+{f}" for f in flags)

    def config(self) -> dict[str, Any]:
        return {"version": TOKENIZER_VERSION, **asdict(self)}

    def __call__(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text)
        out: list[str] = []
        for m in _TOKEN_RE.finditer(text):
            if m.lastgroup == "cjk":
                out.extend(_cjk_tokens(m.group(), self.unigrams))
            else:
                out.extend(_word_tokens(m.group(), self.parts, self.camel))
        if self.stopwords:
            out = [t for t in out if t not in _STOP_EN and t not in _STOP_ZH]
        return out


@functools.lru_cache(maxsize=1 << 16)
def _word_tokens(raw: str, parts: bool, camel: bool) -> tuple[str, ...]:
    # Cached: identifiers and English words repeat across chunks; this halves the build time.
    whole = raw.casefold()
    out = [whole]
    if parts and _ATOM_SPLIT.search(whole):
        # Dotted names: keep each dotted piece too (fsdp-config.cpu-offload -> cpu-offload), then atoms.
        if "." in whole:
            out += [p for p in whole.split(".") if _ATOM_SPLIT.search(p)]
        # Single letters (e.g -> e, g) are noise; the digits of versions (550.127.08) are harmless.
        out += [a for a in _ATOM_SPLIT.split(whole) if len(a) > 1]
    if camel:
        for atom in _ATOM_SPLIT.split(raw):
            pieces = _CAMEL_RE.findall(atom)
            if len(pieces) > 1:
                out += [p.casefold() for p in pieces if len(p) > 1]
    return tuple(out)


def _cjk_tokens(run: str, unigrams: bool) -> list[str]:
    if len(run) == 1:
        return [run]
    grams = [run[i:i + 2] for i in range(len(run) - 1)]
    # Unigrams let a one-character query word (库, 卡) match, at the cost of many common-character hits.
    return grams + list(run) if unigrams else grams


DEFAULT_TOKENIZER = Tokenizer()


def tokenize(text: str) -> list[str]:
    """Tokens of ``text`` with the default tokeniser (the one BM25Index.build uses unless told)."""
    return DEFAULT_TOKENIZER(text)


def _tokenizer_from_config(cfg: dict[str, Any], source: Path) -> Tokenizer:
    if cfg.get("version") != TOKENIZER_VERSION:
        raise ValueError(f"{source}: index was built with tokenizer version {cfg.get('version')!r}, "
                         f"this code has version {TOKENIZER_VERSION}: rebuild the index")
    try:
        return Tokenizer(unigrams=cfg["unigrams"], parts=cfg["parts"], camel=cfg["camel"],
                         stopwords=cfg["stopwords"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad tokenizer config {cfg!r}: {e}") from e


class BM25Index:
    """A BM25 index over (id, text) pairs; build, search, save atomically, load."""

    def __init__(self, ids: Sequence[str], model: bm25s.BM25, tokenizer: Tokenizer) -> None:
        self._ids = list(ids)
        self._model = model
        self.tokenizer = tokenizer

    @classmethod
    def build(cls, ids: list[str], texts: list[str], *, k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", tokenizer: Tokenizer | None = None) -> BM25Index:
        import bm25s  # lazily: it costs ~0.3 s, and tokenize() alone should not pay it

        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        if not ids:
            raise ValueError("cannot build a BM25 index over no documents")
        tokenizer = tokenizer or DEFAULT_TOKENIZER
        model = bm25s.BM25(k1=k1, b=b, method=method)
        # A text with no tokens (only punctuation or emoji) gets bm25s's own empty token, which no query
        # contains: bm25s otherwise divides 0 by 0 for it, and fails outright if every text is empty.
        model.index([tokenizer(t) or [""] for t in texts], show_progress=False)
        return cls(ids, model, tokenizer)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (in ``ids`` order) for ``query``."""
        token_ids = self._model.get_tokens_ids(self.tokenizer(query))
        if not token_ids:
            return np.zeros(len(self._ids), dtype=np.float32)
        return np.asarray(self._model.get_scores_from_ids(token_ids))

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` best ids with their scores, best first; documents sharing no term are left out."""
        if k <= 0:
            return []
        scores = self.scores(query)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        # Ties broken by position so that equal scores come back in a stable, reproducible order.
        top = top[np.lexsort((top, -scores[top]))]
        return [(self._ids[i], float(scores[i])) for i in top if scores[i] > 0]

    def info(self) -> dict[str, Any]:
        """A small record of what built this index, for the store's build info."""
        import bm25s

        digest = hashlib.sha256("\n".join(self._ids).encode("utf-8")).hexdigest()[:16]
        return {
            "library": f"bm25s {bm25s.__version__}",
            "method": self._model.method,
            "k1": float(self._model.k1),
            "b": float(self._model.b),
            "tokenizer": self.tokenizer.name,
            "tokenizer_version": TOKENIZER_VERSION,
            "docs": len(self._ids),
            "vocab": len(self._model.vocab_dict),
            "ids_sha256": digest,
        }

    fingerprint = info

    # ---- persistence -------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        """Write the index into ``folder`` (which must not exist yet: the store writes each generation once)."""
        folder = Path(folder)
        folder.mkdir(parents=True)
        self._model.save(folder, show_progress=False)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "ids": self._ids,
                "tokenizer": self.tokenizer.config(), "info": self.info()}
        (folder / _META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        files = sorted(p.name for p in folder.iterdir())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "files": {name: sha256_file(folder / name) for name in files}}
        (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Path) -> BM25Index:
        """Open an index; ``ValueError`` naming the file if it is missing or damaged."""
        import bm25s

        gdir = Path(folder)
        if not gdir.is_dir():
            raise ValueError(f"{gdir}: missing (no BM25 index saved there)")
        manifest = _read_json(gdir / _MANIFEST)
        files = manifest.get("files")
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or _META not in files:
            raise ValueError(f"{gdir / _MANIFEST}: not a {FORMAT} manifest")
        for name, digest in files.items():
            path = gdir / name
            if not path.is_file():
                raise ValueError(f"{path}: missing from BM25 index (listed in {_MANIFEST})")
            if sha256_file(path) != digest:
                raise ValueError(f"{path}: corrupt BM25 index file (checksum mismatch)")
        meta = _read_json(gdir / _META)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{gdir / _META}: format version {meta.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
        tokenizer = _tokenizer_from_config(meta.get("tokenizer") or {}, gdir / _META)
        ids = meta.get("ids")
        try:
            model = bm25s.BM25.load(gdir, mmap=False, show_progress=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{gdir}: cannot load bm25s index: {e}") from e
        if not isinstance(ids, list) or model.scores.get("num_docs") != len(ids):
            raise ValueError(f"{gdir / _META}: ids do not match the index's {model.scores.get('num_docs')} documents")
        return cls(ids, model, tokenizer)


def field_text(text: str, heading: str, heading_weight: int) -> str:
    """What BM25 indexes for a chunk: its text, whose first line is already its heading path, plus the heading
    path ``heading_weight - 1`` more times (BM25F by repetition: the title and section words weigh more)."""
    return text + ("\n" + heading) * (heading_weight - 1) if heading and heading_weight > 1 else text


def lexical_spec(heading_weight: int) -> str:
    """How a store's lexical index was built; a change rebuilds it (never the vectors)."""
    return f"bm25 tokenizer v{TOKENIZER_VERSION}" + (f", heading x{heading_weight}" if heading_weight > 1 else "")


def index_chunks(ids: list[str], texts: list[str], metadatas: list[dict], heading_weight: int) -> BM25Index:
    """The BM25 index of a store's chunks, headings weighted as the profile says."""
    return BM25Index.build(ids, [field_text(t, str(m.get("heading") or ""), heading_weight)
                                 for t, m in zip(texts, metadatas)])


# ---- file helpers ----------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable or corrupt: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: corrupt (expected a JSON object)")
    return data


