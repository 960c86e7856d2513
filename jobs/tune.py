"""Tune hybrid fusion on a development question set: every setting in one table, the chosen one marked.

    python -m jobs.tune [--profile offline] [--questions eval/xtuner_dev_questions.csv]

Retrieval settings are chosen here, on questions kept apart from the set the nightly report is judged
by, so the published numbers are not fitted to their own questions. Each question's dense and BM25
candidate lists are retrieved once per depth, and every (rrf_k, bm25_weight) is fused from them, so a
grid of dozens of settings costs seconds.

The choice rule is fixed before any result is seen: highest MRR, then hit@1, then hit@5; remaining
ties go to the setting closest to plain RRF (rrf_k 60, then bm25_weight 1, then the profile's depth).
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

from jobs import log as joblog
from jobs.config import ROOT, Profile, load_profile, overrides_from_cli
from jobs.embedding import Embedder, load_embedder
from jobs.errors import JobError
from jobs.files import atomic_write
from jobs.questions import load_questions
from jobs.retrieval import StoreRetriever, fuse
from jobs.scoring.retrieval import file_ranking, format_line, scores

log = logging.getLogger("jobs.tune")

RRF_KS = (10, 30, 60, 100)
BM25_WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
DEPTHS = (20, 50, 100)


@dataclass(frozen=True)
class Setting:
    rrf_k: int
    bm25_weight: float
    fusion_depth: int

    def distance_from_plain(self, depth: int) -> tuple[int, float, int]:
        # rrf_k=60 is RRF's published constant (Cormack et al., 2009): leaving it is the larger departure.
        return abs(self.rrf_k - 60), abs(math.log(self.bm25_weight)), abs(self.fusion_depth - depth)


def ranked(results: dict[Setting, dict[str, float]], default_depth: int) -> list[Setting]:
    """Best first, by the rule in the module docstring: MRR, hit@1, hit@5, then the least departure from
    plain RRF."""
    return sorted(results, key=lambda s: (-round(results[s]["mrr"], 9), -results[s]["hit_at_1"],
                                          -results[s]["hit_at_5"], s.distance_from_plain(default_depth)))


def choose(results: dict[Setting, dict[str, float]], default_depth: int) -> Setting:
    return ranked(results, default_depth)[0]


def sweep(profile: Profile, questions_csv: Path, embedder: Embedder, rrf_ks: Sequence[int] = RRF_KS,
          weights: Sequence[float] = BM25_WEIGHTS, depths: Sequence[int] = DEPTHS,
          ) -> tuple[dict[Setting, dict[str, float]], dict[str, dict[str, float]], int]:
    """Mean file-level scores per fusion setting, and per single retriever, over the questions with sources."""
    qs = [q for q in load_questions(questions_csv).questions if q.expected_sources]
    if not qs:
        raise JobError(f"{questions_csv}: no question has expected_sources: nothing to tune on")
    k = profile.retrieval.check_depth
    per: dict[Setting, list[dict[str, float]]] = {}
    single: dict[str, list[dict[str, float]]] = {"dense": [], "bm25": []}
    with StoreRetriever(profile, embedder, "hybrid") as retriever:
        for q in tqdm(qs, desc="tune", unit="q", leave=False):
            lists = {d: (retriever.dense(q.question, max(k, d)), retriever.bm25(q.question, max(k, d)))
                     for d in depths}
            single["dense"].append(scores(file_ranking(h.path for h in retriever.dense(q.question, k)),
                                          q.expected_sources))
            single["bm25"].append(scores(file_ranking(h.path for h in retriever.bm25(q.question, k)),
                                         q.expected_sources))
            for rrf_k, weight, depth in itertools.product(rrf_ks, weights, depths):
                dense, lexical = lists[depth]
                hits = fuse(dense, lexical, k, rrf_k, weight)
                per.setdefault(Setting(rrf_k, weight, depth), []).append(
                    scores(file_ranking(h.path for h in hits), q.expected_sources))
    return {s: _mean(v) for s, v in per.items()}, {m: _mean(v) for m, v in single.items()}, len(qs)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def report(profile: Profile, questions_csv: Path, results: dict[Setting, dict[str, float]],
           single: dict[str, dict[str, float]], n: int, top: int = 15) -> tuple[str, Setting]:
    r = profile.retrieval
    current = Setting(r.rrf_k, r.bm25_weight, r.fusion_depth)
    order = ranked(results, r.fusion_depth)
    best = order[0]
    shown = order[:top] + [s for s in (current,) if s in results and s not in order[:top]]
    table = pd.DataFrame([
        {"rrf_k": s.rrf_k, "bm25_weight": f"{s.bm25_weight:g}", "fusion_depth": s.fusion_depth,
         **{key.replace("hit_at_", "hit@").replace("mrr", "MRR"): f"{v:.3f}" for key, v in results[s].items()},
         "": " ".join(x for x, on in (("chosen", s == best), ("profile", s == current)) if on)}
        for s in shown
    ])
    lines = [
        f"# Fusion tuning on {questions_csv} ({n} questions with expected sources)",
        "",
        f"Profile {profile.name}, store {profile.store.path}, ranking depth {r.check_depth}; "
        f"{len(results)} settings. Single retrievers: dense {format_line(single['dense'])}; "
        f"bm25 {format_line(single['bm25'])}.",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
        "Sensitivity, MRR by bm25_weight at the chosen rrf_k and depth: " + ", ".join(
            f"{s.bm25_weight:g}: {m['mrr']:.3f}" for s, m in sorted(results.items(), key=lambda kv: kv[0].bm25_weight)
            if s.rrf_k == best.rrf_k and s.fusion_depth == best.fusion_depth) + ".",
        "",
        f"Chosen (best MRR, then hit@1, hit@5, then closest to plain RRF): rrf_k={best.rrf_k} "
        f"bm25_weight={best.bm25_weight:g} fusion_depth={best.fusion_depth}: {format_line(results[best])}.",
        f"Profile now: rrf_k={current.rrf_k} bm25_weight={current.bm25_weight:g} "
        f"fusion_depth={current.fusion_depth}"
        + (f": {format_line(results[current])}." if current in results else " (outside the grid)."),
        "",
        f"To use it: --set retrieval.rrf_k={best.rrf_k} --set retrieval.bm25_weight={best.bm25_weight:g} "
        f"--set retrieval.fusion_depth={best.fusion_depth} (or put them in the profile's [retrieval]).",
        "",
    ]
    return "\n".join(lines), best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline")
    p.add_argument("--questions", type=Path, default=ROOT / "eval/xtuner_dev_questions.csv",
                   help="a development set, not the one the report is judged by")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    joblog.setup(args.verbose)
    profile = load_profile(args.profile, overrides_from_cli(args.set, {}))
    if args.questions.resolve() == profile.eval.questions.resolve():
        log.warning("tuning on %s, the profile's own eval questions: the report's retrieval numbers will be "
                    "fitted to them", args.questions)
    results, single, n = sweep(profile, args.questions, load_embedder(profile))
    text, _ = report(profile, args.questions, results, single, n)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"tune-{stamp}.md", text)
    print(text)
    print(f"written: {args.out / f'tune-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    joblog.run_cli(main)
