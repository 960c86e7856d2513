"""BM25 lexical retrieval: tokenisation, ranking, save/load with checksums, reciprocal rank fusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.retrieval.fusion import reciprocal_rank_fusion, relative_score_fusion
from jobs.stores.lexical import BM25Index, Tokenizer, tokenize

ROOT = Path(__file__).resolve().parents[1]

DOCS = {
    "readme_zh#0": "XTuner V1 是专为超大规模 MoE 模型打造的新一代大模型训练引擎，支持 64k 序列长度。",
    "sft#0": "显存不够（OOM）时，可以尝试 --fsdp-config.cpu-offload 参数，把优化器状态卸载到内存。",
    "install#0": "安装前请用 nvidia-smi 检查驱动版本，需要大于 550.127.08；MoE 训练需要 GroupedGEMM。",
    "loss#0": "GRPO loss is configured with GRPOLossConfig; the judger scores each rollout.",
    "flash#0": "Install flash_attn to speed up attention kernels during long-sequence training.",
    "quickstart#0": "The legacy quick start fine-tunes InternLM2 with QLoRA on the Colorist dataset.",
}


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index.build(list(DOCS), list(DOCS.values()))


# ---- tokenisation -------------------------------------------------------------------------------

def test_chinese_becomes_character_bigrams_without_punctuation() -> None:
    assert tokenize("训练引擎") == ["训练", "练引", "引擎"]
    # Punctuation splits runs instead of gluing them: no bigram spans "好，世".
    assert tokenize("你好，世界！") == ["你好", "世界"]
    assert tokenize("库") == ["库"]
    assert Tokenizer(unigrams=True)("模型") == ["模型", "模", "型"]


def test_english_is_casefolded_and_drops_stopwords_and_punctuation() -> None:
    assert tokenize("What is the Loss?") == ["loss"]
    assert tokenize("Fine-tune the MODEL.") == ["fine-tune", "fine", "tune", "model"]
    assert Tokenizer(stopwords=False)("What is it") == ["what", "is", "it"]


def test_nfkc_folds_fullwidth_forms() -> None:
    assert tokenize("ＸＴｕｎｅｒ　（全角）")[0] == "xtuner"
    assert tokenize("ＸＴｕｎｅｒ") == tokenize("XTuner")


def test_mixed_chinese_and_english() -> None:
    tokens = tokenize("XTuner V1 支持 64k 序列，驱动 550.127.08")
    for expected in ("xtuner", "v1", "64k", "支持", "序列", "驱动", "550.127.08"):
        assert expected in tokens
    # No token crosses a script boundary, even without spaces between scripts.
    assert tokenize("用XTuner训练") == ["用", "xtuner", "tuner", "训练"]


def test_code_identifiers_are_kept_whole_and_split_into_parts() -> None:
    tokens = tokenize("GRPOLossConfig")
    assert tokens[0] == "grpolossconfig"
    assert {"grpo", "loss", "config"} <= set(tokens)
    assert tokenize("flash_attn")[:3] == ["flash_attn", "flash", "attn"]
    tokens = tokenize("--fsdp-config.cpu-offload")
    assert tokens[0] == "fsdp-config.cpu-offload"
    assert {"fsdp-config", "cpu-offload", "cpu", "offload"} <= set(tokens)
    assert "rl.txt" in tokenize("pip install -r rl.txt")
    assert "run_rl.sh" in tokenize("bash run_rl.sh")
    whole_only = Tokenizer(parts=False, camel=False)
    assert whole_only("GRPOLossConfig cpu-offload") == ["grpolossconfig", "cpu-offload"]


# ---- BM25 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "best"), [
    ("显存不够怎么办？", "sft#0"),
    ("cpu-offload", "sft#0"),
    ("显卡驱动版本有什么要求", "install#0"),
    ("how is the GRPO loss configured?", "loss#0"),
    ("GRPOLossConfig", "loss#0"),
    ("flash_attn", "flash#0"),
    ("XTuner 支持多长的序列", "readme_zh#0"),
    ("Colorist QLoRA", "quickstart#0"),
])
def test_bm25_ranks_the_right_document_first(index: BM25Index, query: str, best: str) -> None:
    hits = index.search(query, 3)
    assert hits[0][0] == best
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_search_returns_only_matching_documents(index: BM25Index) -> None:
    assert index.search("Windows installer", 5) == []
    assert index.search("", 5) == []
    assert index.search("GroupedGEMM", 0) == []
    hits = index.search("MoE", 100)  # k beyond the corpus size is fine
    assert {i for i, _ in hits} == {"readme_zh#0", "install#0"}


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        BM25Index.build(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        BM25Index.build(["a", "b"], ["x"])


def test_texts_without_tokens_are_indexed_but_never_match() -> None:
    index = BM25Index.build(["empty", "punct", "word"], ["", "。！？", "hello"])
    assert [i for i, _ in index.search("hello", 3)] == ["word"]
    assert BM25Index.build(["a"], ["..."]).search("anything", 1) == []


def test_ids_and_info(index: BM25Index) -> None:
    assert index.ids == list(DOCS)
    info = index.info()
    assert info["docs"] == len(DOCS)
    assert (info["k1"], info["b"], info["method"]) == (1.5, 0.75, "lucene")
    assert info["tokenizer"] == "lexical-v1:bigram+parts+camel+stop"
    assert index.fingerprint() == info
    json.dumps(info)  # goes into the store's build info as is


# ---- persistence --------------------------------------------------------------------------------

QUERIES = ["显存不够怎么办", "GRPO loss", "flash_attn", "MoE 训练", "nothing matches this"]


def test_save_load_round_trip_gives_identical_results(index: BM25Index, tmp_path: Path) -> None:
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.ids == index.ids
    assert loaded.info() == index.info()
    for q in QUERIES:
        assert loaded.search(q, 10) == index.search(q, 10)


def test_save_refuses_to_overwrite(index: BM25Index, tmp_path: Path) -> None:
    # Store generations are written once: overwriting an index in place would defeat their atomic swap.
    index.save(tmp_path / "bm25")
    with pytest.raises(FileExistsError):
        index.save(tmp_path / "bm25")


def test_missing_index_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere: missing"):
        BM25Index.load(tmp_path / "nowhere")


@pytest.mark.parametrize("victim", ["data.csc.index.npy", "vocab.index.json", "meta.json"])
def test_torn_or_missing_file_names_the_file(index: BM25Index, tmp_path: Path, victim: str) -> None:
    folder = index.save(tmp_path / "bm25")
    path = folder / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
        BM25Index.load(folder)
    path.unlink()
    with pytest.raises(ValueError, match=f"{victim}.*missing"):
        BM25Index.load(folder)


# ---- reciprocal rank fusion ---------------------------------------------------------------------

def test_rrf_ranks_a_document_found_by_both_above_one_found_by_one() -> None:
    fused = reciprocal_rank_fusion([["a", "both"], ["c", "both"]])
    assert fused[0][0] == "both"
    assert fused[0][1] == pytest.approx(2 / 62)
    assert dict(fused)["a"] == pytest.approx(1 / 61)
    assert [d for d, _ in fused] == ["both", "a", "c"]  # ties keep first-met order


def test_rrf_weights_duplicates_and_empty_input() -> None:
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], k=10, weights=[2.0, 1.0])
    assert [d for d, _ in fused] == ["a", "b"]
    assert dict(reciprocal_rank_fusion([["a", "a", "b"]]))["a"] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([]) == []
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 2.0])


# ---- relative-score fusion ----------------------------------------------------------------------

def test_relative_score_fusion_scales_each_list_then_sums() -> None:
    fused = relative_score_fusion([[("a", 0.9), ("b", 0.5), ("c", 0.1)], [("b", 10.0), ("d", 2.0)]])
    assert dict(fused) == pytest.approx({"a": 1.0, "b": 0.5 + 1.0, "c": 0.0, "d": 0.0})
    assert [d for d, _ in fused] == ["b", "a", "c", "d"]  # ties keep first-met order
    weighted = dict(relative_score_fusion([[("a", 0.9), ("b", 0.5), ("c", 0.1)], [("b", 10.0), ("d", 2.0)]],
                                          weights=[1.0, 0.25]))
    assert weighted["b"] == pytest.approx(0.5 + 0.25) and weighted["a"] == pytest.approx(1.0)


def test_relative_score_fusion_duplicates_flat_lists_and_empty_input() -> None:
    assert dict(relative_score_fusion([[("a", 0.2), ("a", 0.8), ("b", 0.4)]])) == pytest.approx({"a": 1.0, "b": 0.0})
    assert dict(relative_score_fusion([[("a", 3.0), ("b", 3.0)]])) == {"a": 1.0, "b": 1.0}  # nothing to scale
    assert relative_score_fusion([[], []]) == [] and relative_score_fusion([]) == []
    with pytest.raises(ValueError):
        relative_score_fusion([[("a", 1.0)]], weights=[1.0, 2.0])
