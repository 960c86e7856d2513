"""Eval job: questions -> answers (bare and RAG) -> scores -> report (the last two: jobs.eval.finish, as for a
re-report).

    python -m jobs.eval --profile offline [--questions CSV] [--resume [RUN]] [--baseline RUN] [--no-cache]
                        [--fail-under rag.keyword_hit_rate=0.3] [--fail-under change.rag.keyword_hit_rate=-0.05]

Exit codes: 0 success; 2 bad input or setup (questions, store, model, settings), nothing written;
3 a --fail-under threshold was missed (the report is written all the same); 4 the run stopped half-way (the
model or store server went away, a full disk): every answer so far is kept and ``--resume`` finishes it;
5 answers failed beyond ``eval.max_failed_share`` (the report is written; the run is never a baseline);
130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from jobs import stores
from jobs.common import log as joblog
from jobs.common.config import Profile, load_profile, overrides_from_cli
from jobs.common.embedding import Embedder, load_embedder
from jobs.common.errors import EXIT_STOPPED, JobError  # noqa: F401 - exit 4 (a server went away, a disk filled)
from jobs.common.questions import Question, QuestionSet, load_questions
from jobs.common.urls import redact
from jobs.eval.drift import save_corpus_files
from jobs.eval.finish import finish_run, headline, kept
from jobs.eval.history import Comparison, load_history, named_baseline
from jobs.eval.prompts import PROMPT_VERSION, bare_user_message, rag_user_message
from jobs.eval.report import summary_table
from jobs.eval.results import RunDir
from jobs.eval.scoring.summary import MODES
from jobs.eval.thresholds import Threshold
from jobs.llm import ChatModel, Completion, ServerLost, load_llm
from jobs.llm.cache import CachedChatModel, GenerationCache
from jobs.retrieval.fusion import file_ranking
from jobs.retrieval.retriever import StoreRetriever
from jobs.retrieval.rewrite import load_rewriter
from jobs.retrieval.scores import scores

log = logging.getLogger("jobs.eval")

EXIT_THRESHOLD = 3
EXIT_FAILED_ANSWERS = 5  # more answers failed than eval.max_failed_share allows: no success, never a baseline
RANKED_FILES = 10  # files kept per question for the hit@k curve


@dataclass
class Job:
    """One answer to produce: a question in one mode, its rendered prompt, and what retrieval found."""

    question: Question
    mode: str
    prompt: str
    extra: dict


def make_jobs(q: Question, modes: set[str], llm: ChatModel, retriever: StoreRetriever, profile: Profile) -> list[Job]:
    jobs = []
    if "bare" in modes:
        jobs.append(Job(q, "bare", llm.render(bare_user_message(q.question)), {}))
    if "rag" in modes:
        started = time.perf_counter()
        hits = retriever.retrieve(q.question, profile.retrieval.check_depth)
        retrieve_s = time.perf_counter() - started
        context = hits[: profile.retrieval.top_k]
        ranked = file_ranking(h.path for h in hits)
        extra = {
            **(scores(ranked, q.expected_sources) if q.expected_sources else {}),
            "retrieve_s": round(retrieve_s, 4),
            "rewrite": retriever.rewrite_of(q.question),
            # The very chunks given to the model, text included: failures are attributed from them later.
            "retrieved": json.dumps([{"path": h.path, "heading": h.heading, "score": round(h.score, 4),
                                      "chunk_id": h.chunk_id, "text": h.text} for h in context], ensure_ascii=False),
            "ranked_files": json.dumps(ranked[:RANKED_FILES], ensure_ascii=False),
        }
        prompt = llm.render(rag_user_message(q.question, [(h.path, h.heading, h.text) for h in context], q.language))
        jobs.append(Job(q, "rag", prompt, extra))
    return jobs


def record(job: Job, completion: Completion) -> dict:
    """One answer as recorded: what was asked and expected, the answer, what retrieval gave the model, timings
    and errors. It is scored later, from this record alone (jobs.eval.scoring.score), like a re-report's."""
    q = job.question
    return {
        "id": q.id, "category": q.category, "language": q.language, "mode": job.mode, "question": q.question,
        "expected_keywords": "|".join(q.expected_keywords), "expected_sources": "|".join(q.expected_sources),
        "answer": completion.text,
        "hit_at_1": None, "hit_at_3": None, "hit_at_5": None, "mrr": None, "retrieved": "[]", "ranked_files": "[]",
        "retrieve_s": None, "generate_s": round(completion.seconds, 4), "cached": completion.cached,
        "error": completion.error,
        "prompt_tokens": completion.prompt_tokens, "answer_tokens": completion.answer_tokens,
        "prompt_sha1": hashlib.sha1(completion.prompt.encode("utf-8")).hexdigest(),
        **job.extra,
    }


def run_info(profile: Profile, qs: QuestionSet) -> dict:
    flat = profile.as_flat_dict()
    # Settings that do not change answers may differ on resume: batch sizes, where reports go.
    same = {k: v for k, v in flat.items() if k not in ("llm.batch_size", "llm.max_batch_tokens",
                                                         "embedder.batch_size", "eval.reports_dir",
                                                         "eval.max_failed_share")}
    experiment = hashlib.sha256(json.dumps({**same, "prompt_version": PROMPT_VERSION}, sort_keys=True)
                                .encode()).hexdigest()[:16]
    return {"profile": profile.name, "questions": str(qs.path), "questions_sha256": qs.sha256,
            "prompt_version": PROMPT_VERSION, "experiment": experiment, "config": flat,
            # Microseconds: runs of several profiles within one second must still order correctly.
            "started_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}


def results_frame(records: list[dict], order: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    rank = {qid: i for i, qid in enumerate(order)}
    df["_order"] = df["id"].map(rank)
    return df.sort_values(["_order", "mode"]).drop(columns="_order").reset_index(drop=True)


def outcome(df: pd.DataFrame, max_failed_share: float) -> tuple[str, str]:
    """("ok" or "failed answers", the line that counts the failed answers)."""
    errors = df["error"].fillna("").astype(str)
    failed, total = int((errors != "").sum()), len(df)
    if not failed:
        return "ok", f"answers: {total}, none failed"
    line = f"answers: {failed} of {total} failed (first: {errors[errors != ''].iloc[0][:200]})"
    if failed / total > max_failed_share:
        return "failed answers", (f"{line}; more than eval.max_failed_share={max_failed_share:g}: this night is no "
                                  "success and will never be a baseline")
    return "ok", f"{line}; within eval.max_failed_share={max_failed_share:g}"


def stale_sources(questions: Sequence[Question], stored: set[str]) -> dict[str, list[str]]:
    """Expected sources the store does not hold, per question: after a docs update, the first thing to go stale."""
    stale = {q.id: [s for s in q.expected_sources if s not in stored] for q in questions}
    return {qid: missing for qid, missing in stale.items() if missing}


@dataclass
class Inputs:
    """A run's inputs, checked in full before any model loads or any file is written."""

    questions: QuestionSet
    selected: list[Question]
    info: dict
    run: RunDir | None  # the interrupted run to continue (--resume), else None


def check_inputs(profile: Profile, *, questions: Path | None, limit: int | None, thresholds: Sequence[Threshold],
                 baseline: str | None, resume: bool, resume_run: str | None) -> Inputs:
    qs = load_questions(questions or profile.eval.questions, profile.eval.max_question_chars)
    for t in thresholds:
        t.check(qs)
    if limit is not None and limit < 1:
        raise JobError(f"--limit {limit}: must be at least 1")
    info = run_info(profile, qs)
    reports = profile.eval.reports_dir
    load_history(reports)  # a damaged history is found (and rebuilt) now, not after the answers
    if baseline:
        named_baseline(reports, baseline)
    run = RunDir.resume(reports, profile.name, info, resume_run) if resume else None
    return Inputs(qs, list(qs.questions[:limit] if limit else qs.questions), info, run)


def answer_all(run: RunDir, selected: list[Question], done: dict[tuple[str, str], dict], answers: ChatModel,
               retriever: StoreRetriever, profile: Profile, stale: dict[str, list[str]]) -> dict[str, int]:
    """Every (question, mode) not in ``done`` answered, a step of questions at a time, each answer appended to the
    run as it lands; returns how many were generated, came from the cache, or failed."""
    counts = {"generated": 0, "cached": 0, "failed": 0}
    step = answers.questions_per_step
    with tqdm(total=len(selected) * len(MODES), initial=len(done), desc="answers", unit="answer") as bar:
        for i in range(0, len(selected), step):
            try:
                if retriever.rewriter is not None:  # the step's rewrites in one batch, before its retrievals
                    retriever.rewriter.prepare([q.question for q in selected[i:i + step] if (q.id, "rag") not in done])
                jobs = [j for q in selected[i:i + step] for j in make_jobs(
                    q, {m for m in MODES if (q.id, m) not in done}, answers, retriever, profile)]
            except Exception as exc:
                if not profile.store.url or isinstance(exc, JobError):
                    raise
                # A server store that stops answering mid-run: the answers so far are kept.
                raise kept(run, f"lost the Chroma server at {redact(profile.store.url)} while retrieving "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                           "start the server again") from None

            def on_answer(k: int, completion: Completion, jobs: list[Job] = jobs) -> None:
                rec = record(jobs[k], completion)
                rec["missing_sources"] = "|".join(stale.get(rec["id"], [])) if rec["mode"] == "rag" else ""
                try:
                    run.append(rec)  # each answer is durable as soon as it exists
                except OSError as exc:
                    raise kept(run, f"could not record an answer ({exc.strerror or exc}: {run.path})",
                               "free some space (or make the folder writable)") from None
                done[(rec["id"], rec["mode"])] = rec
                counts["failed" if completion.error else "cached" if completion.cached else "generated"] += 1
                bar.update(1)

            try:
                answers.generate([j.prompt for j in jobs], on_answer, presence_penalty=profile.llm.presence_penalty)
            except ServerLost as exc:
                raise kept(run, str(exc), "start the model server again") from None
    return counts


def run_header(run: RunDir, profile: Profile, inputs: Inputs, llm: ChatModel, embedder: Embedder,
               retriever: StoreRetriever, records: pd.DataFrame, counts: dict[str, int], n_kept: int | None,
               cache_rejected: int, wall: float) -> dict:
    """What answered, over what, and how: the report's Run table and summary.json's header."""
    qs, n = inputs.questions, len(inputs.selected)
    info = retriever.build_info
    return {
        "run": run.run_id, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, **llm.identity(), "embedder": embedder.name,
        "embedder_device": f"{embedder.device} ({embedder.dtype_name})",
        "retrieval": f"{retriever.describe()} top-{profile.retrieval.top_k} (ranking depth "
                     f"{profile.retrieval.check_depth})",
        "corpus_commit": info.get("corpus_commit", ""),
        "store_generation": retriever.generation,
        "store": f"{stores.describe(profile)}: {info.get('chunks')} chunks of ≤{info.get('chunk_size')} tokens, "
                 f"built {info.get('built_at')}",
        "questions": f"{qs.path.name} ({n} questions, sha256 {qs.sha256[:12]})",
        "prompt_version": PROMPT_VERSION,
        "answers generated": counts["generated"],
        "answers from cache": counts["cached"],
        **({"answers kept from the interrupted run": n_kept} if n_kept is not None else {}),
        "answers failed": int((records["error"].fillna("") != "").sum()),
        **({"cache entries regenerated (damaged or edited)": cache_rejected} if cache_rejected else {}),
        "wall_s": round(wall, 1),
        "questions_per_s": round(n / wall, 4) if wall > 0 else None,
    }


def evaluate(profile: Profile, *, questions: Path | None = None, resume: bool = False, resume_run: str | None = None,
             limit: int | None = None, baseline: str | None = None, use_cache: bool = True,
             thresholds: Sequence[Threshold] = (), ingest_first: bool = False,
             source: str | None = None) -> tuple[RunDir, pd.DataFrame, dict, Comparison | None]:
    """One run: questions -> answers, then ``finish_run`` scores them and writes the report. ``ingest_first``:
    bring the store up to date first (``make eval``), with the same profile and embedder, once the inputs are
    checked; ``source`` overrides the corpus manifest's sources for it."""
    inputs = check_inputs(profile, questions=questions, limit=limit, thresholds=thresholds, baseline=baseline,
                          resume=resume, resume_run=resume_run)
    embedder = load_embedder(profile)
    if ingest_first:
        from jobs.ingest.job import ingest

        print(ingest(profile, source, embedder=embedder).line(), flush=True)
    retriever = StoreRetriever(profile, embedder)  # refuses a missing or mismatched store: before the LLM loads
    llm: ChatModel | None = None
    try:
        # All the run needs from the store besides retrieval, read now: after the answers nothing touches it.
        file_hashes = retriever.file_hashes()
        stale = stale_sources(inputs.selected, set(file_hashes))
        for qid, missing in stale.items():
            log.warning("question %s: expected source(s) not in the store: %s", qid, ", ".join(missing))
        llm = load_llm(profile)
        # One cache for answers and rewrites alike; --no-cache (use_cache=False) stops its reads for both.
        cache = GenerationCache(profile.paths.cache / "generations", enabled=use_cache)
        retriever.rewriter = load_rewriter(profile, llm, cache)
        run = inputs.run or RunDir.create(profile.eval.reports_dir, profile.name, inputs.info)
        # Failed answers of an interrupted run are asked again; the rest are kept.
        ids = {q.id for q in inputs.selected}
        done = {key: rec for key, rec in run.done().items() if not rec.get("error") and key[0] in ids}
        n_kept = len(done)
        started = time.perf_counter()
        counts = answer_all(run, inputs.selected, done, CachedChatModel(llm, cache, {"prompt_version": PROMPT_VERSION}),
                            retriever, profile, stale)
        wall = time.perf_counter() - started
        # The answers as recorded; scored after, with everything else the run writes (jobs.eval.finish).
        records = results_frame([done[(q.id, m)] for q in inputs.selected for m in MODES],
                                [q.id for q in inputs.selected])
        try:
            save_corpus_files(run.path, retriever.build_info.get("corpus_commit", ""), file_hashes)
        except OSError as exc:
            raise kept(run, f"could not write the run's outputs ({exc.strerror or exc}: {exc.filename})",
                       "free some space (or make the folder writable)") from None
        header = run_header(run, profile, inputs, llm, embedder, retriever, records, counts,
                            n_kept if resume else None, cache.rejected, wall)
        df, summary, comparison = finish_run(run, header, records, abstain_phrases=profile.eval.abstain_phrases,
                                             outcome=outcome(records, profile.eval.max_failed_share)[0],
                                             baseline=baseline, reports_dir=profile.eval.reports_dir)
        return run, df, summary, comparison
    finally:
        retriever.close()
        if llm is not None:
            llm.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.eval", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 ok, 2 bad input/setup, 3 a --fail-under threshold missed, "
                                       "4 stopped half-way (--resume finishes it), 5 answers failed beyond "
                                       "eval.max_failed_share, 130 interrupted.")
    p.add_argument("--profile", default="offline", help="profile name (jobs/profiles) or a .toml path")
    p.add_argument("--ingest", action="store_true",
                   help="bring the store up to date first (what `make eval` does), with the same settings")
    p.add_argument("--source", help="with --ingest: a git URL, local git repo or folder instead of the manifest's")
    p.add_argument("--corpus", help="corpus manifest (default: the profile's)")
    p.add_argument("--questions", type=Path, help="question CSV (default: the profile's)")
    p.add_argument("--store", help="store path (default: the profile's)")
    p.add_argument("--store-url", help="a Chroma server, http://host:port (default: the profile's [store].url)")
    p.add_argument("--reports", help="reports folder (default: the profile's)")
    p.add_argument("--top-k", type=int, help="chunks given to the model as context")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="prompts per generate() call; 1 = one at a time")
    p.add_argument("--seed", type=int)
    p.add_argument("--limit", type=int, help="only the first N questions (smoke runs)")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN",
                   help="continue the newest unfinished run with the same settings (or RUN) instead of starting anew")
    p.add_argument("--baseline", metavar="RUN", help="compare with this run (default: the previous comparable one)")
    p.add_argument("--no-cache", action="store_true",
                   help="regenerate every answer and query rewrite (the cache is still refreshed)")
    p.add_argument("--fail-under", action="append", default=[], metavar="[change.]MODE.METRIC=MIN",
                   help="exit 3 when an overall metric is below MIN: rag.hit_at_5=0.8, gain.keyword_hit_rate=0.2 "
                        "(RAG minus bare), change.rag.keyword_hit_rate=-0.05 (since the baseline run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any profile setting; a flag above and a --set of the same setting must agree")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def profile_from_args(args: argparse.Namespace) -> Profile:
    return load_profile(args.profile, overrides_from_cli(args.set, {
        "store.path": ("--store", args.store), "store.url": ("--store-url", args.store_url),
        "corpus": ("--corpus", args.corpus), "eval.reports_dir": ("--reports", args.reports),
        "retrieval.top_k": ("--top-k", args.top_k), "llm.max_new_tokens": ("--max-new-tokens", args.max_new_tokens),
        "llm.seed": ("--seed", args.seed), "llm.batch_size": ("--batch-size", args.batch_size)}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    thresholds = [Threshold.parse(t) for t in args.fail_under]
    if args.source and not args.ingest:
        raise JobError("--source is where the ingest reads the docs from: add --ingest (or run `make ingest`)")
    profile = profile_from_args(args)
    run, df, summary, comparison = evaluate(
        profile, questions=args.questions, resume=args.resume is not None, resume_run=args.resume or None,
        limit=args.limit, baseline=args.baseline, use_cache=not args.no_cache, thresholds=thresholds,
        ingest_first=args.ingest, source=args.source)
    print(summary_table(summary).to_markdown(index=False, disable_numparse=True))
    print(f"report: {run.path / 'report.md'}")
    print(headline(summary))
    status, counted = outcome(df, profile.eval.max_failed_share)
    print(counted)
    if comparison is not None:
        print(f"since {comparison.baseline}: {comparison.regression()[1]}")
    code = 0
    for t in thresholds:
        failed, line = t.verdict(summary, comparison)
        print(line, file=sys.stderr if failed else sys.stdout)
        code = EXIT_THRESHOLD if failed else code
    if status != "ok":  # outranks a missed threshold: the numbers measure the failure, not the model
        print(f"FAIL: {counted}", file=sys.stderr)
        code = EXIT_FAILED_ANSWERS
    return code

