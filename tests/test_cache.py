"""The generation cache (jobs.llm.cache.GenerationCache) on a real folder: keys, a put read back, entries that
are damaged, edited or moved are refused (and said once), a folder that cannot be written costs only the caching."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from jobs.llm.cache import GenerationCache, folder_fingerprint, prompt_sha1

LLM = {"model": "tiny", "revision": "abc", "dtype": "float32", "max_new_tokens": 8}
PROMPT = "<|im_start|>user\nWhat is Lumen?<|im_end|>\n<|im_start|>assistant\n"


def put(cache: GenerationCache, key: str, prompt: str = PROMPT, text: str = "Lumen trains tiny models.") -> Path:
    cache.put(key, prompt, text=text, prompt_tokens=12, answer_tokens=5, seconds=0.25)
    return cache.root / key[:2] / f"{key}.json"


def test_the_key_is_the_model_and_the_whole_prompt():
    key = GenerationCache.key(LLM, PROMPT)
    assert len(key) == 64 and int(key, 16) >= 0
    assert GenerationCache.key(dict(reversed(LLM.items())), PROMPT) == key  # the order of settings does not matter
    assert GenerationCache.key({**LLM, "max_new_tokens": 9}, PROMPT) != key
    assert GenerationCache.key({**LLM, "revision": "abd"}, PROMPT) != key
    assert GenerationCache.key(LLM, PROMPT + " ") != key


def test_put_then_get_returns_the_entry_with_its_prompt(tmp_path):
    cache = GenerationCache(tmp_path)
    key = GenerationCache.key(LLM, PROMPT)
    path = put(cache, key)
    assert path.is_file() and path.parent.name == key[:2]
    got = cache.get(key, PROMPT)
    assert got is not None and cache.rejected == 0
    assert (got["text"], got["prompt_tokens"], got["answer_tokens"], got["seconds"]) == (
        "Lumen trains tiny models.", 12, 5, 0.25)
    assert got["prompt"] == PROMPT and got["prompt_sha1"] == prompt_sha1(PROMPT)  # what was asked can be read back
    assert GenerationCache(tmp_path).get(key, PROMPT) == got  # another run reads the same entry
    assert not list(tmp_path.rglob("*.tmp*"))  # written beside and renamed into place

    put(cache, key, text="Lumen 训练小模型。")  # a later answer replaces it; text stays readable on disk
    assert cache.get(key, PROMPT)["text"] == "Lumen 训练小模型。" and "训练" in path.read_text(encoding="utf-8")


def test_a_missing_entry_is_no_damage(tmp_path):
    cache = GenerationCache(tmp_path / "not-yet")
    assert cache.get("c" * 64, PROMPT) is None and cache.rejected == 0


def test_a_disabled_cache_reads_nothing_but_still_writes(tmp_path):
    key = GenerationCache.key(LLM, PROMPT)
    put(GenerationCache(tmp_path), key, text="old")
    off = GenerationCache(tmp_path, enabled=False)
    assert off.get(key, PROMPT) is None
    put(off, key, text="new")
    assert GenerationCache(tmp_path).get(key, PROMPT)["text"] == "new"


@pytest.mark.parametrize(("damage", "why"), [
    pytest.param(lambda entry: "", "unreadable (JSONDecodeError)", id="empty-file"),
    pytest.param(lambda entry: '{"text": "torn', "unreadable (JSONDecodeError)", id="torn"),
    pytest.param(lambda entry: "[]", "a JSON list, not an entry", id="a-list"),
    pytest.param(lambda entry: json.dumps({k: v for k, v in entry.items() if k != "answer_tokens"}),
                 "missing or mistyped field(s) answer_tokens", id="missing-field"),
    pytest.param(lambda entry: json.dumps({**entry, "prompt_tokens": "12"}),
                 "missing or mistyped field(s) prompt_tokens", id="mistyped"),
    pytest.param(lambda entry: json.dumps({**entry, "answer_tokens": True}),
                 "missing or mistyped field(s) answer_tokens", id="a-bool-is-no-count"),
    pytest.param(lambda entry: json.dumps({**entry, "text": "An answer edited by hand."}),
                 "its answer was changed after it was written (checksum mismatch)", id="edited-text"),
    pytest.param(lambda entry: json.dumps({**entry, "seconds": 99.0}),
                 "its answer was changed after it was written (checksum mismatch)", id="edited-seconds"),
    pytest.param(lambda entry: json.dumps({k: v for k, v in entry.items() if k != "sha256"}),
                 "it has no checksum (written before entries had one)", id="no-checksum"),
])
def test_a_damaged_or_edited_entry_is_refused_and_named(tmp_path, caplog, damage, why):
    cache = GenerationCache(tmp_path)
    key = GenerationCache.key(LLM, PROMPT)
    path = put(cache, key)
    path.write_text(damage(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
    with caplog.at_level(logging.DEBUG, logger="jobs.llm.cache"):
        assert cache.get(key, PROMPT) is None
    assert cache.rejected == 1
    assert [r.getMessage() for r in caplog.records] == [f"cache entry {path} is not used ({why}): regenerating it"]
    put(cache, key)  # regenerated: sound again
    assert cache.get(key, PROMPT)["text"] == "Lumen trains tiny models."


def test_an_entry_for_another_prompt_is_refused(tmp_path):
    cache = GenerationCache(tmp_path)
    key = GenerationCache.key(LLM, PROMPT)
    put(cache, key)
    assert cache.get(key, PROMPT.replace("Lumen", "Nano")) is None and cache.rejected == 1


def test_a_cache_entry_moved_under_another_key_is_not_reused(tmp_path):
    cache = GenerationCache(tmp_path)
    cache.put("a" * 64, "prompt A", text="answer A", prompt_tokens=3, answer_tokens=2, seconds=0.1)
    assert cache.get("a" * 64, "prompt A")["text"] == "answer A"
    (tmp_path / "bb").mkdir()
    (tmp_path / "aa" / f"{'a' * 64}.json").rename(tmp_path / "bb" / f"{'b' * 64}.json")
    assert cache.get("b" * 64, "prompt B") is None and cache.rejected == 1


def test_each_kind_of_damage_is_a_warning_once(tmp_path, caplog):
    cache = GenerationCache(tmp_path)
    keys = [GenerationCache.key({**LLM, "n": i}, PROMPT) for i in range(3)]
    for key in keys:
        put(cache, key).write_text("[]", encoding="utf-8")
    edited = GenerationCache.key({**LLM, "n": 3}, PROMPT)
    path = put(cache, edited)
    path.write_text(path.read_text(encoding="utf-8").replace("tiny", "huge"), encoding="utf-8")
    with caplog.at_level(logging.DEBUG, logger="jobs.llm.cache"):
        for key in [*keys, edited]:
            assert cache.get(key, PROMPT) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert cache.rejected == 4 and len(warned) == 2  # one per kind: the lists and the edited answer
    assert "a JSON list" in warned[0] and "checksum mismatch" in warned[1]


def _chattr(path: Path, flag: str) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("blocked", ["immutable-folder", "a-file-in-the-way"])
def test_a_folder_that_cannot_be_written_costs_only_the_caching(tmp_path, caplog, blocked):
    if blocked == "immutable-folder":  # we may run as root, who ignores permissions: an immutable folder stops it
        root = tmp_path / "generations"
        root.mkdir()
        if not _chattr(root, "+i"):
            pytest.skip("chattr +i is not permitted here")
    else:
        (tmp_path / "cache").write_text("a file where the cache folder should be", encoding="utf-8")
        root = tmp_path / "cache" / "generations"
    cache = GenerationCache(root)
    try:
        with caplog.at_level(logging.WARNING, logger="jobs.llm.cache"):
            for i in range(3):  # no exception: the answers go on, uncached
                put(cache, GenerationCache.key({**LLM, "n": i}, PROMPT))
    finally:
        if blocked == "immutable-folder":
            _chattr(root, "-i")
    assert not cache.writable
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"cannot write the generation cache in {root} (")
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".json" or ".tmp" in p.name]
    # Reading it finds no entry, and no damage: a missing cache is not a damaged one.
    assert cache.get(GenerationCache.key(LLM, PROMPT), PROMPT) is None and cache.rejected == 0


def test_a_model_folder_fingerprint_follows_its_content(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden": 64}', encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    first = folder_fingerprint(tmp_path)
    assert len(first) == 16 and folder_fingerprint(tmp_path) == first
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x", encoding="utf-8")  # hidden bookkeeping does not count
    assert folder_fingerprint(tmp_path) == first
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 3 + bytes(255) + b"\x01")
    assert folder_fingerprint(tmp_path) != first
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    assert folder_fingerprint(tmp_path) == first
    (tmp_path / ".complete").write_text("", encoding="utf-8")  # the marker of a finished download does
    assert folder_fingerprint(tmp_path) != first
