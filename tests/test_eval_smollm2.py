"""One real end-to-end eval with the packaged models of the offline profile (e5 + SmolLM2)."""

from __future__ import annotations

import pandas as pd
import pytest

from jobs.common.config import load_profile
from jobs.eval.job import evaluate
from jobs.ingest.job import ingest
from jobs.tools.prepare.__main__ import prepare
from tests.conftest import MINI_CORPUS, MINI_QUESTIONS, write_manifest

pytestmark = pytest.mark.slow


def test_offline_profile_end_to_end(tmp_path):
    base = load_profile("offline")
    # The same cache `make models` fills: idempotent, seconds when already prepared.
    prepare(base.models_dir, ["multilingual-e5-small", "smollm2-135m-instruct"])
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(MINI_CORPUS))])
    profile = load_profile("offline", {
        "corpus": str(manifest), "store.path": str(tmp_path / "stores" / "mini"),
        "eval.reports_dir": str(tmp_path / "reports"), "llm.max_new_tokens": 24, "chunking.size": 96,
    })
    summary = ingest(profile)
    assert summary.chunks > 5 and summary.max_chunk_tokens <= 96

    run, df, result, _ = evaluate(profile, questions=MINI_QUESTIONS)
    rag = df[df["mode"] == "rag"]
    # e5 retrieves the fixture sources, and SmolLM2 answers every question.
    assert rag["hit_at_5"].mean() == 1.0
    assert all(a.strip() for a in df["answer"])
    assert result["overall"]["rag"]["keyword_hit_rate"] == pytest.approx(
        pd.read_csv(run.path / "results.csv").query("mode == 'rag'")["keyword_hit_rate"].mean())
    # With the config page in its context, the model quotes the learning rate; bare cannot know it.
    t1 = rag.set_index("id").loc["t1"]
    assert "docs/en/config.md" in t1["retrieved"] and "3e-4" in t1["answer"]
    assert t1["keyword_hit_rate"] >= 0.5
    assert "3e-4" not in df[(df["mode"] == "bare") & (df["id"] == "t1")]["answer"].iloc[0]
    assert (run.path / "report.md").read_text(encoding="utf-8").count("| t") >= 4
