"""What a docs update did to the answers: a real two-commit git repo, ingested at one commit and then the
next into the same store, evaluated after each; plus the comparison on hand-built runs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.eval import job as ev
from jobs.eval import report
from jobs.eval.drift import CORPUS_FILES, docs_change, save_corpus_files
from jobs.ingest.job import ingest
from tests.conftest import MINI_CORPUS, eval_profile, git, write_manifest


@pytest.fixture
def two_commits(tmp_path):
    """Commit 1: the fixture corpus. Commit 2: the FAQ's answer changes, a page is added, one is removed."""
    repo = tmp_path / "upstream"
    shutil.copytree(MINI_CORPUS, repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "docs v1")
    first = git(repo, "rev-parse", "HEAD")
    faq = repo / "docs/zh_cn/faq.md"
    faq.write_text(faq.read_text(encoding="utf-8").replace(
        "Lumen 目前只支持 Linux 和 macOS，暂不支持原生 Windows，可以在 WSL2 中使用。",
        "从 2.0 版起 Lumen 支持原生 Windows，无需 WSL2 或虚拟机。"), encoding="utf-8")
    (repo / "docs/en/serving.md").write_text("# Serving\n\nServe a trained model with `lumen serve --port 8000`; "
                                             "it speaks the OpenAI chat API.\n", encoding="utf-8")
    (repo / "docs/zh_cn/quickstart.rst").unlink()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "docs v2")
    return repo, first, git(repo, "rev-parse", "HEAD")


def test_docs_update_is_reported_with_the_questions_it_touched(tmp_path, two_commits, minilm_path, tiny_llm,
                                                               minilm_embedder):
    repo, first, second = two_commits
    path = eval_profile(tmp_path, repo, minilm_path, tiny_llm)
    manifest = tmp_path / "m.toml"  # the profile's manifest, re-pinned below: a docs release
    write_manifest(manifest, ref=first, sources=[("git", f"file://{repo}")])
    profile = load_profile(str(path))
    assert ingest(profile, embedder=minilm_embedder).commit == first
    night1, df1, *_ = ev.evaluate(profile)
    assert (night1.path / CORPUS_FILES).is_file()

    write_manifest(manifest, ref=second, sources=[("git", f"file://{repo}")])
    assert ingest(profile, embedder=minilm_embedder).commit == second
    night2, df2, _, comp = ev.evaluate(profile)

    docs = comp.docs
    assert (docs.commit_before, docs.commit_now) == (first, second)
    assert (docs.added, docs.changed, docs.removed) == (
        ["docs/en/serving.md"], ["docs/zh_cn/faq.md"], ["docs/zh_cn/quickstart.rst"])
    touched = docs.touched.set_index(["id", "mode"])
    assert ("t2", "rag") in touched.index  # the FAQ question retrieved the changed FAQ in both runs
    assert "docs/zh_cn/faq.md" in touched.loc[("t2", "rag"), "changed files retrieved"]
    assert ("t3", "rag") in touched.index  # it retrieved the removed page last night
    assert not any(m == "bare" for _, m in touched.index)  # bare answers retrieve nothing
    # Every question whose answer changed is accounted for: touched by the update, or listed apart.
    old = df1.set_index(["id", "mode"])["answer"]
    changed = {k for k, a in df2.set_index(["id", "mode"])["answer"].items() if old[k] != a}
    apart = set(zip(docs.moved_otherwise["id"], docs.moved_otherwise["mode"]))
    assert changed == {k for k in touched.index if touched.loc[k, "answer changed"]} | apart
    for _, row in docs.touched.iterrows():
        assert row["verdict before"] in ("pass", "fail") and row["verdict now"] in ("pass", "fail")

    text = (night2.path / "report.md").read_text(encoding="utf-8")
    section = text.split(f"## Docs changed: {first[:12]} → {second[:12]}")[1]
    assert "1 file(s) added, 1 changed, 1 removed" in section
    assert "### Questions that retrieved a changed file" in section and "| t2 " in section

    # The report can be rebuilt from the two runs' folders alone, the store long gone.
    shutil.rmtree(profile.store.path)
    (night2.path / "report.md").unlink()
    assert report.main([str(night2.path)]) == 0
    rebuilt = (night2.path / "report.md").read_text(encoding="utf-8")
    assert f"## Docs changed: {first[:12]} → {second[:12]}" in rebuilt and "## Why RAG answers failed" in rebuilt


def _rows(answers: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """(answer, retrieved path) per question id; RAG answers only."""
    return pd.DataFrame([{"id": qid, "mode": "rag", "category": "factual", "question": qid, "answer": a,
                          "expected_keywords": "x", "all_keywords_hit": "x" in a, "abstained": False, "error": "",
                          "retrieved": json.dumps([{"path": p, "text": "..."}])} for qid, (a, p) in answers.items()])


def test_answers_that_moved_without_a_docs_change_are_listed_apart(tmp_path):
    before, now = tmp_path / "a", tmp_path / "b"
    before.mkdir(), now.mkdir()
    save_corpus_files(before, "c1", {"a.md": "1", "b.md": "1", "gone.md": "1"})
    save_corpus_files(now, "c2", {"a.md": "2", "b.md": "1", "new.md": "1"})
    then = _rows({"q1": ("x old", "a.md"), "q2": ("same", "b.md"), "q3": ("before", "b.md"), "q4": ("y", "gone.md")})
    tonight = _rows({"q1": ("new", "a.md"), "q2": ("same", "b.md"), "q3": ("after x", "b.md"), "q4": ("y", "new.md")})
    docs = docs_change(now, before, tonight, then)
    assert docs.counts() == {"added": 1, "changed": 1, "removed": 1, "questions touched": 2,
                             "touched answers changed": 1, "answers changed otherwise": 1}
    assert list(docs.touched["id"]) == ["q1", "q4"]
    q1 = docs.touched.iloc[0]
    assert (q1["verdict before"], q1["verdict now"]) == ("pass", "fail")
    assert list(docs.moved_otherwise["id"]) == ["q3"]  # its file did not change: the model or settings moved
    save_corpus_files(now, "c1", {"a.md": "1"})
    assert docs_change(now, before, tonight, then) is None  # same commit: no docs section
