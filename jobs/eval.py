"""Eval job: questions -> answers (bare and RAG) -> scores -> report.

    python -m jobs.eval --profile offline [--questions CSV] [--resume [RUN]] [--fail-under rag.keyword_hit_rate=0.3]

Exit codes: 0 success; 2 bad input or setup (questions, store, model), nothing written; 3 a
--fail-under threshold was missed (the report is written all the same); 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from jobs import log as joblog
from jobs.config import Profile, load_profile, parse_override
from jobs.embedding import load_embedder
from jobs.errors import JobError
from jobs.llm import ChatLLM, load_llm
from jobs.prompts import PROMPT_VERSION, bare_user_message, rag_user_message
from jobs.questions import Question, QuestionSet, load_questions
from jobs.report import render, summary_table
from jobs.results import RunDir, atomic_write, point_latest
from jobs.retrieval import Hit, StoreRetriever
from jobs.scoring import keywords as kw
from jobs.scoring.retrieval import file_ranking, scores
from jobs.scoring.summary import METRICS, metric, summarise

log = logging.getLogger("jobs.eval")

EXIT_THRESHOLD = 3


@dataclass(frozen=True)
class Threshold:
    key: str
    minimum: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        key, sep, value = text.partition("=")
        mode, _, name = key.strip().partition(".")
        try:
            if not sep or mode not in ("bare", "rag", "delta") or name not in METRICS:
                raise ValueError
            return cls(key.strip(), float(value))
        except ValueError:
            raise JobError(f"--fail-under {text!r}: expected MODE.METRIC=NUMBER with MODE bare, rag or delta and "
                           f"METRIC one of {', '.join(METRICS)}; e.g. rag.keyword_hit_rate=0.3") from None


def score_answer(q: Question, answer: str, phrases: tuple[str, ...]) -> dict:
    hits = kw.keyword_hits(answer, q.expected_keywords)
    rate = kw.keyword_hit_rate(answer, q.expected_keywords)
    return {
        "keyword_hits": "|".join("1" if h else "0" for h in hits),
        "keyword_hit_rate": rate,
        "all_keywords_hit": (all(hits) if hits else None),
        "abstained": kw.abstained(answer, phrases),
    }


def _record(q: Question, mode: str, completion, phrases: tuple[str, ...], **extra: object) -> dict:
    return {
        "id": q.id, "category": q.category, "language": q.language, "mode": mode, "question": q.question,
        "expected_keywords": "|".join(q.expected_keywords), "expected_sources": "|".join(q.expected_sources),
        "answer": completion.text,
        **score_answer(q, completion.text, phrases),
        "hit_at_1": None, "hit_at_3": None, "hit_at_5": None, "mrr": None, "retrieved": "[]",
        "retrieve_s": None, "generate_s": round(completion.seconds, 4),
        "prompt_tokens": completion.prompt_tokens, "answer_tokens": completion.answer_tokens,
        "prompt_sha1": hashlib.sha1(completion.prompt.encode("utf-8")).hexdigest(),
        **extra,
    }


def answer_question(q: Question, llm: ChatLLM, retriever: StoreRetriever, profile: Profile,
                    todo: set[str]) -> list[dict]:
    phrases = profile.eval.abstain_phrases
    out = []
    if "bare" in todo:
        out.append(_record(q, "bare", llm.complete(bare_user_message(q.question)), phrases))
    if "rag" in todo:
        started = time.perf_counter()
        hits: list[Hit] = retriever.retrieve(q.question, profile.retrieval.check_depth)
        retrieve_s = time.perf_counter() - started
        context = hits[: profile.retrieval.top_k]
        completion = llm.complete(rag_user_message(q.question, [(h.path, h.heading, h.text) for h in context]))
        ranking = scores(file_ranking(h.path for h in hits), q.expected_sources) if q.expected_sources else {}
        out.append(_record(
            q, "rag", completion, phrases, **ranking, retrieve_s=round(retrieve_s, 4),
            retrieved=json.dumps([{"path": h.path, "heading": h.heading, "score": round(h.score, 4),
                                   "chunk_id": h.chunk_id} for h in context], ensure_ascii=False),
        ))
    return out


def run_info(profile: Profile, qs: QuestionSet) -> dict:
    flat = profile.as_flat_dict()
    experiment = hashlib.sha256(json.dumps({**flat, "prompt_version": PROMPT_VERSION}, sort_keys=True)
                                .encode()).hexdigest()[:16]
    return {"profile": profile.name, "questions": str(qs.path), "questions_sha256": qs.sha256,
            "prompt_version": PROMPT_VERSION, "experiment": experiment, "config": flat,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def results_frame(records: list[dict], order: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    rank = {qid: i for i, qid in enumerate(order)}
    df["_order"] = df["id"].map(rank)
    return df.sort_values(["_order", "mode"]).drop(columns="_order").reset_index(drop=True)


def write_outputs(run: RunDir, profile: Profile, header: dict, df: pd.DataFrame, summary: dict) -> None:
    atomic_write(run.path / "results.csv", df.to_csv(index=False))
    atomic_write(run.path / "results.jsonl",
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict(orient="records")))
    atomic_write(run.path / "report.md", render(run.info(), header, summary, df))
    # summary.json last: its presence marks the run finished.
    atomic_write(run.path / "summary.json",
                 json.dumps({"run": header, **summary}, indent=2, ensure_ascii=False, default=str))
    point_latest(profile.eval.reports_dir, run, headline(summary))


def headline(summary: dict) -> str:
    def f(key: str) -> str:
        v = metric(summary, key)
        return "–" if v is None else f"{v:.2f}"

    return (f"keyword hit bare {f('bare.keyword_hit_rate')} → RAG {f('rag.keyword_hit_rate')} "
            f"(Δ {f('delta.keyword_hit_rate')}); hit@5 {f('rag.hit_at_5')}, MRR {f('rag.mrr')}; "
            f"abstention on negatives bare {f('bare.abstention')} / RAG {f('rag.abstention')}")


def evaluate(profile: Profile, *, questions: Path | None = None, resume: bool = False, resume_run: str | None = None,
             limit: int | None = None) -> tuple[RunDir, pd.DataFrame, dict]:
    qs = load_questions(questions or profile.eval.questions)  # validated before any model loads
    selected = list(qs.questions[:limit] if limit else qs.questions)
    info = run_info(profile, qs)
    embedder = load_embedder(profile)
    retriever = StoreRetriever(profile, embedder)  # refuses a missing or mismatched store: before the LLM loads
    try:
        llm = load_llm(profile)
        reports = profile.eval.reports_dir
        run = (RunDir.resume(reports, profile.name, info, resume_run) if resume
               else RunDir.create(reports, profile.name, info))
        done = run.done()
        started = time.perf_counter()
        generated = 0
        for q in tqdm(selected, desc="questions", unit="q"):
            todo = {m for m in ("bare", "rag") if (q.id, m) not in done}
            for rec in answer_question(q, llm, retriever, profile, todo):
                run.append(rec)
                done[(rec["id"], rec["mode"])] = rec
                generated += 1
        wall = time.perf_counter() - started
        df = results_frame([done[(q.id, m)] for q in selected for m in ("bare", "rag")], [q.id for q in selected])
        summary = summarise(df)
        header = {
            "run": run.run_id, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "profile": profile.name, **llm.identity(), "embedder": embedder.name, "embedder_device": embedder.device,
            "retrieval": f"dense top-{profile.retrieval.top_k} (ranking depth {profile.retrieval.check_depth})",
            "corpus_commit": retriever.build_info.get("corpus_commit", ""),
            "store": f"{profile.store.path.name}: {retriever.build_info.get('chunks')} chunks of ≤"
                     f"{retriever.build_info.get('chunk_size')} tokens, built {retriever.build_info.get('built_at')}",
            "questions": f"{qs.path.name} ({len(selected)} questions, sha256 {qs.sha256[:12]})",
            "prompt_version": PROMPT_VERSION,
            "answers generated this session": generated,
            "wall_s": round(wall, 1),
            "questions_per_s": round(len(selected) / wall, 4) if wall and generated else None,
        }
        write_outputs(run, profile, header, df, summary)
        return run, df, summary
    finally:
        retriever.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.eval", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 ok, 2 bad input/setup, 3 a --fail-under threshold missed.")
    p.add_argument("--profile", default="offline", help="profile name (jobs/profiles) or a .toml path")
    p.add_argument("--questions", type=Path, help="question CSV (default: the profile's)")
    p.add_argument("--store", help="store path (default: the profile's)")
    p.add_argument("--reports", help="reports folder (default: the profile's)")
    p.add_argument("--top-k", type=int, help="chunks given to the model as context")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--limit", type=int, help="only the first N questions (smoke runs)")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN",
                   help="continue the newest unfinished run (or RUN) instead of starting a new one")
    p.add_argument("--fail-under", action="append", default=[], metavar="MODE.METRIC=MIN",
                   help="exit 3 when an overall metric is below MIN, e.g. rag.hit_at_5=0.8 or "
                        "delta.keyword_hit_rate=0.2 (RAG minus bare)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    thresholds = [Threshold.parse(t) for t in args.fail_under]
    overrides: dict[str, object] = dict(parse_override(s) for s in args.set)
    overrides.update({"store.path": args.store, "eval.reports_dir": args.reports, "retrieval.top_k": args.top_k,
                      "llm.max_new_tokens": args.max_new_tokens, "llm.seed": args.seed})
    profile = load_profile(args.profile, overrides)
    run, df, summary = evaluate(profile, questions=args.questions, resume=args.resume is not None,
                                resume_run=args.resume or None, limit=args.limit)
    print(summary_table(summary).to_markdown(index=False, disable_numparse=True))
    print(f"report: {run.path / 'report.md'}")
    print(headline(summary))
    code = 0
    for t in thresholds:
        value = metric(summary, t.key)
        if value is None or value < t.minimum:
            print(f"FAIL: {t.key} = {'n/a' if value is None else f'{value:.3f}'} < {t.minimum}", file=sys.stderr)
            code = EXIT_THRESHOLD
    return code


if __name__ == "__main__":
    joblog.run_cli(main)
