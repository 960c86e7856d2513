"""The store on a real Chroma server (`chroma run`, from the chromadb wheel) on 127.0.0.1: the same
incremental ingest, atomic publish, crash safety and retrieval as the embedded store."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.common.config import ROOT, load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.ingest import job as ing
from jobs.ingest.job import ingest
from jobs.retrieval.check import retrieval_scores
from jobs.retrieval.retriever import StoreRetriever
from jobs.stores import server as srv
from jobs.tools import serve
from tests.conftest import MINI_QUESTIONS, make_server_profile, store_generations, store_live_generation


@pytest.fixture
def server_profile(tmp_path, corpus_dir, minilm_path, tiny_llm, chroma_server):
    return make_server_profile(tmp_path, corpus_dir, minilm_path, tiny_llm, chroma_server)


def _client(profile):
    return srv.connect(profile)


def test_ingest_eval_reingest_and_one_change_on_a_server(server_profile, corpus_dir, minilm_embedder):
    profile = load_profile(str(server_profile))
    first = ingest(profile, embedder=minilm_embedder)
    assert first.wrote and first.embedded > 0 and len(store_generations(profile)) == 1
    assert not profile.store.path.exists()  # nothing local: the store is on the server
    run, df, _, _ = ev.evaluate(profile)
    assert len(df) == 8
    header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
    assert header["store_generation"] == store_live_generation(profile) and profile.store.url in header["store"]

    again = ingest(profile, embedder=minilm_embedder)  # unchanged: embeds nothing, publishes nothing
    assert (again.embedded, again.wrote) == (0, False) and len(store_generations(profile)) == 1

    faq = corpus_dir / "docs/zh_cn/faq.md"
    faq.write_text(faq.read_text(encoding="utf-8").replace("WSL2", "WSL2 或虚拟机"), encoding="utf-8")
    before = store_live_generation(profile)
    one = ingest(profile, embedder=minilm_embedder)
    assert one.wrote and 0 < one.embedded <= sum(1 for _ in faq.read_text(encoding="utf-8").split("##"))
    assert one.embedded == one.updated + one.added
    now = store_live_generation(profile)
    assert now != before and set(store_generations(profile)) == {before, now}  # previous kept
    reader = srv.ServerReader(profile)
    try:
        assert reader.collection.count() == one.chunks and reader.info["corpus_commit"] == one.commit
        texts = reader.collection.get(where={"path": "docs/zh_cn/faq.md"}, include=["documents"])["documents"]
        assert any("虚拟机" in t for t in texts)
    finally:
        reader.close()


def test_server_and_embedded_stores_retrieve_the_same(server_profile, minilm_embedder):
    on_server = load_profile(str(server_profile))
    embedded = load_profile(str(server_profile), {"store.url": ""})
    ingest(on_server, embedder=minilm_embedder)
    ingest(embedded, embedder=minilm_embedder)
    for mode in ("dense", "bm25", "hybrid"):
        assert retrieval_scores(on_server, MINI_QUESTIONS, minilm_embedder, mode) == retrieval_scores(
            embedded, MINI_QUESTIONS, minilm_embedder, mode)


def _add_pages(corpus_dir: Path, n: int) -> None:
    for i in range(n):
        (corpus_dir / f"docs/en/page{i}.md").write_text(
            f"# Page {i}\n\n" + " ".join(f"Sentence {j} of page {i} about topic {i * j}." for j in range(60)),
            encoding="utf-8")


def test_kill_9_while_writing_keeps_the_old_generation_live(server_profile, corpus_dir, minilm_embedder, caplog):
    # A lease far longer than the test: the next ingest goes ahead because its holder is dead, not expired.
    profile = load_profile(str(server_profile), {"store.lease_s": 600})
    ingest(profile, embedder=minilm_embedder)
    live = store_live_generation(profile)
    _add_pages(corpus_dir, 25)
    log = open(Path(server_profile).parent / "ingest.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "jobs.ingest", "--profile", str(server_profile),
                             "--set", "store.lease_s=600"], cwd=ROOT, stdout=log, stderr=log)
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 240:
        building = [g for g in store_generations(profile) if g != live]
        if building and _client(profile).get_collection(building[0]).count() > 0:
            break  # the new generation is being written
        time.sleep(0.05)
    assert proc.poll() is None, "the ingest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert store_live_generation(profile) == live  # the old generation is still live and answers
    with StoreRetriever(profile, minilm_embedder) as r:
        assert r.generation == live and r.retrieve("learning rate", 3)
    assert len(store_generations(profile)) == 2  # the leftover of the killed ingest

    # Its lease would hold for 10 minutes, but its holder ran on this host and is gone: taken over at once.
    meta = srv._pointer_meta(_client(profile), profile.store.collection)
    assert meta["lease_holder"] == f"{socket.gethostname()}:{proc.pid}" and float(meta["lease_expires"]) > time.time()
    with caplog.at_level(logging.WARNING, logger="jobs.stores.server"):
        done = ingest(profile, embedder=minilm_embedder)
    assert done.wrote and done.added > 0
    assert f"taking over the lease of {socket.gethostname()}:{proc.pid} at once" in caplog.text
    # The leftover was removed, the previous kept.
    assert set(store_generations(profile)) == {live, store_live_generation(profile)}


def test_losing_the_server_mid_ingest_is_one_line_exit_4_and_stops_at_once(tmp_path, corpus_dir, minilm_path,
                                                                          tiny_llm):
    _add_pages(corpus_dir, 8)
    with serve.chroma_process(tmp_path / "db", log_path=tmp_path / "server.log") as (server, url):
        path = make_server_profile(tmp_path, corpus_dir, minilm_path, tiny_llm, url)
        out, err = tmp_path / "ingest.out", tmp_path / "ingest.err"
        # Small batches: the embedding takes long enough that the kill lands in the middle of it.
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.ingest", "--profile", str(path), "-v",
                                     "--set", "embedder.batch_size=2"], cwd=ROOT, stdout=fout, stderr=ferr)
        try:
            started = time.monotonic()
            while proc.poll() is None and b"Generating embeddings" not in err.read_bytes() \
                    and time.monotonic() - started < 240:
                time.sleep(0.02)
            assert proc.poll() is None, "the ingest ended before the server could be killed:\n" + err.read_text()
            server.send_signal(signal.SIGKILL)
            server.wait()
            killed = time.monotonic()
            code = proc.wait(timeout=120)
            stopped_in = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 4 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"error: lost the Chroma server at {url} during the ingest (")
    assert "nothing was published, the store is as it was; run the ingest again" in errors[0]
    # Noticed at the next slice of the embedding, not after all of it (a kill before the first slice's check
    # stops it before any slice was embedded).
    slices = re.findall(r"embedded (\d+) of (\d+) chunks", stderr)
    assert all(int(done) < int(total) for done, total in slices[-1:]) and stopped_in < 60


def test_a_lease_held_elsewhere_is_waited_for_and_break_lease_clears_it(server_profile, minilm_embedder, capsys):
    profile = load_profile(str(server_profile), {"store.lease_s": 600})
    args = ["--profile", str(server_profile), "--set", "store.lease_s=600", "--break-lease"]
    assert ing.main(args) == 0
    assert capsys.readouterr().out.startswith("no lease is held on Chroma server http://127.0.0.1:")

    # An ingest on another host (or one whose liveness this host cannot check): its lease is waited for ...
    client = _client(profile)
    pointer = srv.ServerWriter(profile, client).pointer
    theirs = {"lease_holder": "elsewhere:4242", "lease_token": "theirs", "lease_host": "another-boot:1",
              "lease_expires": time.time() + 600}
    pointer.modify(metadata={**srv._pointer_meta(client, profile.store.collection), **theirs})
    with pytest.raises(JobError, match=r"being written by another ingest \(elsewhere:4242, lease until .*break-lease"):
        ingest(profile, embedder=minilm_embedder)
    # ... until an operator breaks it.
    assert ing.main(args) == 0
    assert re.match(r"broke the lease of elsewhere:4242 on Chroma server .* \(held until ", capsys.readouterr().out)
    assert ingest(profile, embedder=minilm_embedder).wrote

    # An ingest alive on this host: refused unless --force; the broken ingest stops at its next check.
    holder = f"{socket.gethostname()}:{os.getpid()}"
    with srv.writer(profile) as running:
        with pytest.raises(JobError, match=rf"held by {holder}, an ingest alive on this host .*--force"):
            ing.main(args)
        assert ing.main([*args, "--force"]) == 0
        assert capsys.readouterr().out.startswith(f"broke the lease of {holder} on ")
        running.renew()  # its heartbeat finds the lease gone and marks it unhealthy: the next check stops it
        with pytest.raises(JobError, match="this ingest lost its lease to nobody .*nothing was published"):
            running.check_healthy()

    with pytest.raises(JobError, match=r"--break-lease: store .* is a folder store"):
        ing.main(["--profile", str(server_profile), "--set", "store.url=", "--break-lease"])
    with pytest.raises(JobError, match="--force only goes with --break-lease"):
        ing.main(["--profile", str(server_profile), "--force"])


def test_second_concurrent_ingest_is_refused(server_profile, minilm_embedder):
    profile = load_profile(str(server_profile))
    with srv.writer(profile):
        with pytest.raises(JobError, match=r"being written by another ingest \(.*:\d+, lease until"):
            ingest(profile, embedder=minilm_embedder)
    assert ingest(profile, embedder=minilm_embedder).wrote  # released with its holder


@pytest.mark.parametrize(("change", "message"), [
    ({"store.url": "http://127.0.0.1:{free}"}, r"cannot reach the Chroma server at http://127\.0\.0\.1:\d+"),
    ({"store.tenant": "nobody"}, r"Chroma server http://127\.0\.0\.1:\d+ has no tenant 'nobody'"),
    ({"store.database": "nodb"}, r"has no database 'nodb' in tenant 'default_tenant'"),
])
def test_server_errors_are_one_line_before_anything_is_written(server_profile, change, message):
    overrides = {k: v.format(free=serve.free_port()) for k, v in change.items()}
    args = ["--profile", str(server_profile)] + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    for main in (ing.main, ev.main):
        with pytest.raises(JobError, match=message) as err:
            main(args)
        assert "\n" not in str(err.value)
    assert not load_profile(str(server_profile)).eval.reports_dir.exists()


def test_a_store_built_by_another_embedder_is_refused_and_a_settings_change_rebuilds(server_profile,
                                                                                    minilm_embedder):
    import dataclasses

    from jobs.common.embedding import Embedder

    profile = load_profile(str(server_profile))
    ingest(profile, embedder=minilm_embedder)
    other = Embedder(dataclasses.replace(minilm_embedder.cfg, model="some/other-model"), minilm_embedder.location)
    with pytest.raises(JobError, match="built with another embedder"):
        StoreRetriever(profile, other)
    smaller = load_profile(str(server_profile), {"chunking.size": 48})
    rebuilt = ingest(smaller, embedder=minilm_embedder)
    assert rebuilt.rebuilt and rebuilt.embedded == rebuilt.chunks


def test_bm25_follows_the_generation_through_a_local_cache(server_profile, minilm_embedder, tmp_path):
    profile = load_profile(str(server_profile))
    ingest(profile, embedder=minilm_embedder)
    gen = store_live_generation(profile)
    cached = srv._cache_dir(profile, gen)
    assert cached.is_dir()  # the ingest that built the generation cached its index
    # Another machine (another cache) rebuilds it from the generation's documents on first use.
    elsewhere = load_profile(str(server_profile), {"paths.cache": str(tmp_path / "elsewhere")})
    with StoreRetriever(elsewhere, minilm_embedder, "bm25") as r:
        hits = r.retrieve("lumen train --resume", 3)
        assert hits and hits[0].path == "docs/zh_cn/faq.md"
    assert srv._cache_dir(elsewhere, gen).is_dir()
