"""The typed configuration: profiles, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import ROOT, available_profiles, load_profile
from jobs.errors import JobError


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
    ({"retrieval.bm25_weight": "-1"}, "rrf_k and bm25_weight must be >= 0"),
    ({"retrieval.bm25_weight": "heavy"}, r"bm25_weight: expected a number, got 'heavy'"),
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
