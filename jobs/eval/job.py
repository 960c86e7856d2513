"""Eval job: questions -> answers (bare and RAG) -> scores -> report.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from jobs import stores
from jobs.common import log as joblog
from jobs.common.config import Profile, load_profile, overrides_from_cli
from jobs.common.embedding import load_embedder
from jobs.common.errors import EXIT_STOPPED, JobError  # 4: a server went away or a disk filled
from jobs.common.files import atomic_write
from jobs.common.questions import Question, QuestionSet, load_questions
from jobs.common.urls import redact
from jobs.eval.drift import save_corpus_files
from jobs.eval.history import (
    Comparison,
    compare,
    find_baseline,
    history_with,
    load_history,
    named_baseline,
    save_history,
)
from jobs.eval.prompts import PROMPT_VERSION, bare_user_message, rag_user_message
from jobs.eval.report import summary_table, write_report, write_summary
from jobs.eval.results import RunDir, point_latest
from jobs.eval.scoring import attribution, copying
from jobs.eval.scoring import keywords as kw
from jobs.eval.scoring.summary import MODES, metric, summarise_run
from jobs.eval.thresholds import Threshold
from jobs.llm import ChatModel, Completion, ServerLost, load_llm
from jobs.llm.cache import GenerationCache
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


def score_answer(q: Question, answer: str, phrases: tuple[str, ...]) -> dict:
    """Keyword hits and abstention; a failed answer (empty) scores no hit and no abstention."""
    hits = kw.keyword_hits(answer, q.expected_keywords)
    return {
        "keyword_hits": "|".join("1" if h else "0" for h in hits),
        "keyword_hit_rate": kw.keyword_hit_rate(answer, q.expected_keywords),
        "all_keywords_hit": (all(hits) if hits else None),
        "abstained": kw.abstained(answer, phrases),
    }


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


OnAnswer = Callable[[int, Completion, bool], None]


def answer(llm: ChatModel, cache: GenerationCache, prompts: list[str], on_answer: OnAnswer,
           presence_penalty: float = 0.0) -> None:
    """Answers for prompts, from the cache where possible and generated otherwise; ``on_answer(index,
    completion, cached)`` as each one is ready. Failed answers are passed on but never cached."""
    fingerprint = {**llm.fingerprint(), "prompt_version": PROMPT_VERSION}
    if presence_penalty:  # keyed only when set: the answers cached without it stay valid
        fingerprint["presence_penalty"] = presence_penalty
    keys = [cache.key(fingerprint, p) for p in prompts]
    missing = []
    for i, key in enumerate(keys):
        found = cache.get(key, prompts[i])
        if found is None:
            missing.append(i)
        else:
            on_answer(i, Completion(text=found["text"], prompt=prompts[i], prompt_tokens=found["prompt_tokens"],
                                    answer_tokens=found["answer_tokens"], seconds=found["seconds"]), True)

    def generated(k: int, completion: Completion) -> None:
        i = missing[k]
        on_answer(i, completion, False)  # the answer is the run's first; the cache only saves a later run time
        if not completion.error:
            cache.put(keys[i], prompts[i], text=completion.text, prompt_tokens=completion.prompt_tokens,
                      answer_tokens=completion.answer_tokens, seconds=completion.seconds)

    if missing:
        llm.generate([prompts[i] for i in missing], on_result=generated, presence_penalty=presence_penalty)


def record(job: Job, completion: Completion, cached: bool, phrases: tuple[str, ...]) -> dict:
    q = job.question
    return {
        "id": q.id, "category": q.category, "language": q.language, "mode": job.mode, "question": q.question,
        "expected_keywords": "|".join(q.expected_keywords), "expected_sources": "|".join(q.expected_sources),
        "answer": completion.text,
        **score_answer(q, completion.text, phrases),
        "hit_at_1": None, "hit_at_3": None, "hit_at_5": None, "mrr": None, "retrieved": "[]", "ranked_files": "[]",
        "retrieve_s": None, "generate_s": round(completion.seconds, 4), "cached": cached, "error": completion.error,
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


def headline(summary: dict, header: dict | None = None) -> str:
    def f(key: str) -> str:
        v = metric(summary, key)
        return "–" if v is None else f"{v:.2f}"

    failed = "" if summary.get("outcome", "ok") == "ok" else \
        f"**FAILED: {(header or {}).get('answers failed', '?')} answers failed; not a baseline.** "
    return (f"{failed}keyword hit bare {f('bare.keyword_hit_rate')} → RAG {f('rag.keyword_hit_rate')} "
            f"(gain {f('gain.keyword_hit_rate')}; {f('rag.strict_keyword_hit_rate')} not crediting passage dumps, "
            f"{f('rag.passage_dump')} of RAG answers); hit@5 {f('rag.hit_at_5')}, MRR {f('rag.mrr')}; "
            f"abstention on negatives bare {f('bare.abstention')} / RAG {f('rag.abstention')}")


def write_outputs(run: RunDir, profile: Profile, header: dict, df: pd.DataFrame, summary: dict,
                  comparison: Comparison | None) -> None:
    """Results, the report, the history row, then summary.json (it marks the run finished) and latest.md. A
    write that fails (a full disk) leaves the run unfinished with every answer kept: ``--resume`` finishes it."""
    reports = profile.eval.reports_dir
    try:
        atomic_write(run.path / "results.csv", df.to_csv(index=False))
        atomic_write(run.path / "results.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict(orient="records")))
        history = history_with(reports, run, header, summary)
        write_report(run, header, df, summary, comparison, history)
        save_history(reports, history)
        write_summary(run, header, summary)
        point_latest(reports, run, headline(summary, header))
    except OSError as exc:
        raise _kept(run, f"could not write the run's outputs ({exc.strerror or exc}: {exc.filename})",
                    "free some space (or make the folder writable)") from None


def _kept(run: RunDir, what: str, fix: str) -> JobError:
    """A run stopped half-way: every answer so far is in its progress file, and ``--resume`` continues it."""
    return JobError(f"{what}: every answer so far is kept in {run.path}; {fix}, then run the eval again with "
                    f"`--resume {run.run_id}` to finish it without asking them again", exit_code=EXIT_STOPPED)


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


def evaluate(profile: Profile, *, questions: Path | None = None, resume: bool = False, resume_run: str | None = None,
             limit: int | None = None, baseline: str | None = None, use_cache: bool = True,
             thresholds: Sequence[Threshold] = (), ingest_first: bool = False,
             source: str | None = None) -> tuple[RunDir, pd.DataFrame, dict, Comparison | None]:
    """One run. ``ingest_first``: bring the store up to date first (``make eval``), with the same profile and
    embedder, once the inputs are checked; ``source`` overrides the corpus manifest's sources for it."""
    # Everything that can be wrong with the inputs is found before any model loads or any file is written.
    qs = load_questions(questions or profile.eval.questions, profile.eval.max_question_chars)
    for t in thresholds:
        t.check(qs)
    if limit is not None and limit < 1:
        raise JobError(f"--limit {limit}: must be at least 1")
    selected = list(qs.questions[:limit] if limit else qs.questions)
    info = run_info(profile, qs)
    reports = profile.eval.reports_dir
    load_history(reports)  # a damaged history is found (and rebuilt) now, not after the answers
    if baseline:
        named_baseline(reports, baseline)
    run = RunDir.resume(reports, profile.name, info, resume_run) if resume else None
    embedder = load_embedder(profile)
    if ingest_first:
        from jobs.ingest.job import ingest

        print(ingest(profile, source, embedder=embedder).line(), flush=True)
    retriever = StoreRetriever(profile, embedder)  # refuses a missing or mismatched store: before the LLM loads
    llm: ChatModel | None = None
    try:
        # All the run needs from the store besides retrieval, read now: after the answers nothing touches it.
        file_hashes = retriever.file_hashes()
        stale = stale_sources(selected, set(file_hashes))
        for qid, missing in stale.items():
            log.warning("question %s: expected source(s) not in the store: %s", qid, ", ".join(missing))
        llm = load_llm(profile)
        retriever.rewriter = load_rewriter(profile, llm)
        run = run or RunDir.create(reports, profile.name, info)
        cache = GenerationCache(profile.paths.cache / "generations", enabled=use_cache)
        # Failed answers of an interrupted run are asked again; the rest are kept.
        done = {key: rec for key, rec in run.done().items() if not rec.get("error")}
        kept = sum((q.id, m) in done for q in selected for m in MODES)
        counts = {"generated": 0, "cached": 0, "failed": 0}
        started = time.perf_counter()
        phrases = profile.eval.abstain_phrases
        step = llm.questions_per_step
        with tqdm(total=len(selected) * len(MODES), initial=kept, desc="answers", unit="answer") as bar:
            for i in range(0, len(selected), step):
                try:
                    if retriever.rewriter is not None:  # the step's rewrites in one batch, before its retrievals
                        retriever.rewriter.prepare([q.question for q in selected[i:i + step]
                                                    if (q.id, "rag") not in done])
                    jobs = [j for q in selected[i:i + step] for j in make_jobs(
                        q, {m for m in MODES if (q.id, m) not in done}, llm, retriever, profile)]
                except Exception as exc:
                    if not profile.store.url or isinstance(exc, JobError):
                        raise
                    # A server store that stops answering mid-run: the answers so far are kept.
                    raise _kept(run, f"lost the Chroma server at {redact(profile.store.url)} while retrieving "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                                "start the server again") from None

                def on_answer(k: int, completion: Completion, cached: bool, jobs: list[Job] = jobs) -> None:
                    rec = record(jobs[k], completion, cached, phrases)
                    rec["missing_sources"] = "|".join(stale.get(rec["id"], [])) if rec["mode"] == "rag" else ""
                    try:
                        run.append(rec)  # each answer is durable as soon as it exists
                    except OSError as exc:
                        raise _kept(run, f"could not record an answer ({exc.strerror or exc}: {run.path})",
                                    "free some space (or make the folder writable)") from None
                    done[(rec["id"], rec["mode"])] = rec
                    counts["failed" if completion.error else "cached" if cached else "generated"] += 1
                    bar.update(1)

                try:
                    answer(llm, cache, [j.prompt for j in jobs], on_answer, profile.llm.presence_penalty)
                except ServerLost as exc:
                    raise _kept(run, str(exc), "start the model server again") from None
        wall = time.perf_counter() - started
        df = copying.annotate(attribution.annotate(results_frame([done[(q.id, m)] for q in selected for m in MODES],
                                                                 [q.id for q in selected])))
        summary = summarise_run(df)
        summary["outcome"] = outcome(df, profile.eval.max_failed_share)[0]
        try:
            save_corpus_files(run.path, retriever.build_info.get("corpus_commit", ""), file_hashes)
        except OSError as exc:
            raise _kept(run, f"could not write the run's outputs ({exc.strerror or exc}: {exc.filename})",
                        "free some space (or make the folder writable)") from None
        header = {
            "run": run.run_id, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "profile": profile.name, **llm.identity(), "embedder": embedder.name,
            "embedder_device": f"{embedder.device} ({embedder.dtype_name})",
            "retrieval": f"{retriever.describe()} top-{profile.retrieval.top_k} (ranking depth "
                         f"{profile.retrieval.check_depth})",
            "corpus_commit": retriever.build_info.get("corpus_commit", ""),
            "store_generation": retriever.generation,
            "store": f"{stores.describe(profile)}: {retriever.build_info.get('chunks')} chunks of ≤"
                     f"{retriever.build_info.get('chunk_size')} tokens, built {retriever.build_info.get('built_at')}",
            "questions": f"{qs.path.name} ({len(selected)} questions, sha256 {qs.sha256[:12]})",
            "prompt_version": PROMPT_VERSION,
            "answers generated": counts["generated"],
            "answers from cache": counts["cached"],
            **({"answers kept from the interrupted run": kept} if resume else {}),
            "answers failed": int((df["error"].fillna("") != "").sum()),
            **({"cache entries regenerated (damaged or edited)": cache.rejected} if cache.rejected else {}),
            "wall_s": round(wall, 1),
            "questions_per_s": round(len(selected) / wall, 4) if wall > 0 else None,
        }
        base = find_baseline(reports, run, baseline)
        comparison = compare(header, df, run, base) if base else None
        write_outputs(run, profile, header, df, summary, comparison)
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
    p.add_argument("--no-cache", action="store_true", help="regenerate every answer (the cache is still refreshed)")
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

