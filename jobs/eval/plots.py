"""Plots for the report (matplotlib, headless): PNG files next to report.md."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: nightly jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from jobs.eval.scoring.summary import OVERALL  # noqa: E402
from jobs.retrieval.scores import hit_at  # noqa: E402

BARE, RAG = "#9e9e9e", "#1f77b4"


def _save(fig: plt.Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial image behind
        raise
    finally:
        plt.close(fig)
    return path


def _errors(values: list[float], intervals: list[list[float] | None]) -> list[list[float]]:
    """matplotlib's yerr (distances below and above) from intervals; 0 where there is none."""
    below = [v - ci[0] if ci else 0.0 for v, ci in zip(values, intervals)]
    above = [ci[1] - v if ci else 0.0 for v, ci in zip(values, intervals)]
    return [below, above]


def category_bars(summary: dict, path: Path) -> Path:
    """Bare vs RAG keyword hit rate per category (negatives: abstention rate), with 95% intervals."""
    names = sorted(summary["by_category"]) + [OVERALL]
    intervals = summary.get("intervals", {})
    bare, rag, labels, bare_ci, rag_ci = [], [], [], [], []
    for name in names:
        group = summary[OVERALL] if name == OVERALL else summary["by_category"][name]
        key = "abstention" if name == "negative" else "keyword_hit_rate"
        bare.append(group.get("bare", {}).get(key) or 0.0)
        rag.append(group.get("rag", {}).get(key) or 0.0)
        bare_ci.append(intervals.get(name, {}).get("bare", {}).get(key))
        rag_ci.append(intervals.get(name, {}).get("rag", {}).get(key))
        labels.append(f"{name}\n(abstention)" if name == "negative" else name)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], bare, width=0.4, label="bare", color=BARE,
           yerr=_errors(bare, bare_ci), capsize=3, error_kw={"elinewidth": 0.8})
    ax.bar([i + 0.2 for i in x], rag, width=0.4, label="RAG", color=RAG,
           yerr=_errors(rag, rag_ci), capsize=3, error_kw={"elinewidth": 0.8})
    for i, (b, r) in enumerate(zip(bare, rag)):
        ax.text(i - 0.2, b + 0.02, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(i + 0.2, r + 0.02, f"{r:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("keyword hit rate")
    ax.set_title("Bare vs RAG by category (bars: 95% interval over questions)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def trend(history: pd.DataFrame, path: Path) -> Path:
    """Headline metrics across runs; a single run still draws as labelled points."""
    series = [("rag_keyword_hit", "RAG keyword hit", RAG, "-"),
              ("rag_strict_keyword_hit", "RAG keyword hit, dumps not credited", RAG, ":"),
              ("bare_keyword_hit", "bare keyword hit", BARE, "-"),
              ("rag_hit_at_5", "RAG hit@5", "#2ca02c", "--"), ("rag_mrr", "RAG MRR", "#ff7f0e", "--")]
    if "outcome" in history:  # a night whose answers failed measured the failure, not the model
        history = history[history["outcome"].fillna("ok").astype(str) == "ok"]
    runs = history["run"].astype(str).tolist()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 4), 3.6))
    x = list(range(len(runs)))
    for col, label, color, style in series:
        if col in history:
            ax.plot(x, pd.to_numeric(history[col], errors="coerce"), style, marker="o", color=color, label=label)
    ax.set_xticks(x, [r[:15] for r in runs], rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.5, max(len(runs), 1) - 0.5)
    if not runs:
        ax.text(0, 0.5, "no run whose answers succeeded yet", ha="center", fontsize=9)
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(f"Headline metrics over {len(runs)} run(s)")
    # Outside the axes: equal series overlap, and a legend inside would hide the points near 0.
    if runs:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def recall_curve(df: pd.DataFrame, path: Path, max_k: int = 10) -> Path:
    """File-level hit@k for k = 1..max_k over the questions with expected sources."""
    rag = df[(df["mode"] == "rag") & (df["expected_sources"].astype(str) != "")]
    ks = list(range(1, max_k + 1))
    values = []
    for k in ks:
        hits = [hit_at(json.loads(r["ranked_files"]), str(r["expected_sources"]).split("|"), k)
                for _, r in rag.iterrows()]
        values.append(sum(hits) / len(hits) if hits else 0.0)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(ks, values, marker="o", color=RAG)
    for k, v in zip(ks, values):
        ax.annotate(f"{v:.2f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("k (files)")
    ax.set_ylabel("hit@k")
    ax.set_title(f"Retrieval recall, {len(rag)} questions")
    ax.grid(alpha=0.3)
    return _save(fig, path)
