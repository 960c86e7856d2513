"""The typed configuration: profiles, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.common.config import ROOT, available_profiles, load_profile
from jobs.common.errors import JobError


def test_shipped_profiles_load_and_share_code():
    assert {"offline", "offline-zh", "internlm2"} <= set(available_profiles())
    offline, zh, prod = (load_profile(n) for n in ("offline", "offline-zh", "internlm2"))
    assert zh.embedder == offline.embedder and zh.store == offline.store and zh.chunking == offline.chunking
    assert zh.llm.model != offline.llm.model
    assert prod.chunking.size <= 128  # paraphrase-multilingual-MiniLM-L12-v2 reads 128 tokens
    assert prod.llm.stop_ids == (2, 92542) and prod.llm.trust_remote_code
    assert offline.store.path == ROOT / "stores/xtuner-offline"


def test_overrides_are_typed():
    p = load_profile("offline", {"chunking.size": "200", "llm.stop_ids": "2, 7", "llm.trust_remote_code": "true",
                                 "store.path": "stores/elsewhere"})
    assert p.chunking.size == 200 and p.llm.stop_ids == (2, 7) and p.llm.trust_remote_code is True
    assert p.store.path == ROOT / "stores/elsewhere"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"chunking.sise": "1"}, r"unknown setting\(s\) sise"),
    ({"chunking.size": "big"}, r"\[chunking\]\.size: expected an integer, got 'big'"),
    ({"chunking.overlap": "200"}, r"overlap=200: must be >= 0 and < size/2"),
    ({"store.collection": "x"}, "Chroma needs 3-512 chars"),
    ({"nosuch.key": "1"}, "unknown section 'nosuch'"),
    ({"embedder.dtype": "half"}, r"\[embedder\]\.dtype='half': expected one of auto, float32"),
    ({"retrieval.fusion": "rank"}, r"\[retrieval\]\.fusion='rank': expected one of rrf, relative_score"),
    ({"retrieval.bm25_weight": "-1"}, r"\[retrieval\]\.bm25_weight=-1\.0: must be between 0\.0 and 100\.0"),
    ({"retrieval.bm25_weight": "nan"}, r"bm25_weight: expected a finite number, got 'nan'"),
    ({"llm.max_new_tokens": "-5"}, r"\[llm\]\.max_new_tokens=-5: must be between 1 and 32768"),
    ({"llm.batch_size": "-3"}, r"\[llm\]\.batch_size=-3: must be between 1 and 1024"),
    ({"llm.batch_size": "abc"}, r"\[llm\]\.batch_size: expected an integer, got 'abc'"),
    ({"llm.seed": "-1"}, r"\[llm\]\.seed=-1: must be between 0"),
    ({"retrieval.top_k": "0"}, r"\[retrieval\]\.top_k=0: must be between 1 and 100"),
    ({"retrieval.top_k": "30"}, r"need top_k \(30\) <= check_depth \(20\)"),
    ({"embedder.batch_size": "0"}, r"\[embedder\]\.batch_size=0: must be between 1 and 4096"),
    ({"eval.max_question_chars": "0"}, r"max_question_chars=0: must be between 1 and 100000"),
    ({"llm.stop_ids": "2,-1"}, r"stop_ids=\[2, -1\]: token ids are >= 0"),
    ({"retrieval.bm25_weight": "heavy"}, r"bm25_weight: expected a number, got 'heavy'"),
    ({"store.url": "http://127.0.0.1:8000/chroma"},
     r"\[store\]\.url='http://127\.0\.0\.1:8000/chroma': a path, query or fragment is not allowed .*"
     r"expected http\(s\)://host:port, with an optional trailing /"),
    ({"store.url": "http://127.0.0.1:8000?x=1"}, r"\[store\]\.url='http://127\.0\.0\.1:8000\?x=1': a path, query"),
    ({"store.url": "http://127.0.0.1:8000/?x=1"}, r"\[store\]\.url=.*: a path, query or fragment is not allowed"),
    ({"store.url": "ftp://127.0.0.1:8000"}, r"\[store\]\.url='ftp://127\.0\.0\.1:8000': expected http\(s\)://host:port"),
    ({"store.url": "http://127.0.0.1:99999"}, r"\[store\]\.url='http://127\.0\.0\.1:99999': .*expected http\(s\)"),
])
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(JobError, match=message):
        load_profile("offline", overrides)


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(JobError, match="available: .*offline"):
        load_profile("nope")


def test_extends_merges_tables_and_refuses_loops(tmp_path: Path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "offline"\nname = "child"\n[retrieval]\ntop_k = 5\n', encoding="utf-8")
    p = load_profile(str(child))
    assert p.retrieval.top_k == 5 and p.retrieval.check_depth == load_profile("offline").retrieval.check_depth
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\n', encoding="utf-8")
    with pytest.raises(JobError, match="loops back"):
        load_profile(str(loop))


def test_unprepared_model_says_run_make_models(tmp_path: Path):
    p = load_profile("offline", {"paths.cache": str(tmp_path)})
    with pytest.raises(JobError, match="run `make models PROFILE=offline`"):
        p.resolve_model(p.llm.model)


def test_every_numeric_setting_has_a_range():
    import dataclasses

    from jobs.common.config import _SECTION_TYPES

    for name, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float"):
                assert "range" in f.metadata, f"[{name}].{f.name} has no range"


def test_set_values_keep_their_exact_text():
    from jobs.common.config import overrides_from_cli

    p = load_profile("offline", overrides_from_cli(["embedder.passage_prefix=doc: ", "embedder.query_prefix= q: "], {}))
    assert p.embedder.passage_prefix == "doc: " and p.embedder.query_prefix == " q: "


def test_an_unset_flag_overrides_nothing_and_a_conflict_is_refused():
    from jobs.common.config import overrides_from_cli

    flags = {"chunking.size": ("--chunk-size", None), "store.path": ("--store", None)}
    p = load_profile("offline", overrides_from_cli(["chunking.size=200", "store.path=stores/x"], flags))
    assert p.chunking.size == 200 and p.store.path == ROOT / "stores/x"
    p = load_profile("offline", overrides_from_cli([], {"chunking.size": ("--chunk-size", 100)}))
    assert p.chunking.size == 100
    # The same value twice is fine; two different values are refused, naming both.
    assert overrides_from_cli(["llm.seed=3"], {"llm.seed": ("--seed", 3)}) == {"llm.seed": 3}
    with pytest.raises(JobError, match=r"chunking\.size is given twice with different values "
                                       r"\(--set chunking\.size=200 and --chunk-size 100\)"):
        overrides_from_cli(["chunking.size=200"], {"chunking.size": ("--chunk-size", 100)})
    with pytest.raises(JobError, match="given twice"):
        overrides_from_cli(["llm.seed=1", "llm.seed=2"], {})


def test_store_url_is_a_server_root_without_credentials():
    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "https://chroma.example.invalid"):
        assert load_profile("offline", {"store.url": url}).store.url == url
    with pytest.raises(JobError) as err:
        load_profile("offline", {"store.url": "http://user:s3cret@127.0.0.1:8000"})
    assert str(err.value) == (
        "offline.toml [store].url='http://***@127.0.0.1:8000': a user or password in the URL is never sent (the "
        "Chroma client takes host and port only): put the token in an environment variable and name that "
        "variable in [store].auth_token_env")
