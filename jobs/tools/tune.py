"""Tune retrieval on development question sets: every setting in one table, the chosen one marked, and what
each lever does alone.

    python -m jobs.tools.tune [--profile offline] [--questions DEV.csv ...]

Retrieval settings are chosen here, on questions kept apart from the set the nightly report is judged by, so
the published numbers are not fitted to their own questions. Two development sets by default:
``eval/xtuner_dev_questions.csv`` (written from the docs' own words, identifier-heavy) and
``eval/xtuner_hard_dev_questions.csv`` (paraphrases, English questions about Chinese-only pages, answers over
two pages). Each question's dense and BM25 candidates are retrieved once per heading weight (and once more
for its translation, where the profile rewrites queries); every fusion setting is computed from them, so a
grid of hundreds of settings costs seconds.

The levers: the fusion (RRF by rank, or relative-score by scores), RRF's ``rrf_k``, the BM25 list's weight and
the candidates' depth; ``heading_weight`` (BM25F by repetition of the heading path); and, for profiles whose
chat model can translate, ``rewrite_weight`` (the question translated into the docs' other language, fused
with the question; 0 = off).

The choice rule is fixed before any result is seen: highest MRR over all development questions together,
then hit@1, then hit@5; remaining ties go to the setting closest to plain RRF (RRF itself, then rrf_k 60, then
bm25_weight 1, then heading weight 1, then the profile's depth, then the profile's rewrite weight).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from jobs.common import log as joblog
from jobs.common.config import FUSIONS, ROOT, Profile, load_profile, overrides_from_cli
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.errors import JobError
from jobs.common.files import atomic_write
from jobs.common.questions import Question, load_questions
from jobs.retrieval.fusion import Hit, file_ranking, fuse
from jobs.retrieval.retriever import StoreRetriever, retrieval_seconds
from jobs.retrieval.rewrite import QueryRewriter, load_rewriter
from jobs.retrieval.scores import format_line, scores
from jobs.stores.chroma import chunk_texts
from jobs.stores.lexical import index_chunks

log = logging.getLogger("jobs.tools.tune")

RRF_KS = (10, 30, 60)
BM25_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
DEPTHS = (20, 50)
HEADING_WEIGHTS = (1, 2, 3)
REWRITE_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
DEV_SETS = (ROOT / "eval/xtuner_dev_questions.csv", ROOT / "eval/xtuner_hard_dev_questions.csv")
METRICS = ("hit_at_1", "hit_at_3", "hit_at_5", "mrr")


@dataclass(frozen=True)
class Setting:
    rrf_k: int
    bm25_weight: float
    fusion_depth: int
    heading_weight: int = 1
    rewrite_weight: float = 0.0
    fusion: str = "rrf"

    def distance_from_plain(self, depth: int, rewrite: float = 0.0) -> tuple:
        # rrf_k=60 is RRF's published constant (Cormack et al., 2009): leaving it is the larger departure.
        return (self.fusion != "rrf", abs(self.rrf_k - 60), abs(math.log(self.bm25_weight)), self.heading_weight - 1,
                abs(self.fusion_depth - depth), abs(self.rewrite_weight - rewrite))

    def flags(self) -> str:
        flags = [f"retrieval.fusion={self.fusion}", f"retrieval.rrf_k={self.rrf_k}",
                 f"retrieval.bm25_weight={self.bm25_weight:g}",
                 f"retrieval.fusion_depth={self.fusion_depth}", f"retrieval.heading_weight={self.heading_weight}"]
        if self.rewrite_weight:
            flags.append(f"retrieval.rewrite_weight={self.rewrite_weight:g}")
        return " ".join(f"--set {f}" for f in flags)


Scores = dict[str, float]


def ranked(results: dict[Setting, Scores], default_depth: int, default_rewrite: float = 0.0) -> list[Setting]:
    """Best first, by the rule in the module docstring."""
    return sorted(results, key=lambda s: (-round(results[s]["mrr"], 9), -results[s]["hit_at_1"],
                                          -results[s]["hit_at_5"], s.distance_from_plain(default_depth,
                                                                                         default_rewrite)))


def choose(results: dict[Setting, Scores], default_depth: int, default_rewrite: float = 0.0) -> Setting:
    return ranked(results, default_depth, default_rewrite)[0]


@dataclass
class Candidates:
    """One question's candidate lists, retrieved once: dense, and BM25 per heading weight; for the question
    and for its translation."""

    question: Question
    dense: list[Hit]
    lexical: dict[int, list[Hit]]
    dense_t: list[Hit]
    lexical_t: dict[int, list[Hit]]


def hits_for(c: Candidates, s: Setting, k: int) -> list[Hit]:
    """What StoreRetriever.retrieve returns at setting ``s`` (the same fusions, the same depths)."""
    if s.rewrite_weight and c.dense_t:
        depth = max(k, s.fusion_depth)
        a = fuse(c.dense[:depth], c.lexical[s.heading_weight][:depth], depth, s.rrf_k, s.bm25_weight, s.fusion)
        b = fuse(c.dense_t[:depth], c.lexical_t[s.heading_weight][:depth], depth, s.rrf_k, s.bm25_weight, s.fusion)
        return fuse(a, b, k, s.rrf_k, s.rewrite_weight)
    depth = max(k, s.fusion_depth)
    return fuse(c.dense[:depth], c.lexical[s.heading_weight][:depth], k, s.rrf_k, s.bm25_weight, s.fusion)


def candidates(profile: Profile, question_sets: Sequence[Path], embedder: Embedder,
               heading_weights: Sequence[int], rewriter: QueryRewriter | None, depth: int
               ) -> dict[Path, list[Candidates]]:
    """Every question's candidates, per set (questions with expected sources only)."""
    sets = {}
    for path in question_sets:
        qs = [q for q in load_questions(path).questions if q.expected_sources]
        if not qs:
            raise JobError(f"{path}: no question has expected_sources: nothing to tune on")
        sets[path] = qs
    if rewriter is not None:
        rewriter.prepare([q.question for qs in sets.values() for q in qs])
    with StoreRetriever(profile, embedder, "hybrid") as retriever:
        ids, texts, metas = chunk_texts(retriever.collection)
        by_id = {i: Hit(i, str(m.get("path", "")), str(m.get("heading", "")), 0.0, t)
                 for i, t, m in zip(ids, texts, metas)}
        # The store's own index for the profile's heading weight (what the retriever searches), built here
        # for the others.
        lexical = {hw: retriever.lexical if hw == profile.retrieval.heading_weight else
                   index_chunks(ids, texts, metas, hw) for hw in heading_weights}

        def bm25(index, query: str) -> list[Hit]:  # noqa: ANN001 - BM25Index
            return [Hit(cid, by_id[cid].path, by_id[cid].heading, score, by_id[cid].text)
                    for cid, score in index.search(query, depth)]

        out: dict[Path, list[Candidates]] = {}
        for path, qs in sets.items():
            rows = []
            for q in tqdm(qs, desc=f"tune {path.name}", unit="q", leave=False):
                t = rewriter.translation(q.question) if rewriter is not None else ""
                rows.append(Candidates(q, retriever.dense(q.question, depth),
                                       {hw: bm25(ix, q.question) for hw, ix in lexical.items()},
                                       retriever.dense(t, depth) if t else [],
                                       {hw: bm25(ix, t) for hw, ix in lexical.items()} if t else {}))
            out[path] = rows
    return out


def evaluate(rows: list[Candidates], s: Setting, k: int) -> Scores:
    per = [scores(file_ranking(h.path for h in hits_for(c, s, k)), c.question.expected_sources) for c in rows]
    return {m: sum(p[m] for p in per) / len(per) for m in METRICS}


def single(rows: list[Candidates], mode: str, k: int, heading_weight: int | None = None) -> Scores:
    """One retriever alone (BM25 at ``heading_weight``, else the smallest swept)."""
    per = [scores(file_ranking(h.path for h in (c.dense if mode == "dense" else c.lexical[
        heading_weight if heading_weight in c.lexical else min(c.lexical)])[:k]), c.question.expected_sources)
        for c in rows]
    return {m: sum(p[m] for p in per) / len(per) for m in METRICS}


def pooled(by_set: dict[Path, Scores], sizes: dict[Path, int]) -> Scores:
    total = sum(sizes.values())
    return {m: sum(by_set[p][m] * sizes[p] for p in by_set) / total for m in METRICS}


def sweep(profile: Profile, question_sets: Sequence[Path], embedder: Embedder, rrf_ks: Sequence[int] = RRF_KS,
          weights: Sequence[float] = BM25_WEIGHTS, depths: Sequence[int] = DEPTHS,
          heading_weights: Sequence[int] = HEADING_WEIGHTS, rewrite_weights: Sequence[float] = (0.0,),
          rewriter: QueryRewriter | None = None, fusions: Sequence[str] = FUSIONS,
          ) -> tuple[dict[Setting, Scores], dict[Setting, dict[Path, Scores]], dict[Path, list[Candidates]]]:
    """Scores per setting: pooled over the sets (for the rule), and per set."""
    k = profile.retrieval.check_depth
    cands = candidates(profile, question_sets, embedder, heading_weights, rewriter, max(max(depths), k))
    sizes = {p: len(rows) for p, rows in cands.items()}
    per_set: dict[Setting, dict[Path, Scores]] = {}
    for f, rrf_k, w, d, hw, rw in itertools.product(fusions, rrf_ks, weights, depths, heading_weights,
                                                    rewrite_weights):
        if f != "rrf" and not rw and rrf_k != (60 if 60 in rrf_ks else rrf_ks[0]):
            continue  # rrf_k only fuses a question with its translation here: one value stands for all
        s = Setting(rrf_k, w, d, hw, rw, f)
        per_set[s] = {p: evaluate(rows, s, k) for p, rows in cands.items()}
    return {s: pooled(v, sizes) for s, v in per_set.items()}, per_set, cands


def _fmt(m: Scores) -> str:
    return "/".join(f"{m[x]:.2f}" for x in METRICS[:3]) + f"/{m['mrr']:.3f}"


def levers(profile: Profile, results: dict[Setting, Scores], per_set: dict[Setting, dict[Path, Scores]],
           cands: dict[Path, list[Candidates]], best: Setting, public: list[Candidates] | None) -> pd.DataFrame:
    """Each lever alone (its best value on the development sets, all else plain), and the chosen combination,
    per development set and on the public set."""
    r = profile.retrieval
    k = r.check_depth
    plain = Setting(60, 1.0, r.fusion_depth if r.fusion_depth in {s.fusion_depth for s in results} else 50)
    previous = Setting(60, 3.0, plain.fusion_depth)
    grid = list(results)

    def best_of(pred) -> Setting | None:  # noqa: ANN001
        options = [s for s in grid if pred(s)]
        return ranked({s: results[s] for s in options}, plain.fusion_depth)[0] if options else None

    rows = [("dense alone", None), ("bm25 alone", None), ("plain RRF (k 60, weight 1)", plain),
            ("before this tuning (k 60, bm25 weight 3)", previous),
            ("RRF retuned (rrf_k, bm25_weight, depth)", best_of(
                lambda s: s.fusion == "rrf" and s.heading_weight == 1 and not s.rewrite_weight)),
            ("relative-score fusion (bm25_weight, depth)", best_of(
                lambda s: s.fusion != "rrf" and s.heading_weight == 1 and not s.rewrite_weight)),
            ("heading weight alone", best_of(lambda s: (s.fusion, s.rrf_k, s.bm25_weight, s.fusion_depth) == (
                "rrf", 60, 1.0, plain.fusion_depth) and not s.rewrite_weight)),
            ("query translation alone", best_of(lambda s: (s.fusion, s.rrf_k, s.bm25_weight, s.fusion_depth,
                                                            s.heading_weight) == ("rrf", 60, 1.0,
                                                                                  plain.fusion_depth, 1)
                                                 and s.rewrite_weight)),
            ("chosen", best)]
    out = []
    for label, s in rows:
        if s is None and "alone" in label and label.split()[0] in ("dense", "bm25"):
            mode = label.split()[0]
            entry = {"lever": label, "setting": "–"}
            for p, rows_ in cands.items():
                entry[p.stem.replace("xtuner_", "")] = _fmt(single(rows_, mode, k))
            if public:
                entry["public (measured only)"] = _fmt(single(public, mode, k))
            out.append(entry)
            continue
        if s is None or s not in per_set:
            continue
        entry = {"lever": label, "setting": f"{s.fusion}, k {s.rrf_k}, w {s.bm25_weight:g}, d {s.fusion_depth}, "
                                            f"h {s.heading_weight}, t {s.rewrite_weight:g}"}
        for p, m in per_set[s].items():
            entry[p.stem.replace("xtuner_", "")] = _fmt(m)
        if public:
            entry["public (measured only)"] = _fmt(evaluate(public, s, k))
        out.append(entry)
    return pd.DataFrame(out)


def latency(profile: Profile, embedder: Embedder, questions: list[Question],
            rewriter: QueryRewriter | None) -> str:
    """The profile's retriever, timed per question (embed + search + fusion), without and with its rewriting;
    and what the rewriting's model call costs per question."""
    lines = []
    for rw in (None, rewriter) if rewriter is not None else (None,):
        with StoreRetriever(profile, embedder, None, rw) as r:
            lat = pd.Series(retrieval_seconds(r, [q.question for q in questions], profile.retrieval.check_depth))
        lat *= 1000
        what = "with the cached translation" if rw is not None else "without rewriting"
        lines.append(f"retrieval {what}: p50 {lat.quantile(0.5):.0f} ms, p95 {lat.quantile(0.95):.0f} ms")
    if rewriter is not None:
        spent = pd.Series([v for v in rewriter.seconds.values() if v > 0])
        if len(spent):
            lines.append(f"the translation itself ({rewriter.llm.name}, generated in batches, per question): p50 "
                         f"{spent.quantile(0.5):.2f} s, p95 {spent.quantile(0.95):.2f} s over {len(spent)} questions "
                         "translated in this run (cached ones cost nothing)")
        else:
            lines.append("every translation came from the cache in this run (delete .cache/generations to time "
                         "the model call)")
    return "; ".join(lines) + "."


def report(profile: Profile, question_sets: Sequence[Path], results: dict[Setting, Scores],
           per_set: dict[Setting, dict[Path, Scores]], cands: dict[Path, list[Candidates]],
           public: list[Candidates] | None, timing: str, top: int = 15) -> tuple[str, Setting]:
    r = profile.retrieval
    rewrite_default = r.rewrite_weight if r.rewrite != "none" else 0.0
    current = Setting(r.rrf_k, r.bm25_weight, r.fusion_depth, r.heading_weight, rewrite_default, r.fusion)
    order = ranked(results, r.fusion_depth, rewrite_default)
    best = order[0]
    shown = order[:top] + [s for s in (current,) if s in results and s not in order[:top]]
    names = {p: p.stem.replace("xtuner_", "") for p in question_sets}
    table = pd.DataFrame([
        {"fusion": s.fusion, "rrf_k": s.rrf_k, "bm25_weight": f"{s.bm25_weight:g}", "depth": s.fusion_depth,
         "heading": s.heading_weight, "translation": f"{s.rewrite_weight:g}",
         "all dev (hit@1/3/5/MRR)": _fmt(results[s]), **{names[p]: _fmt(m) for p, m in per_set[s].items()},
         "": " ".join(x for x, on in (("chosen", s == best), ("profile", s == current)) if on)}
        for s in shown
    ])
    sizes = ", ".join(f"{names[p]}: {len(rows)}" for p, rows in cands.items())
    translation = f"by {profile.llm.model}" if r.rewrite != "none" else "off (this profile does not rewrite)"
    lines = [
        f"# Retrieval tuning on {len(question_sets)} development set(s) ({sizes} questions with expected sources)",
        "",
        f"Profile {profile.name}, store {profile.store.path}, ranking depth {r.check_depth}; {len(results)} settings; "
        f"query translation {translation}. Cells: hit@1/hit@3/hit@5/MRR.",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
        "## Each lever alone, and the chosen combination",
        "",
        levers(profile, results, per_set, cands, best, public).to_markdown(index=False, disable_numparse=True),
        "",
        "The public column is measured once per setting and never used to choose. Latency: " + timing,
        "",
        f"Chosen (best MRR over all development questions, then hit@1, hit@5, then closest to plain RRF): "
        f"{best.flags().replace('--set ', '')}: {format_line(results[best])}.",
        f"Profile now: {current.flags().replace('--set ', '')}"
        + (f": {format_line(results[current])}." if current in results else " (outside the grid)."),
        "",
        f"To use it: {best.flags()} (or put them in the profile's [retrieval]).",
        "",
    ]
    return "\n".join(lines), best


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tools.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline")
    p.add_argument("--questions", type=Path, action="append",
                   help="a development set, not the one the report is judged by (repeat for several; default: "
                        + ", ".join(q.name for q in DEV_SETS) + ")")
    p.add_argument("--no-public", action="store_true", help="do not measure the profile's eval set in the levers table")
    p.add_argument("--heading-weights", default="1,2,3", metavar="N,N,...",
                   help="heading weights to sweep (a profile sharing another's store must use that store's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    profile = load_profile(args.profile, overrides_from_cli(args.set, {}))
    question_sets = [q.resolve() for q in (args.questions or DEV_SETS)]
    if any(q == profile.eval.questions.resolve() for q in question_sets):
        log.warning("tuning on %s, the profile's own eval questions: the report's retrieval numbers will be "
                    "fitted to them", profile.eval.questions)
    embedder = load_embedder(profile)
    rewriter = load_rewriter(profile)
    rewrite_weights = REWRITE_WEIGHTS if rewriter is not None else (0.0,)
    try:
        heading_weights = tuple(int(x) for x in args.heading_weights.split(",") if x.strip())
    except ValueError:
        raise JobError(f"--heading-weights {args.heading_weights!r}: expected integers, e.g. 1,2,3") from None
    results, per_set, cands = sweep(profile, question_sets, embedder, heading_weights=heading_weights,
                                    rewrite_weights=rewrite_weights, rewriter=rewriter)
    public = None
    if not args.no_public and profile.eval.questions.resolve() not in question_sets:
        public = candidates(profile, [profile.eval.questions], embedder, heading_weights, rewriter,
                            max(max(DEPTHS), profile.retrieval.check_depth))[profile.eval.questions]
    timing = latency(profile, embedder, [c.question for rows in cands.values() for c in rows], rewriter)
    text, _ = report(profile, question_sets, results, per_set, cands, public, timing)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"tune-{stamp}.md", text)
    print(text)
    print(f"written: {args.out / f'tune-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    joblog.run_cli(main)
