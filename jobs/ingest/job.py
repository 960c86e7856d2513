"""Ingest job: source -> documents -> chunks -> embeddings -> store.

    python -m jobs.ingest --profile offline [--source DIR_OR_URL] [--store DIR] [--check QUESTIONS.csv]
    python -m jobs.ingest --profile offline --store-url http://HOST:8000 --break-lease [--force]

Re-runs are incremental: chunk ids are ``path#ordinal``; a chunk whose text is unchanged keeps its
vector, a vector is reused for any text already embedded, and only new text is embedded. Nothing is
written when nothing changed.

Exit codes: 0 done (or nothing to do); 2 a one-line error, nothing published (bad settings, no source, an
unreachable, read-only or locked store, a store being written by another ingest); 4 stopped half-way: the
Chroma server went away during the ingest; nothing was published and the store is as it was: run the ingest
again.

--break-lease clears the single-writer lease of a store on a Chroma server and says whose lease it broke (or
that none was held), for an ingest killed on another host (its lease holds for store.lease_s; one killed on
this host is taken over at once by the next ingest). It is refused for a folder store, and when the holder is
an ingest alive on this host, unless --force. An ingest whose lease is broken stops at its next check and
publishes nothing.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from jobs import stores
from jobs.common import log as joblog
from jobs.common.config import Profile, load_profile, overrides_from_cli
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.errors import JobError
from jobs.common.urls import redact
from jobs.ingest.chunking import Chunk, Chunker
from jobs.ingest.documents import Document, read_document
from jobs.ingest.source import Checkout, fetch, load_manifest, source_from_override
from jobs.stores import chroma
from jobs.stores.chroma import StoredChunk, chunk_texts, read_chunks
from jobs.stores.lexical import index_chunks, lexical_spec

log = logging.getLogger("jobs.ingest")

# Bump when chunking logic changes in a way that moves chunk boundaries: forces a rebuild.
CHUNKER_VERSION = 1
# The embedding runs this many batches at a time, the writer's health checked in between: a Chroma server lost
# mid-ingest stops the job within one slice instead of after all the embedding.
EMBED_SLICE_BATCHES = 8


@dataclass
class IngestSummary:
    files: int = 0
    skipped: int = 0
    chunks: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    relabelled: int = 0  # metadata changed (e.g. heading, commit), vector kept
    embedded: int = 0
    embed_seconds: float = 0.0
    embed_tokens: int = 0  # tokens the embedder read (prefix and special tokens included)
    seconds: float = 0.0
    rebuilt: bool = False
    wrote: bool = False
    commit: str = ""
    source: str = ""
    max_chunk_tokens: int = 0

    def line(self) -> str:
        rate = self.embedded / self.seconds if self.seconds else 0.0
        return (
            f"files={self.files} skipped={self.skipped} added={self.added} updated={self.updated} "
            f"removed={self.removed} unchanged={self.unchanged} embedded={self.embedded} "
            f"in {self.seconds:.1f}s ({rate:.1f} chunks/s)"
        )


def read_documents(checkout: Checkout, min_chars: int) -> tuple[list[Document], list[str]]:
    """Parse every selected file; stubs (less prose than ``min_chars``) are skipped and named."""
    docs: list[Document] = []
    skipped: list[str] = []
    for rel in tqdm(checkout.files, desc="read", unit="file", leave=False):
        doc = read_document(checkout.root, rel)
        if doc.content_chars >= min_chars:
            docs.append(doc)
        else:
            skipped.append(rel)
    return docs, skipped


def make_chunker(profile: Profile, embedder: Embedder) -> Chunker:
    return Chunker(
        profile.chunking,
        count_tokens=embedder.count_tokens,
        token_ids=embedder.token_ids,
        passage_prefix=embedder.passage_prefix,
        special_tokens=embedder.special_tokens,
        window=embedder.window,
    )


@dataclass
class Plan:
    """What an ingest must do to the store, computed before anything is embedded or written."""

    write: list[Chunk] = field(default_factory=list)  # new chunks, or chunks whose text changed
    added: int = 0
    relabel: list[tuple[str, dict]] = field(default_factory=list)  # same text, new metadata
    remove: list[str] = field(default_factory=list)
    unchanged: int = 0
    total: int = 0
    max_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not (self.write or self.relabel or self.remove)


def plan_changes(docs: list[Document], old: dict[str, StoredChunk], commit: str,
                 chunk: Callable[[Document], list[Chunk]]) -> Plan:
    """Diff the corpus against the store. Files whose bytes are unchanged are not even re-chunked:
    with the same chunker settings (checked by the caller) they give the same chunks."""
    plan = Plan()
    by_path: dict[str, dict[str, StoredChunk]] = {}
    for s in old.values():
        by_path.setdefault(str(s.metadata.get("path")), {})[s.id] = s
    for doc in tqdm(docs, desc="chunk", unit="file", leave=False):
        stored = by_path.pop(doc.path, {})
        if stored and all(s.metadata.get("file_sha") == doc.sha for s in stored.values()):
            for s in stored.values():
                meta = {**s.metadata, "commit": commit}
                if meta != s.metadata:
                    plan.relabel.append((s.id, meta))
                else:
                    plan.unchanged += 1
                plan.max_tokens = max(plan.max_tokens, int(s.metadata.get("n_tokens", 0)))
            plan.total += len(stored)
            continue
        chunks = chunk(doc)
        for c in chunks:
            before = stored.get(c.id)
            if before is None or before.text_sha != c.text_sha:
                plan.write.append(c)
                plan.added += before is None
            elif before.metadata != c.metadata(commit):
                plan.relabel.append((c.id, c.metadata(commit)))
            else:
                plan.unchanged += 1
            plan.max_tokens = max(plan.max_tokens, c.n_tokens)
        plan.remove.extend(sorted(set(stored) - {c.id for c in chunks}))
        plan.total += len(chunks)
    for gone in by_path.values():  # files deleted from the corpus
        plan.remove.extend(sorted(gone))
    return plan


def build_info(profile: Profile, embedder: Embedder, checkout: Checkout, manifest_url: str,
               summary: IngestSummary) -> dict:
    return {
        **embedder.spec(),
        "embedder_dtype": embedder.dtype_name,
        "corpus": profile.corpus.stem,
        "corpus_url": redact(manifest_url),  # recorded and logged without credentials; git gets the real one
        "corpus_commit": checkout.commit,
        "corpus_source": checkout.source.describe(),
        "chunk_size": profile.chunking.size,
        "chunk_overlap": profile.chunking.overlap,
        "code_max_lines": profile.chunking.code_max_lines,
        "min_doc_chars": profile.chunking.min_doc_chars,
        "chunker_version": CHUNKER_VERSION,
        "index": chroma.INDEX_SPEC,
        "lexical": lexical_spec(profile.retrieval.heading_weight),  # a change rebuilds it, not the vectors
        "heading_weight": profile.retrieval.heading_weight,
        "files": summary.files,
        "skipped": summary.skipped,
        "chunks": summary.chunks,
        "max_chunk_tokens": summary.max_chunk_tokens,
    }


def ingest(profile: Profile, source: str | None = None, embedder: Embedder | None = None) -> IngestSummary:
    started = time.perf_counter()
    manifest = load_manifest(profile.corpus)
    with stores.open_writer(profile) as writer:
        override = source_from_override(source) if source else None
        checkout = fetch(manifest, profile.paths.cache, override)
        docs, skipped = read_documents(checkout, profile.chunking.min_doc_chars)
        if skipped:
            log.info("skipped %d stub file(s) (under %d chars of text), e.g. %s", len(skipped),
                     profile.chunking.min_doc_chars, ", ".join(skipped[:3]))
            log.debug("skipped: %s", ", ".join(skipped))
        if not docs:
            raise JobError(f"corpus {manifest.name} at {checkout.commit[:12]} has no documents "
                           f"({len(checkout.files)} files matched, {len(skipped)} skipped as stubs)")
        embedder = embedder or load_embedder(profile)
        summary = IngestSummary(files=len(checkout.files), skipped=len(skipped), commit=checkout.commit,
                                source=checkout.source.describe())
        _update(profile, writer, checkout, docs, manifest.url, embedder, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _update(profile: Profile, writer: stores.Writer, checkout: Checkout, docs: list[Document], manifest_url: str,
            embedder: Embedder, summary: IngestSummary) -> None:
    """Plan against the newest sound generation, embed what is new, write the next generation, publish it
    (or nothing, when nothing changed)."""
    base = writer.base()
    old: dict[str, StoredChunk] = {}
    if base.collection is not None:
        probe = build_info(profile, embedder, checkout, manifest_url, summary)
        changed = [k for k in chroma.REBUILD_KEYS if k in probe and base.info.get(k) != probe[k]]
        if changed:
            log.warning("store settings changed (%s): rebuilding from scratch", ", ".join(changed))
            base = writer.empty()
        else:
            old = read_chunks(base.collection)
    summary.rebuilt = base.rebuilt

    chunker: list[Chunker] = []

    def chunk(doc: Document) -> list[Chunk]:
        if not chunker:  # the tokenizer (and so the model) loads only when a file needs chunking
            chunker.append(make_chunker(profile, embedder))
        return chunker[0].chunk(doc)

    plan = plan_changes(docs, old, checkout.commit, chunk)
    summary.chunks, summary.max_chunk_tokens = plan.total, plan.max_tokens
    summary.added, summary.updated = plan.added, len(plan.write) - plan.added
    summary.removed, summary.relabelled, summary.unchanged = len(plan.remove), len(plan.relabel), plan.unchanged
    if not plan.total:
        raise JobError(f"corpus at {checkout.commit[:12]} gave no chunks")
    info = build_info(profile, embedder, checkout, manifest_url, summary)
    if base.is_live and base.collection is not None and plan.empty and base.has_lexical \
            and all(base.info.get(k) == v for k, v in info.items()):
        log.info("store %s is up to date at %s: nothing to write", stores.describe(profile), checkout.commit[:12])
        return
    info.update({"embedder_dim": embedder.dim, "embedder_window": embedder.window,
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    reusable: dict[str, list[float]] = {}  # text_sha -> a vector already in the store
    if plan.write and base.collection is not None:
        need = sorted({ch.text_sha for ch in plan.write})
        for i in range(0, len(need), 1000):
            found = base.collection.get(where={"text_sha": {"$in": need[i:i + 1000]}},
                                        include=["metadatas", "embeddings"])
            for meta, emb in zip(found["metadatas"], found["embeddings"]):
                reusable[str(meta["text_sha"])] = [float(x) for x in emb]
    new = {ch.text_sha: ch for ch in plan.write if ch.text_sha not in reusable}
    texts = sorted((sha, ch.text) for sha, ch in new.items())
    started = time.perf_counter()
    vectors = dict(zip((sha for sha, _ in texts), embed_checked(embedder, [t for _, t in texts],
                                                                 writer.check_healthy)))
    summary.embed_seconds = time.perf_counter() - started
    summary.embed_tokens = sum(ch.n_tokens for ch in new.values())
    summary.embedded = len(texts)
    vectors.update(reusable)

    gen = writer.create(base, exclude=set(plan.remove) | {ch.id for ch in plan.write})
    coll = gen.collection
    if plan.remove:
        coll.delete(ids=plan.remove)
    for i in tqdm(range(0, len(plan.write), 1000), desc="store", unit="batch", leave=False):
        batch = plan.write[i:i + 1000]
        coll.upsert(
            ids=[ch.id for ch in batch],
            documents=[ch.text for ch in batch],
            metadatas=[ch.metadata(checkout.commit) for ch in batch],
            embeddings=[vectors[ch.text_sha] for ch in batch],
        )
    for i in range(0, len(plan.relabel), 1000):
        batch = plan.relabel[i:i + 1000]
        coll.update(ids=[cid for cid, _ in batch], metadatas=[meta for _, meta in batch])
    if coll.count() != plan.total:
        raise JobError(f"store check failed: {coll.count()} chunks stored, {plan.total} expected")
    # The lexical index is rebuilt from exactly the chunks now in the generation (ms for thousands), so it
    # can never drift from the vectors; it is published with them.
    lexical = index_chunks(*chunk_texts(coll), profile.retrieval.heading_weight)
    info["lexical_docs"] = len(lexical)
    name = writer.publish(gen, info, lexical)
    summary.wrote = True
    log.info("published %s (%d chunks, commit %s)", name, plan.total, checkout.commit[:12])


def embed_checked(embedder: Embedder, texts: list[str], check: Callable[[], None]) -> list[list[float]]:
    """``embedder.embed_passages(texts)`` a slice of whole batches at a time, ``check()`` (the writer's health)
    before each. The texts go longest first, as embed_passages orders them itself, so every batch, and so
    every vector, is the one a single call over all of them gives."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    step = embedder.cfg.batch_size * EMBED_SLICE_BATCHES
    out: list[list[float]] = [[] for _ in texts]
    with tqdm(total=len(texts), desc="Generating embeddings", unit="chunk", leave=False) as bar:
        for start in range(0, len(order), step):
            check()
            part = order[start:start + step]
            for i, vec in zip(part, embedder.embed_passages([texts[i] for i in part], show_progress=False)):
                out[i] = vec
            bar.update(len(part))
            log.debug("embedded %d of %d chunks", start + len(part), len(texts))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="offline", help="profile name (jobs/profiles) or a .toml path")
    p.add_argument("--source", help="override the manifest's sources: a git URL, a local git repo or a folder")
    p.add_argument("--store", help="store path (default: the profile's [store].path)")
    p.add_argument("--store-url", help="a Chroma server, http://host:port (default: the profile's [store].url)")
    p.add_argument("--corpus", help="corpus manifest (default: the profile's)")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk, prefix and special tokens included")
    p.add_argument("--chunk-overlap", type=int, help="overlap between chunks of a section, in tokens")
    p.add_argument("--check", metavar="QUESTIONS_CSV",
                   help="after ingesting, print file-level hit@1/3/5 and MRR for the CSV's expected_sources")
    p.add_argument("--check-only", action="store_true", help="skip ingesting; only run --check on the store")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any profile setting, e.g. --set embedder.batch_size=64")
    p.add_argument("--break-lease", action="store_true",
                   help="only clear the single-writer lease of the store on a Chroma server (see below)")
    p.add_argument("--force", action="store_true",
                   help="with --break-lease: break it even if its holder is an ingest alive on this host")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def profile_from_args(args: argparse.Namespace) -> Profile:
    return load_profile(args.profile, overrides_from_cli(args.set, {
        "store.path": ("--store", args.store),
        "store.url": ("--store-url", args.store_url),
        "corpus": ("--corpus", args.corpus),
        "chunking.size": ("--chunk-size", args.chunk_size),
        "chunking.overlap": ("--chunk-overlap", args.chunk_overlap),
    }))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    if args.force and not args.break_lease:
        raise JobError("--force only goes with --break-lease")
    profile = profile_from_args(args)
    if args.break_lease:
        print(stores.break_lease(profile, force=args.force), flush=True)
        return 0
    if not args.check_only:
        summary = ingest(profile, args.source)
        print(summary.line(), flush=True)
        log.info("summary: %s", {k: v for k, v in asdict(summary).items() if k in
                                 ("commit", "source", "chunks", "relabelled", "rebuilt", "wrote",
                                  "max_chunk_tokens")})
    if args.check:
        from jobs.retrieval.check import run_check

        for line in run_check(profile, Path(args.check)):
            print(line, flush=True)
    return 0

