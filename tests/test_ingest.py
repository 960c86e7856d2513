"""The ingest job end to end: real git, real Chroma on disk, a real (small, packaged) embedder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs import stores
from jobs.common import log as joblog
from jobs.common.config import ROOT, load_profile
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.errors import JobError
from jobs.common.urls import redact
from jobs.ingest import job as ing
from jobs.ingest.job import IngestSummary, ingest
from jobs.ingest.source import Checkout, SourceSpec, fetch, load_manifest
from jobs.retrieval.fusion import file_ranking
from jobs.retrieval.retriever import StoreRetriever
from jobs.stores import chroma
from jobs.stores import embedded as st
from jobs.stores import server as srv
from jobs.stores.lexical import BM25Index
from jobs.tools import serve
from tests.conftest import MINI_QUESTIONS, write_manifest, write_profile


def lexical_ids(profile) -> list[str]:
    with st.Snapshot(profile.store.path, profile.store.collection) as snap:
        return BM25Index.load(snap.folder / chroma.LEXICAL).ids


def build_record(profile) -> dict:
    with st.Snapshot(profile.store.path, profile.store.collection) as snap:
        return snap.info


def stored(profile) -> dict[str, dict]:
    with st.Snapshot(profile.store.path, profile.store.collection) as snap:
        page = snap.collection.get(include=["metadatas", "documents", "embeddings"])
        return {i: {"meta": m, "text": d, "emb": list(e)}
                for i, m, d, e in zip(page["ids"], page["metadatas"], page["documents"], page["embeddings"])}


def test_full_ingest_then_rerun_embeds_nothing(mini_profile, minilm_embedder):
    first = ingest(mini_profile, embedder=minilm_embedder)
    assert first.files == 5 and first.skipped == 1  # docs/en/stub.md is a stub
    assert first.added == first.chunks > 5 and first.embedded > 0 and first.wrote
    before = stored(mini_profile)
    assert {m["meta"]["path"] for m in before.values()} == {
        "README.md", "docs/en/config.md", "docs/zh_cn/quickstart.rst", "docs/zh_cn/faq.md"}
    assert {m["meta"]["lang"] for m in before.values() if "zh_cn" in m["meta"]["path"]} == {"zh"}

    fresh = load_embedder(mini_profile)
    second = ingest(mini_profile, embedder=fresh)
    assert "model" not in vars(fresh)  # nothing changed: the model was never even loaded
    assert (second.embedded, second.added, second.updated, second.removed) == (0, 0, 0, 0)
    assert second.unchanged == first.chunks and not second.wrote
    assert "embedded=0" in second.line() and f"unchanged={first.chunks}" in second.line()
    assert stored(mini_profile) == before


def test_edit_one_file_reembeds_only_it_and_delete_removes(mini_profile, minilm_embedder, corpus_dir):
    ingest(mini_profile, embedder=minilm_embedder)
    before = stored(mini_profile)
    faq = corpus_dir / "docs/zh_cn/faq.md"
    faq.write_text(faq.read_text(encoding="utf-8").replace("WSL2", "WSL2 或虚拟机"), encoding="utf-8")

    edit = ingest(mini_profile, embedder=minilm_embedder)
    after = stored(mini_profile)
    changed = {i for i in after if i not in before or after[i]["text"] != before[i]["text"]}
    assert changed and all(i.startswith("docs/zh_cn/faq.md#") for i in changed)
    assert edit.embedded == len(changed) and edit.updated + edit.added == len(changed)
    for i in set(after) - changed:  # every other vector is the very same one
        assert after[i]["emb"] == pytest.approx(before[i]["emb"])

    (corpus_dir / "docs/en/config.md").unlink()
    gone = ingest(mini_profile, embedder=minilm_embedder)
    final = stored(mini_profile)
    assert not any(m["meta"]["path"] == "docs/en/config.md" for m in final.values())
    assert gone.removed == sum(1 for i in after if i.startswith("docs/en/config.md#")) > 0
    assert gone.embedded == 0
    # The lexical index moves in step with the vectors: the very same chunk ids.
    assert sorted(lexical_ids(mini_profile)) == sorted(final)


def test_no_chunk_exceeds_the_window(tmp_path, corpus_dir, minilm_path, minilm_embedder):
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus_dir))])
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp_path / "s", cache=tmp_path / "c", size=32, overlap=4)))
    ingest(profile, embedder=minilm_embedder)
    tok = AutoTokenizer.from_pretrained(minilm_path)  # measured independently of the chunker
    lengths = [len(tok(c["text"], truncation=False)["input_ids"]) for c in stored(profile).values()]
    assert max(lengths) <= 32
    assert len(lengths) > 15  # the size really forced splitting


def test_code_and_logs_are_capped(mini_profile, minilm_embedder):
    ingest(mini_profile, embedder=minilm_embedder)
    texts = "\n".join(c["text"] for c in stored(mini_profile).values())
    assert "step 16 loss" not in texts and "more lines)" in texts  # 16-line log cut to 6 lines
    assert "step 1 loss" in texts


def test_clones_pinned_ref_from_git(tmp_path, git_repo, minilm_path, minilm_embedder):
    repo, shas = git_repo
    manifest = write_manifest(tmp_path / "m.toml", ref=shas[1], sources=[("git", f"file://{repo}")])
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp_path / "s", cache=tmp_path / "c")))
    summary = ingest(profile, embedder=minilm_embedder)
    assert summary.commit == shas[1]
    paths = {c["meta"]["path"] for c in stored(profile).values()}
    assert "docs/en/config.md" in paths  # added by the pinned commit
    assert "docs/en/late.md" not in paths  # added after it
    assert {c["meta"]["commit"] for c in stored(profile).values()} == {shas[1]}
    info = build_record(profile)
    assert info["corpus_commit"] == shas[1] and info["chunk_size"] == 64
    assert info["embedder_dim"] == 384 and info["chunks"] == summary.chunks


def test_falls_back_to_next_source_and_records_it(tmp_path, git_repo, minilm_path, minilm_embedder):
    repo, shas = git_repo
    manifest = write_manifest(tmp_path / "m.toml", ref=shas[1], sources=[
        ("git", str(tmp_path / "no-such-mirror")), ("git", str(repo))])
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp_path / "s", cache=tmp_path / "c")))
    summary = ingest(profile, embedder=minilm_embedder)
    assert summary.commit == shas[1] and summary.source == f"git {repo}"


def test_every_source_failing_lists_what_was_tried(tmp_path, git_repo, minilm_path):
    repo, _ = git_repo
    bad_ref = "0" * 40
    manifest = write_manifest(tmp_path / "m.toml", ref=bad_ref, sources=[
        ("git", str(repo)), ("folder", str(tmp_path / "missing"))])
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp_path / "s", cache=tmp_path / "c")))
    with pytest.raises(JobError) as err:
        ingest(profile)
    msg = str(err.value)
    assert bad_ref in msg and f"git {repo}" in msg and "missing" in msg
    # Nothing half-written: no generation, not even a working copy (only the lock file of the attempt).
    assert st.live_generation(profile.store.path) is None and not st.gens_dir(profile.store.path).exists()


def test_bad_manifest_is_a_clear_error(tmp_path, minilm_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('name = "x"\nurl = "u"\n', encoding="utf-8")  # no ref
    profile = load_profile(str(write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp_path / "s", cache=tmp_path / "c")))
    with pytest.raises(JobError, match=r"m\.toml: ref must be a non-empty string"):
        ingest(profile)
    manifest.write_text("name = [", encoding="utf-8")
    with pytest.raises(JobError, match="not valid TOML"):
        ingest(profile)


def test_second_concurrent_ingest_is_refused(mini_profile, minilm_embedder):
    with st.ingest_lock(mini_profile.store.path):
        with pytest.raises(JobError, match=rf"locked by another ingest \(pid {os.getpid()}\)"):
            ingest(mini_profile, embedder=minilm_embedder)
    ingest(mini_profile, embedder=minilm_embedder)  # the lock is gone with its holder


def test_store_built_with_another_embedder_is_refused(mini_profile, minilm_embedder):
    ingest(mini_profile, embedder=minilm_embedder)
    other = Embedder(dataclasses.replace(minilm_embedder.cfg, model="some/other-model"), minilm_embedder.location)
    with pytest.raises(JobError, match="built with another embedder.*embedder: store has '.*', query uses "
                                       "'some/other-model'"):
        StoreRetriever(mini_profile, other)
    prefixed = Embedder(dataclasses.replace(minilm_embedder.cfg, query_prefix="query: "), minilm_embedder.location)
    with pytest.raises(JobError, match="query_prefix: store has '', query uses 'query: '"):
        StoreRetriever(mini_profile, prefixed)


def test_chunking_change_rebuilds(mini_profile, minilm_embedder):
    ingest(mini_profile, embedder=minilm_embedder)
    smaller = dataclasses.replace(mini_profile, chunking=dataclasses.replace(mini_profile.chunking, size=48))
    summary = ingest(smaller, embedder=minilm_embedder)
    assert summary.rebuilt and summary.embedded > 0
    assert all(c["meta"]["n_tokens"] <= 48 for c in stored(smaller).values())


def test_bf16_embedder_is_recorded_rebuilds_and_stays_close(mini_profile, minilm_embedder):
    ingest(mini_profile, embedder=minilm_embedder)
    fp32 = stored(mini_profile)
    half_cfg = dataclasses.replace(mini_profile.embedder, dtype="bfloat16")
    half = Embedder(half_cfg, minilm_embedder.location)
    profile = dataclasses.replace(mini_profile, embedder=half_cfg)
    summary = ingest(profile, embedder=half)
    # Vectors of another precision are never mixed into a store: the change re-embeds everything.
    assert summary.rebuilt and summary.embedded == len(fp32)
    assert build_record(profile)["embedder_dtype"] == "bfloat16"
    bf16 = stored(profile)
    assert bf16.keys() == fp32.keys()
    for cid, chunk in fp32.items():
        a, b = chunk["emb"], bf16[cid]["emb"]
        assert a != b and sum(x * y for x, y in zip(a, b)) > 0.99  # normalised: the dot is the cosine
    with StoreRetriever(profile, half, "dense") as r:
        assert r.retrieve("How do I resume training with lumen train --resume?", 5)


def test_index_settings_are_applied_recorded_and_a_change_rebuilds(mini_profile, minilm_embedder, monkeypatch):
    # A store from before the current index settings: Chroma's default search width.
    monkeypatch.setattr(chroma, "HNSW", {"space": "cosine", "ef_search": 100})
    monkeypatch.setattr(chroma, "INDEX_SPEC", "hnsw space=cosine ef_search=100")
    ingest(mini_profile, embedder=minilm_embedder)
    monkeypatch.undo()
    summary = ingest(mini_profile, embedder=minilm_embedder)
    assert summary.rebuilt and summary.embedded == summary.chunks
    with st.Snapshot(mini_profile.store.path, mini_profile.store.collection) as snap:
        assert snap.info["index"] == chroma.INDEX_SPEC
        hnsw = snap.collection.configuration_json["hnsw"]  # as persisted
        assert (hnsw["ef_search"], hnsw["ef_construction"], hnsw["space"]) == (500, 200, "cosine")
    assert not ingest(mini_profile, embedder=minilm_embedder).wrote  # and then it is up to date


def _cli(profile_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.ingest", "--profile", str(profile_path), *args]


def test_cli_summary_line_and_check(tmp_path, corpus_dir, minilm_path):
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(tmp_path / "nowhere"))])
    prof = write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest, store=tmp_path / "s",
                         cache=tmp_path / "c")
    out = subprocess.run(_cli(prof, "--source", str(corpus_dir), "--check", str(MINI_QUESTIONS)),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("files=5 skipped=1 added=") and "embedded=" in lines[0]
    assert [x.split()[0] for x in lines[1:]] == ["dense", "bm25", "hybrid"]
    assert all("hit@1=" in x and "hit@5=" in x and "mrr=" in x and "(n=4)" in x for x in lines[1:])
    assert lines[3].endswith("(profile default)")

    bad = subprocess.run(_cli(prof, "--source", str(tmp_path / "absent")), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --source")


def test_kill_9_leaves_a_queryable_store_and_rerun_completes(tmp_path, corpus_dir, minilm_path, minilm_embedder):
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus_dir))])
    prof_path = write_profile(tmp_path / "p.toml", embedder=minilm_path, corpus=manifest,
                              store=tmp_path / "stores" / "mini", cache=tmp_path / "c")
    profile = load_profile(str(prof_path))
    first = ingest(profile, embedder=minilm_embedder)
    v1 = stored(profile)
    # A corpus update big enough that the run spends a while embedding and writing.
    for i in range(25):
        (corpus_dir / f"docs/en/page{i}.md").write_text(
            f"# Page {i}\n\n" + " ".join(f"Sentence {j} of page {i} about topic {i * j}." for j in range(60)),
            encoding="utf-8")

    gens = st.gens_dir(profile.store.path)
    killed_in = set()
    for phase in ("embedding", "writing"):
        log = open(tmp_path / f"{phase}.log", "wb")  # noqa: SIM115 - a file, not a pipe that could fill up
        proc = subprocess.Popen(_cli(prof_path), cwd=ROOT, stdout=log, stderr=log)
        started = time.monotonic()
        while time.monotonic() - started < 240 and proc.poll() is None:
            # The working copy exists from the start; "store:" is the progress bar of the writes into it.
            text = (tmp_path / f"{phase}.log").read_bytes()
            writing = b"store:" in text
            if phase == "embedding" and not writing and b"Generating embeddings" in text:
                break
            if phase == "writing" and writing:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_in.add(phase)
        log.close()
        # Whatever the moment, the live store is the old one, whole and queryable.
        assert stored(profile) == v1
        assert sorted(lexical_ids(profile)) == sorted(v1)
        with StoreRetriever(profile, minilm_embedder) as r:
            assert r.retrieve("learning rate", 3)
    assert "writing" in killed_in, "the kill never landed while the new generation was being written"

    done = ingest(profile, embedder=minilm_embedder)
    assert done.wrote and done.added > 0 and done.chunks == first.chunks + done.added
    assert not any(p.name.endswith(".tmp") for p in gens.iterdir())  # the stale copy was cleaned up
    assert len(stored(profile)) == done.chunks
    assert sorted(lexical_ids(profile)) == sorted(stored(profile))


def test_retrieval_modes_and_fusion(mini_profile, minilm_embedder):
    ingest(mini_profile, embedder=minilm_embedder)
    with StoreRetriever(mini_profile, minilm_embedder, "dense") as dense, \
            StoreRetriever(mini_profile, minilm_embedder, "bm25") as bm25, \
            StoreRetriever(mini_profile, minilm_embedder, "hybrid") as hybrid:
        q = "How do I resume training with lumen train --resume?"
        b = bm25.retrieve(q, 10)
        assert b[0].path == "docs/zh_cn/faq.md" and "--resume" in b[0].text  # the exact identifier
        d_files = file_ranking(x.path for x in dense.retrieve(q, 50))
        b_files = file_ranking(x.path for x in bm25.retrieve(q, 50))
        h = hybrid.retrieve(q, 10)
        h_files = file_ranking(x.path for x in h)
        # Fusion is over files: a file both retrievers found outranks one that only one of them found
        # no higher than it; and the first hits are the best chunk of each file in fused order.
        both = [f for f in h_files if f in d_files and f in b_files]
        only = [f for f in h_files if (f in d_files) != (f in b_files)]
        for f in both:
            for o in only:
                rank_o = min(_rank(d_files, o), _rank(b_files, o))
                if rank_o >= max(_rank(d_files, f), _rank(b_files, f)):
                    assert h_files.index(f) < h_files.index(o)
        assert [x.path for x in h[: len(h_files)]] == h_files
        assert h_files[0] == "docs/zh_cn/faq.md"


def _rank(files: list[str], path: str) -> int:
    return files.index(path) if path in files else 99


@contextlib.contextmanager
def immutable(path: Path):
    """``path`` made immutable (chattr +i: root cannot write it either, unlike chmod), and always made mutable
    again."""
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("chattr is not installed: no way to make a folder read-only for root here")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"chattr +i is not permitted here ({exc.stderr.strip()}): no way to make a folder read-only "
                    "for root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def _tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``folder`` with its mode, size and modification time (symlinks as links)."""
    out = {}
    for path in [folder, *folder.rglob("*")]:
        st_ = path.lstat()
        out[path.relative_to(folder).as_posix()] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


def test_a_read_only_store_is_one_line_exit_2_and_nothing_is_written(mini_profile, minilm_embedder, corpus_dir,
                                                                     tmp_path, capsys):
    store = mini_profile.store.path
    args = ["--profile", str(tmp_path / "profile.toml")]

    def refused(named: Path) -> None:
        with pytest.raises(SystemExit) as exited:
            joblog.run_cli(ing.main, args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exited.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert errors[0].startswith(f"error: store {store} cannot be written: {named} is read-only ")

    # An empty folder made for the store (as an admin or a read-only volume mount would leave it).
    store.mkdir(parents=True)
    with immutable(store):
        refused(store)
    assert list(store.iterdir()) == []

    # A store with a live generation and a change to ingest: its folder, its generations' folder or its lock file
    # read-only is refused before anything is locked, embedded or written.
    ingest(mini_profile, embedder=minilm_embedder)
    (corpus_dir / "docs/en/new.md").write_text("# New\n\n" + "A page added since the last ingest. " * 10,
                                               encoding="utf-8")
    before = _tree(store)
    for path in (store, st.gens_dir(store), st.layout(store).lock):
        with immutable(path):
            refused(path)
        assert _tree(store) == before
    assert ingest(mini_profile, embedder=minilm_embedder).added > 0  # writable again: it goes ahead


def test_credentials_in_urls_are_never_recorded_or_shown(mini_profile, minilm_embedder, tmp_path):
    secret_url = "https://user:s3cret@example.invalid/x.git"
    assert redact(secret_url) == "https://***@example.invalid/x.git"
    assert redact("http://h:8000/x.git?token=t0k&ref=main") == "http://h:8000/x.git?token=***&ref=main"
    assert redact("/plain/folder") == "/plain/folder"

    # The corpus URL and the source used, as the build record and the logs hold them; git gets the real URL.
    spec = SourceSpec("git", secret_url)
    assert spec.describe() == "git https://***@example.invalid/x.git" and spec.location == secret_url
    checkout = Checkout(root=tmp_path, commit="0" * 40, source=spec, fell_back=False, files=())
    info = ing.build_info(mini_profile, minilm_embedder, checkout, secret_url + "?token=t0k", IngestSummary())
    assert info["corpus_url"] == "https://***@example.invalid/x.git?token=***"
    assert info["corpus_source"] == "git https://***@example.invalid/x.git"
    assert "s3cret" not in json.dumps(info) and "t0k" not in json.dumps(info)
    # A git source that fails: what was tried is named without its password (nothing listens on the port).
    port = serve.free_port()
    manifest = write_manifest(tmp_path / "secret.toml", ref="main",
                              sources=[("git", f"http://user:s3cret@127.0.0.1:{port}/x.git")])
    with pytest.raises(JobError) as err:
        fetch(load_manifest(manifest), tmp_path / "cache", timeout_s=30)
    assert f"git http://***@127.0.0.1:{port}/x.git" in str(err.value) and "s3cret" not in str(err.value)

    # The store's URL in messages (the profile refuses a password in it; a hand-made one still never shows).
    on_server = dataclasses.replace(mini_profile, store=dataclasses.replace(
        mini_profile.store, url=f"http://user:s3cret@127.0.0.1:{port}"))
    assert stores.describe(on_server).startswith(f"http://***@127.0.0.1:{port} (")
    with pytest.raises(JobError) as err:
        srv.connect(on_server)
    assert f"cannot reach the Chroma server at http://***@127.0.0.1:{port}" in str(err.value)
    assert "s3cret" not in str(err.value)
