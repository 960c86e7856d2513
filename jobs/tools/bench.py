"""Benchmark: ingest (full, unchanged, one file changed) against the seed tutorial's way, in one run.

    python -m jobs.tools.bench [--profile offline] [--corpus-dir ../shared/corpora/xtuner] [--out bench/results]

Every number is measured in this run, and speeds are reported as ratios against a baseline measured
in the same run, so results from different machines compare. Writes a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jobs.common import log as joblog
from jobs.common.config import RETRIEVAL_MODES, ROOT, Profile, load_profile, overrides_from_cli
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.files import atomic_write
from jobs.common.questions import load_questions
from jobs.ingest.job import IngestSummary, ingest
from jobs.ingest.source import load_manifest, select_files
from jobs.retrieval.check import retrieval_scores
from jobs.retrieval.fusion import file_ranking
from jobs.retrieval.scores import format_line, scores

log = logging.getLogger("jobs.tools.bench")


def seed_way(corpus: Path, files: list[str], embedder, questions: Path, depth: int,
             chunk_size: int | None = None, chunk_overlap: int | None = None) -> dict:
    """The seed tutorial: SimpleDirectoryReader + VectorStoreIndex.from_documents, in memory; defaults,
    or LlamaIndex's SentenceSplitter at a given chunk size (tiktoken tokens, its default tokenizer)."""
    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    started = time.perf_counter()
    docs = SimpleDirectoryReader(input_files=[str(corpus / f) for f in files]).load_data()
    splitter = [SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)] if chunk_size else None
    index = VectorStoreIndex.from_documents(docs, embed_model=embedder.model, show_progress=True,
                                            transformations=splitter)
    seconds = time.perf_counter() - started
    nodes = list(index.docstore.docs.values())
    window = embedder.window
    prefix = embedder.passage_prefix
    tokens = [embedder.special_tokens + embedder.count_tokens(prefix + n.get_content()) for n in nodes]
    per_q = []
    retriever = index.as_retriever(similarity_top_k=depth)
    for q in load_questions(questions).questions:
        if q.expected_sources:
            hits = retriever.retrieve(q.question)
            paths = [Path(h.node.metadata.get("file_path", "")).resolve().relative_to(corpus.resolve()).as_posix()
                     for h in hits]
            per_q.append(scores(file_ranking(paths), q.expected_sources))
    means = {k: sum(s[k] for s in per_q) / len(per_q) for k in per_q[0]}
    return {"seconds": seconds, "chunks": len(nodes), "truncated": sum(t > window for t in tokens),
            "max_tokens": max(tokens), "chunk_size": chunk_size or Settings.chunk_size, "retrieval": means}


def store_contents(profile, field: str) -> dict[str, object]:
    """Chunk id -> one stored field ("documents" or "embeddings") of the profile's live store."""
    from jobs import stores
    from jobs.stores.chroma import pages

    reader = stores.open_reader(profile)
    try:
        return {i: v for got in pages(reader.collection, [field]) for i, v in zip(got["ids"], got[field])}
    finally:
        reader.close()


def retrieval_latency(profile, embedder, questions: Path) -> dict[str, tuple[float, float]]:
    """p50 and p95 seconds of one retrieval (embed + search, at the check depth) per mode."""
    from jobs.retrieval.retriever import StoreRetriever, retrieval_seconds

    qs = load_questions(questions).questions
    out = {}
    for mode in RETRIEVAL_MODES:
        with StoreRetriever(profile, embedder, mode) as r:
            lat = pd.Series(retrieval_seconds(r, [q.question for q in qs], profile.retrieval.check_depth))
        out[mode] = (lat.quantile(0.5), lat.quantile(0.95))
    return out


def store_speed(profile, embedder, copy: Path, target: Path, questions: Path, work: Path, embedded_runs,
                scales: list[int]) -> dict:
    """The same ingests into a Chroma server (`chroma run` on 127.0.0.1) as into the embedded store; retrieval
    latency over HTTP against embedded; and what a server store's BM25 index costs to rebuild from the
    generation's documents at 1x, 10x, 100x the corpus (synthetic copies)."""
    from jobs.stores.chroma import HNSW, pages
    from jobs.stores.lexical import BM25Index
    from jobs.stores.server import connect
    from jobs.tools import serve

    full_e, same_e, one_e = embedded_runs
    with serve.running_chroma(work / "chroma", log_path=work / "chroma.log") as url:
        sp = dataclasses.replace(profile, store=dataclasses.replace(profile.store, url=url),
                                 paths=dataclasses.replace(profile.paths, cache=work / "server-cache"))
        original = target.read_text(encoding="utf-8")
        target.write_text(original.split("\n\n## 基准测试")[0], encoding="utf-8")  # the corpus of the full ingest
        full = ingest(sp, source=str(copy), embedder=embedder)
        same = ingest(sp, source=str(copy), embedder=embedder)
        target.write_text(original, encoding="utf-8")
        one = ingest(sp, source=str(copy), embedder=embedder)
        latency = {"embedded": retrieval_latency(profile, embedder, questions),
                   "server": retrieval_latency(sp, embedder, questions)}
        client = connect(sp)
        live = client.get_collection(f"{sp.store.collection}__live").metadata["live"]
        base = client.get_collection(live)
        docs = [got for got in pages(base, ["documents", "embeddings", "metadatas"], page=1000)]
        bm25 = []
        for k in scales:
            name = f"bench_bm25_{k}x"
            coll = client.create_collection(name, embedding_function=None, configuration={"hnsw": dict(HNSW)})
            for copy_no in range(k):
                for got in docs:
                    coll.add(ids=[f"{i}~{copy_no}" for i in got["ids"]], documents=got["documents"],
                             embeddings=got["embeddings"], metadatas=got["metadatas"])
            started = time.perf_counter()
            ids, texts = [], []
            for got in pages(coll, ["documents"]):
                ids += list(got["ids"])
                texts += list(got["documents"])
            fetch_s = time.perf_counter() - started
            started = time.perf_counter()
            index = BM25Index.build(ids, texts)
            build_s = time.perf_counter() - started
            started = time.perf_counter()
            index.save(work / f"bm25-{k}x")
            save_s = time.perf_counter() - started
            started = time.perf_counter()
            BM25Index.load(work / f"bm25-{k}x")
            load_s = time.perf_counter() - started
            bm25.append({"scale": k, "docs": len(ids), "fetch_s": fetch_s, "build_s": build_s, "save_s": save_s,
                         "load_s": load_s, "mb": sum(f.stat().st_size for f in (work / f"bm25-{k}x").iterdir()) / 1e6})
            client.delete_collection(name)
    runs = [("full ingest", full_e, full), ("unchanged re-ingest", same_e, same), ("one file changed", one_e, one)]
    return {"runs": runs, "latency": latency, "bm25": bm25}


def server_lines(server: dict | None) -> list[str]:
    if not server:
        return []
    rows = [{"run": name, "embedded s": f"{e.seconds:.1f}", "server s": f"{s.seconds:.1f}",
             "server / embedded": f"{s.seconds / e.seconds:.2f}", "embedded (server)": f"{s.embedded}",
             "server run": s.line()} for name, e, s in server["runs"]]
    lat = [{"mode": mode, "embedded p50 ms": f"{server['latency']['embedded'][mode][0] * 1000:.0f}",
            "embedded p95 ms": f"{server['latency']['embedded'][mode][1] * 1000:.0f}",
            "server p50 ms": f"{server['latency']['server'][mode][0] * 1000:.0f}",
            "server p95 ms": f"{server['latency']['server'][mode][1] * 1000:.0f}"} for mode in RETRIEVAL_MODES]
    bm25 = [{"corpus": f"{b['scale']}x", "documents": f"{b['docs']:,}", "fetch over HTTP s": f"{b['fetch_s']:.1f}",
             "build s": f"{b['build_s']:.1f}", "save s": f"{b['save_s']:.2f}", "index MB": f"{b['mb']:.1f}",
             "first use s": f"{b['fetch_s'] + b['build_s'] + b['save_s']:.1f}",
             "later use (cached) s": f"{b['load_s']:.2f}"} for b in server["bm25"]]
    return [
        "## The store on a Chroma server (`chroma run` on 127.0.0.1) against the embedded store",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
        "Retrieval latency per question (embed the question + search, over HTTP for the server):",
        "",
        pd.DataFrame(lat).to_markdown(index=False, disable_numparse=True),
        "",
        "BM25 on a server store: rebuilt from the generation's documents on a machine's first use, then cached "
        "under the generation's name (synthetic copies of the corpus for 10x and 100x):",
        "",
        pd.DataFrame(bm25).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def encoder_flops_per_token(config, seq_len: float) -> float:
    """Forward FLOPs per token of a BERT-style encoder: 2 x matmul weights, plus attention scores."""
    h, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    weights = layers * (4 * h * h + 2 * h * ff)
    attention = layers * 2 * seq_len * h  # QK^T and AV, per token
    return 2.0 * (weights + attention)


def matmul_rate(device: str = "cpu", n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of fp32 matmul on the embedder's device, torch's threads as configured (best of a few)."""
    if device.startswith("cuda"):
        n, repeats = 8192, 50
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * repeats / best


def prefill_seconds(llm, prompts: list[str]) -> float:
    """Reading every prompt once, one at a time, with no answer token generated: work that batching
    redistributes but does not remove, so seq / prefill bounds the batched speed-up where one prompt
    already fills the hardware (a CPU; a GPU's batched prefill is faster than this)."""
    cuda = str(llm.model.device).startswith("cuda")
    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = llm.tokenizer(p, return_tensors="pt")["input_ids"].to(llm.model.device)
            try:  # logits for the last position only, as generate() asks for them
                llm.model(input_ids=ids, num_logits_to_keep=1)
            except TypeError:  # remote-code models without the argument
                llm.model(input_ids=ids)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def eval_speed(profile, embedder, questions: Path, max_new_tokens: int, batch_sizes: list[int]) -> dict:
    """Sequential (HuggingFaceLLM, one prompt at a time) vs batched generation of the same prompts, at
    each batch size (rows are also bounded by llm.max_batch_tokens)."""
    from jobs.eval.prompts import bare_user_message, rag_user_message
    from jobs.llm.huggingface import load_hf
    from jobs.retrieval.retriever import StoreRetriever

    qs = load_questions(questions).questions
    llm_cfg = dataclasses.replace(profile.llm, max_new_tokens=max_new_tokens, batch_size=1)
    one = load_hf(dataclasses.replace(profile, llm=llm_cfg))
    latencies, users = [], []
    with StoreRetriever(profile, embedder) as retriever:
        retriever.retrieve(qs[0].question, profile.retrieval.check_depth)  # warm-up
        for q in qs:
            started = time.perf_counter()
            hits = retriever.retrieve(q.question, profile.retrieval.check_depth)
            latencies.append(time.perf_counter() - started)
            context = [(h.path, h.heading, h.text) for h in hits[: profile.retrieval.top_k]]
            users += [bare_user_message(q.question), rag_user_message(q.question, context, q.language)]
    prompts = [one.render(u) for u in users]
    started = time.perf_counter()
    sequential = one.generate(prompts)
    seq_s = time.perf_counter() - started
    prefill_s = prefill_seconds(one, prompts)
    batched = []
    for batch_size in batch_sizes:
        many = one.__class__(dataclasses.replace(llm_cfg, batch_size=batch_size), one.model, one.tokenizer,
                             one.name, one.device, one.location)
        started = time.perf_counter()
        answers = many.generate(prompts)
        batched.append({"batch_size": batch_size, "seconds": time.perf_counter() - started,
                        "calls": len(many.batches([c.prompt_tokens for c in answers])),
                        "same": sum(a.text == b.text for a, b in zip(sequential, answers))})
    lat = pd.Series(latencies)
    return {"questions": len(qs), "prompts": len(prompts), "sequential_s": seq_s, "batched": batched,
            "prefill_s": prefill_s, "prompt_tokens": sum(c.prompt_tokens for c in sequential),
            "answer_tokens": sum(c.answer_tokens for c in sequential), "max_batch_tokens": llm_cfg.max_batch_tokens,
            "retrieve_p50": lat.quantile(0.5), "retrieve_p95": lat.quantile(0.95), "device": one.device,
            "users": users, "answers": [c.text for c in sequential]}


def served_speed(served_profile, users: list[str], max_new_tokens: int, concurrencies: list[int],
                 reference: list[str]) -> list[dict]:
    """The same user messages through llama.cpp's server, started with N slots and asked N at a time, for each
    N: wall time, agreement with the in-process answers and with the server's own one-at-a-time answers, and
    the server's own prefill and decode rates."""
    from jobs.llm.openai_chat import ServedLLM, probe
    from jobs.tools import serve

    out, first = [], None
    for n in concurrencies:
        cfg = dataclasses.replace(served_profile.llm, max_new_tokens=max_new_tokens, concurrency=n, max_retries=0,
                                  timeout_s=600.0)
        with serve.running(served_profile, parallel=n) as base_url:
            cfg = dataclasses.replace(cfg, base_url=base_url)
            llm = ServedLLM(cfg, probe(cfg, "none"), "none")
            prompts = [llm.render(u) for u in users]
            llm.generate(prompts[:1])  # warm-up: the first request pays for loading the weights into caches
            started = time.perf_counter()
            answers = llm.generate(prompts)
            seconds = time.perf_counter() - started
        texts = [a.text for a in answers]
        first = first or texts
        t = [a.timings or {} for a in answers]
        prefill_ms, prefill_n = sum(x.get("prompt_ms", 0) for x in t), sum(x.get("prompt_n", 0) for x in t)
        decode_ms, decode_n = sum(x.get("predicted_ms", 0) for x in t), sum(x.get("predicted_n", 0) for x in t)
        out.append({"concurrency": n, "seconds": seconds, "failed": sum(bool(a.error) for a in answers),
                    "same_as_in_process": sum(a == b for a, b in zip(texts, reference)),
                    "same_as_served_1": sum(a == b for a, b in zip(texts, first)),
                    "prompt_tokens": sum(a.prompt_tokens for a in answers),
                    "answer_tokens": sum(a.answer_tokens for a in answers),
                    "prefill_s": prefill_ms / 1000, "decode_s": decode_ms / 1000,
                    "prefill_tps": prefill_n / (prefill_ms / 1000) if prefill_ms else None,
                    "decode_tps": decode_n / (decode_ms / 1000) if decode_ms else None})
    return out


def nightly_cost(profile: Profile, embedder: Embedder, copy: Path, questions: Path, work: Path,
                 limit: int | None, pages: int = 3) -> dict:
    """What a night costs through the answer cache, on a private store, cache and reports folder: the first run of
    a question set (every answer generated), an unchanged night (every answer from the cache), and a docs update
    that changes ``pages`` of the pages the questions cite most (they are re-embedded; only the RAG answers whose
    retrieved context changed are generated again)."""
    from collections import Counter

    from jobs.eval.job import evaluate

    # Models resolved first: the private cache folder holds no prepared models.
    resolved = dataclasses.replace(
        profile, llm=dataclasses.replace(profile.llm, model=profile.resolve_model(profile.llm.model))
        if profile.llm.backend == "hf" else profile.llm,
        embedder=dataclasses.replace(profile.embedder, model=profile.resolve_model(profile.embedder.model)))
    p = dataclasses.replace(resolved, store=dataclasses.replace(profile.store, path=work / "stores" / "cost"),
                            paths=dataclasses.replace(profile.paths, cache=work / "cost-cache"),
                            eval=dataclasses.replace(profile.eval, questions=questions,
                                                     reports_dir=work / "cost-reports"))
    qs = load_questions(questions, p.eval.max_question_chars).questions[:limit]
    cited = Counter(src for q in qs for src in q.expected_sources)
    changed = [src for src, _ in cited.most_common() if (copy / src).is_file()][:pages]
    nights = []

    def night(name: str, embedded: int) -> None:
        run, df, _summary, _ = evaluate(p, limit=limit)
        header = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))["run"]
        nights.append({"night": name, "questions": int(df["id"].nunique()), "wall_s": header["wall_s"],
                       "generated": header["answers generated"], "cached": header["answers from cache"],
                       "failed": header["answers failed"], "embedded": embedded})

    first = ingest(p, source=str(copy), embedder=embedder)
    night("first run", first.embedded)
    night("unchanged night", ingest(p, source=str(copy), embedder=embedder).embedded)
    for src in changed:
        page = copy / src
        page.write_text(page.read_text(encoding="utf-8") + "\n\n## 更新说明\n\n本节是基准测试模拟的文档更新："
                        "新增了一段说明，介绍训练配置中的一个新选项及其默认值。\n", encoding="utf-8")
    night(f"docs update ({len(changed)} pages changed)", ingest(p, source=str(copy), embedder=embedder).embedded)
    return {"questions_file": questions.name, "nights": nights, "changed": changed}


def cost_lines(cost: dict | None) -> list[str]:
    if not cost:
        return []
    first = cost["nights"][0]
    per_answer = first["wall_s"] / max(first["generated"], 1)
    rows = [{"night": n["night"], "questions": n["questions"], "wall s": f"{n['wall_s']:.1f}",
             "× first run": f"{n['wall_s'] / first['wall_s']:.3f}", "answers generated": n["generated"],
             "from cache": n["cached"], "failed": n["failed"], "chunks embedded": n["embedded"]}
            for n in cost["nights"]]
    return [
        f"## What a night costs ({cost['questions_file']}, through the answer cache)",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
        f"The first run generates every answer ({per_answer:.2f} s per answer here); an unchanged night answers "
        "from the cache; a docs update re-embeds the changed pages and regenerates only the RAG answers whose "
        f"retrieved context changed (pages changed: {', '.join(cost['changed'])}).",
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline")
    p.add_argument("--corpus-dir", type=Path, default=ROOT.parent / "shared/corpora/xtuner")
    p.add_argument("--questions", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length in the generation benchmark")
    p.add_argument("--batch-sizes", default="", metavar="N,N,...",
                   help="batched generation rows to measure (default: the profile's llm.batch_size)")
    p.add_argument("--skip-eval", action="store_true", help="ingest and retrieval only")
    p.add_argument("--cost-questions", type=Path, default=ROOT / "eval/xtuner_nightly.csv",
                   help="the question set whose nightly cost is measured: first run, unchanged night, docs update")
    p.add_argument("--cost-limit", type=int, default=None, metavar="N",
                   help="only the first N questions of --cost-questions (default: all)")
    p.add_argument("--skip-cost", action="store_true", help="skip the nightly cost measurement")
    p.add_argument("--skip-server", action="store_true", help="skip the Chroma server measurements")
    p.add_argument("--bm25-scales", default="1,10,100", metavar="N,N,...",
                   help="corpus copies for the BM25 rebuild cost on a server store")
    p.add_argument("--served-profile", default="offline-served",
                   help="the profile whose [serve] model llama.cpp's server runs for the served measurements")
    p.add_argument("--concurrency", default="1,2,4,8", metavar="N,N,...",
                   help="served: server slots = requests in flight, one run each (empty: skip the served part)")
    p.add_argument("--device", help="auto, cpu or cuda: the GPU variant is `--device cuda` (bf16 generation)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override profile settings, e.g. --set llm.model=/models/internlm2-chat-1_8b")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@dataclass
class Measured:
    """What one benchmark run measured, for ``render``."""

    stamp: str
    profile: Profile
    embedder: Embedder
    corpus: Path
    files: list[str]
    rows: list[tuple[str, float, int, str]]  # ingest runs: (name, seconds, chunks embedded, detail)
    full: IngestSummary
    same: IngestSummary
    ours: dict[str, dict[str, float]]  # retrieval scores per mode
    n: int  # questions with expected sources
    tokenize_s: float
    half: dict | None  # the bf16 embedder
    seed: dict
    equal: dict
    gen: dict | None  # in-process generation
    served: list[dict] | None
    served_profile: Profile | None
    server: dict | None  # the Chroma server store
    cost: dict | None = None  # what a night costs through the answer cache


def measure(base: Profile, args: argparse.Namespace, served_profile: Profile | None, batch_sizes: list[int],
            concurrencies: list[int], scales: list[int]) -> Measured:
    """Every measurement, each against its baseline in the same run, on a private copy of the corpus."""
    questions = args.questions or base.eval.questions
    corpus = args.corpus_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    try:
        copy = work / "corpus"
        shutil.copytree(corpus, copy)
        profile = dataclasses.replace(base, store=dataclasses.replace(base.store, path=work / "stores" / "bench"))
        embedder = load_embedder(profile)
        embedder.model  # noqa: B018 - load before timing: every variant below reuses the loaded model

        rows = []
        full = ingest(profile, source=str(copy), embedder=embedder)
        rows.append(("full ingest", full.seconds, full.embedded, full.line()))
        same = ingest(profile, source=str(copy), embedder=embedder)
        rows.append(("unchanged re-ingest", same.seconds, same.embedded, same.line()))
        manifest = load_manifest(profile.corpus)
        files = list(select_files(corpus, manifest.include, manifest.exclude))
        # One real page gets a new section: the installation guide where the corpus has it.
        target = copy / next((f for f in files if f.endswith("get_started/installation.md")), files[0])
        target.write_text(target.read_text(encoding="utf-8") + "\n\n## 基准测试\n\n这一段是基准测试加入的新内容。\n",
                          encoding="utf-8")
        one = ingest(profile, source=str(copy), embedder=embedder)
        rows.append(("one file changed", one.seconds, one.embedded, one.line()))
        server = None if args.skip_server else store_speed(profile, embedder, copy, target, questions, work,
                                                           (full, same, one), scales)
        ours = {}
        for mode in RETRIEVAL_MODES:
            ours[mode], n = retrieval_scores(profile, questions, embedder, mode)
        texts = [embedder.passage_prefix + t for t in store_contents(profile, "documents").values()]
        started = time.perf_counter()
        embedder.model._model.tokenizer(texts, padding=True, truncation=True)  # as encode() does, per batch
        tokenize_s = time.perf_counter() - started

        # The opt-in bf16 embedder: same corpus, its own store; speed, vector drift, retrieval.
        half = None
        if profile.embedder.dtype != "bfloat16":
            p16 = dataclasses.replace(profile, embedder=dataclasses.replace(profile.embedder, dtype="bfloat16"),
                                      store=dataclasses.replace(profile.store, path=work / "stores" / "bench-bf16"))
            e16 = load_embedder(p16)
            e16.model  # noqa: B018 - load before timing
            full16 = ingest(p16, source=str(copy), embedder=e16)
            a, b = store_contents(profile, "embeddings"), store_contents(p16, "embeddings")
            cos = torch.nn.functional.cosine_similarity(torch.from_numpy(np.asarray([a[i] for i in a])),
                                                        torch.from_numpy(np.asarray([b[i] for i in a])))
            half = {"seconds": full16.seconds, "embedded": full16.embedded, "cos_min": cos.min().item(),
                    "cos_mean": cos.mean().item(),
                    "retrieval": {m: retrieval_scores(p16, questions, e16, m)[0] for m in RETRIEVAL_MODES}}
            rows.append(("full ingest, bfloat16 embedder (opt-in)", full16.seconds, full16.embedded,
                         f"{full.seconds / full16.seconds:.2f}x as fast as fp32; vectors vs fp32: cosine min "
                         f"{half['cos_min']:.5f}, mean {half['cos_mean']:.5f}"))

        seed = seed_way(corpus, files, embedder, questions, profile.retrieval.check_depth)
        equal = seed_way(corpus, files, embedder, questions, profile.retrieval.check_depth,
                         profile.chunking.size, profile.chunking.overlap)
        gen = None if args.skip_eval else eval_speed(profile, embedder, questions, args.max_new_tokens,
                                                     batch_sizes or [max(2, profile.llm.batch_size)])
        served = None if served_profile is None else served_speed(served_profile, gen["users"], args.max_new_tokens,
                                                                   concurrencies, gen["answers"])
        cost = None if args.skip_eval or args.skip_cost else nightly_cost(profile, embedder, copy,
                                                                           args.cost_questions, work,
                                                                           args.cost_limit)
        rows.append(("seed way (SimpleDirectoryReader + from_documents)", seed["seconds"], seed["chunks"],
                     f"{seed['chunks']} chunks of {seed['chunk_size']} tokens, {seed['truncated']} truncated "
                     f"(longest {seed['max_tokens']} > window {embedder.window})"))
        rows.append(("seed way at our chunk budget", equal["seconds"], equal["chunks"],
                     f"{equal['chunks']} chunks of {equal['chunk_size']} tiktoken tokens, {equal['truncated']} "
                     f"truncated; ours is {equal['seconds'] / full.seconds:.2f}x as fast"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Measured(stamp=datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), profile=profile, embedder=embedder,
                    corpus=corpus, files=files, rows=rows, full=full, same=same, ours=ours, n=n,
                    tokenize_s=tokenize_s, half=half, seed=seed, equal=equal, gen=gen, served=served,
                    served_profile=served_profile, server=server, cost=cost)



def render(m: Measured, max_new_tokens: int) -> str:
    """The benchmark's markdown: ratios against the baselines measured in the same run."""
    profile, embedder, full, same, ours, half, seed, equal, gen = (m.profile, m.embedder, m.full, m.same, m.ours,
                                                                   m.half, m.seed, m.equal, m.gen)
    table = pd.DataFrame([
        {"run": name, "seconds": f"{sec:.1f}", "× full": f"{sec / full.seconds:.3f}", "embedded": emb, "detail": d}
        for name, sec, emb, d in m.rows
    ])
    retrieval = pd.DataFrame([
        *({"pipeline": f"ours, {mode} ({profile.chunking.size}-token chunks, {full.chunks} chunks)", **_fmt(m)}
          for mode, m in ours.items()),
        *({"pipeline": f"ours, {mode}, bfloat16 embedder", **_fmt(m)}
          for mode, m in (half or {}).get("retrieval", {}).items()),
        {"pipeline": f"seed way ({seed['chunk_size']}-token chunks, {seed['chunks']} chunks)",
         **_fmt(seed["retrieval"])},
        {"pipeline": f"seed way at our budget ({equal['chunk_size']}-token chunks, {equal['chunks']} chunks)",
         **_fmt(equal["retrieval"])},
    ])
    config = embedder.model._model[0].auto_model.config
    mean_len = full.embed_tokens / max(full.embedded, 1)
    flops = encoder_flops_per_token(config, mean_len)
    rate = matmul_rate(embedder.device)
    bound = rate / flops
    achieved = full.embed_tokens / full.embed_seconds if full.embed_seconds else 0.0
    eval_lines: list[str] = []
    if gen is not None:
        qps_seq = gen["questions"] / gen["sequential_s"]
        eval_lines = [
            f"## Eval generation ({gen['questions']} questions = {gen['prompts']} prompts, bare + RAG, greedy, "
            f"{max_new_tokens} new tokens, {gen['device']})",
            pd.DataFrame([
                {"mode": "sequential (HuggingFaceLLM.complete, one prompt at a time)",
                 "seconds": f"{gen['sequential_s']:.1f}", "questions/s": f"{qps_seq:.3f}", "× sequential": "1.00",
                 "identical answers": "–", "generate() calls": str(gen["prompts"])},
                *({"mode": f"batched (batch {b['batch_size']}, length-sorted, left-padded)",
                   "seconds": f"{b['seconds']:.1f}", "questions/s": f"{gen['questions'] / b['seconds']:.3f}",
                   "× sequential": f"{gen['sequential_s'] / b['seconds']:.2f}",
                   "identical answers": f"{b['same']} of {gen['prompts']}", "generate() calls": str(b["calls"])}
                  for b in gen["batched"]),
            ]).to_markdown(index=False, disable_numparse=True),
            "",
            f"Rows per call are also bounded by llm.max_batch_tokens={gen['max_batch_tokens']} "
            "(rows x (longest prompt + new tokens)).",
            "",
            f"Reading the prompts alone ({gen['prompt_tokens']:,} tokens, one at a time, no answer token) takes "
            f"{gen['prefill_s']:.1f} s, {gen['prefill_s'] / gen['sequential_s']:.0%} of the sequential run: batching "
            f"that still reads prompts at that rate is at most {gen['sequential_s'] / gen['prefill_s']:.2f}x "
            "sequential on this machine, even if decoding cost nothing.",
            "",
            "Retrieval latency p50 "
            f"{gen['retrieve_p50'] * 1000:.0f} ms, p95 {gen['retrieve_p95'] * 1000:.0f} ms (embed the question + "
            "Chroma top-k).",
            "",
            *served_lines(gen, m.served or [], m.served_profile),
        ]
    text = "\n".join([
        f"# Benchmark {m.stamp}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"profile {profile.name}; embedder {embedder.name} on {embedder.device}; corpus {m.corpus} "
        f"({len(m.files)} files).",
        "",
        "## Ingest",
        table.to_markdown(index=False, disable_numparse=True),
        "",
        f"Full ingest: {full.chunks} chunks, {full.embedded / full.seconds:.1f} chunks/s. Unchanged re-ingest "
        f"took {same.seconds / full.seconds:.1%} of a full ingest (target ≤ 3%).",
        "",
        "## Embedding throughput against the machine's bound",
        f"{embedder.name}: {flops / 1e6:.1f} MFLOP per token at the mean embedded length of {mean_len:.0f} tokens "
        f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers, FFN {config.intermediate_size}). "
        f"fp32 matmul here: {rate / 1e9:.1f} GFLOP/s, so the bound is {bound:,.0f} tokens/s. Full ingest embedded "
        f"{full.embed_tokens:,} tokens in {full.embed_seconds:.1f} s = {achieved:,.0f} tokens/s, "
        f"{achieved / bound:.0%} of the bound. Tokenising every chunk again for the encoder takes "
        f"{m.tokenize_s:.2f} s, {m.tokenize_s / max(full.embed_seconds, 1e-9):.1%} of the embedding time.",
        "",
        *eval_lines,
        *cost_lines(m.cost),
        *server_lines(m.server),
        f"## Retrieval (file-level, {m.n} questions with expected sources)",
        retrieval.to_markdown(index=False, disable_numparse=True),
        "",
        f"ours ({profile.retrieval.mode}): {format_line(ours[profile.retrieval.mode])}; "
        f"seed way: {format_line(seed['retrieval'])}",
        "",
    ])
    return text


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    batch_sizes = _sizes(p, args.batch_sizes)  # before the long runs: a typo fails now, not in ten minutes
    concurrencies = _sizes(p, args.concurrency, minimum=1, flag="--concurrency")
    scales = _sizes(p, args.bm25_scales, minimum=1, flag="--bm25-scales")
    joblog.setup(args.verbose)
    base = load_profile(args.profile, overrides_from_cli(args.set, {
        "embedder.device": ("--device", args.device), "llm.device": ("--device", args.device)}))
    served_profile = None
    if concurrencies and not args.skip_eval:
        from jobs.tools import serve

        served_profile = load_profile(args.served_profile)
        serve.command(served_profile)  # the server binary and the GGUF are there: fail now, not in 20 minutes
    measured = measure(base, args, served_profile, batch_sizes, concurrencies, scales)
    text = render(measured, args.max_new_tokens)
    stamp = measured.stamp
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"bench-{stamp}.md", text)
    print(text)
    print(f"written: {args.out / f'bench-{stamp}.md'}")
    return 0


def _sizes(parser: argparse.ArgumentParser, text: str, minimum: int = 2, flag: str = "--batch-sizes") -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated integers, e.g. 8,16,32")
    if any(n < minimum for n in sizes):
        why = " (1 is the sequential baseline)" if minimum == 2 else ""
        parser.error(f"{flag} {text!r}: each must be >= {minimum}{why}")
    return sizes


def served_lines(gen: dict, served: list[dict], served_profile) -> list[str]:
    """The served rows beside the in-process ones, and where each path spends its time."""
    if not served:
        return []
    seq, prompts, questions = gen["sequential_s"], gen["prompts"], gen["questions"]
    best_batched = min(b["seconds"] for b in gen["batched"])
    decode_s = max(seq - gen["prefill_s"], 1e-9)
    rows = [{"path": "in process, sequential", "seconds": f"{seq:.1f}", "questions/s": f"{questions / seq:.3f}",
             "× in-process sequential": "1.00", "× in-process batched": f"{best_batched / seq:.2f}",
             "same answers as in process": "–", "same as served at 1": "–",
             "prefill tok/s": f"{gen['prompt_tokens'] / gen['prefill_s']:.0f}",
             "decode tok/s": f"{gen['answer_tokens'] / decode_s:.1f}"}]
    for r in served:
        rows.append({"path": f"served, llama.cpp, {r['concurrency']} slot(s) = in flight",
                     "seconds": f"{r['seconds']:.1f}", "questions/s": f"{questions / r['seconds']:.3f}",
                     "× in-process sequential": f"{seq / r['seconds']:.2f}",
                     "× in-process batched": f"{best_batched / r['seconds']:.2f}",
                     "same answers as in process": f"{r['same_as_in_process']} of {prompts}",
                     "same as served at 1": f"{r['same_as_served_1']} of {prompts}",
                     "prefill tok/s": "–" if r["prefill_tps"] is None else f"{r['prefill_tps']:.0f}",
                     "decode tok/s": "–" if r["decode_tps"] is None else f"{r['decode_tps']:.1f} per request"})
    best = min(served, key=lambda r: r["seconds"])
    serve = served_profile.serve
    return [
        f"## Served ({served_profile.serve.gguf.rpartition('/')[2]} behind llama.cpp's server, "
        f"{serve.threads or 'all budgeted'} threads, the same {prompts} prompts)",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
        f"Best: {best['concurrency']} in flight, {seq / best['seconds']:.2f}x in-process sequential and "
        f"{best_batched / best['seconds']:.2f}x in-process batched. Prefill and decode rates are the server's own "
        "(its per-request timings) and, in process, prompt tokens over the prompt-only pass and answer tokens over "
        "the rest of the sequential run. Answers differ between the paths where the numerics differ: llama.cpp "
        "multiplies Q4_1 weights with 8-bit activations, the in-process model is the same weights dequantised to "
        "fp32; and a server batching several requests runs other kernels than one alone.",
        "",
        *served_floor(seq, served),
    ]


def served_floor(seq: float, served: list[dict]) -> list[str]:
    """Why more slots do not help here, from the one-slot run: requests then run alone, so the server's
    per-request prompt and decode times add up to its wall time and split it cleanly."""
    one = next((r for r in served if r["concurrency"] == 1 and r["prefill_s"]), None)
    if one is None:
        return []
    prefill, decode, rest = one["prefill_s"], one["decode_s"], one["seconds"] - one["prefill_s"] - one["decode_s"]
    floor = seq / prefill
    return [
        f"Where one slot spends its {one['seconds']:.1f} s: reading prompts {prefill:.1f} s "
        f"({one['prompt_tokens']:,} tokens at {one['prefill_tps']:.0f} tok/s), decoding {decode:.1f} s, HTTP and "
        f"scheduling {max(rest, 0):.1f} s. Reading a prompt is already a matrix-matrix product that fills both "
        "cores, so more slots cannot make it faster; they only share the cores between requests (the per-request "
        f"rates above fall as slots rise while the wall time stays put). Even with decoding free, reading the "
        f"prompts caps the server at {floor:.2f}x in-process sequential on this machine: 4x would need prompts "
        f"read at {4 * one['prompt_tokens'] / seq:.0f} tok/s.",
        "",
    ]


def _fmt(means: dict[str, float]) -> dict[str, str]:
    return {k.replace("hit_at_", "hit@").replace("mrr", "MRR"): f"{v:.2f}" for k, v in means.items()}


if __name__ == "__main__":
    joblog.run_cli(main)
