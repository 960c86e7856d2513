"""`make bench` end to end on the mini corpus: every table is produced from real runs (MiniLM embedder,
tiny random Llama), so the script users rerun cannot rot. Timings are printed, never asserted."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.tools.bench import main
from tests.conftest import MINI_QUESTIONS, write_manifest, write_profile


def test_bench_writes_every_table(tmp_path: Path, corpus_dir: Path, minilm_path: str, tiny_llm: Path, capsys):
    manifest = write_manifest(tmp_path / "mini.toml", ref="main", sources=[("folder", str(corpus_dir))])
    profile = write_profile(tmp_path / "profile.toml", embedder=minilm_path, corpus=manifest,
                            store=tmp_path / "stores" / "mini", cache=tmp_path / "cache",
                            extra=f'\n[llm]\nmodel = "{tiny_llm}"\ndevice = "cpu"\nbatch_size = 4\n')
    out = tmp_path / "bench"
    assert main(["--profile", str(profile), "--corpus-dir", str(corpus_dir), "--questions", str(MINI_QUESTIONS),
                 "--out", str(out), "--max-new-tokens", "6", "--batch-sizes", "2,4", "--concurrency", "1,2",
                 "--bm25-scales", "1,3", "--cost-questions", str(MINI_QUESTIONS)]) == 0
    (written,) = out.glob("bench-*.md")
    text = written.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    for row in ("full ingest", "unchanged re-ingest", "one file changed", "full ingest, bfloat16 embedder",
                "seed way (SimpleDirectoryReader", "seed way at our chunk budget", "sequential (HuggingFaceLLM",
                "batched (batch 2,", "batched (batch 4,", "ours, hybrid, bfloat16 embedder"):
        assert row in text, row
    # The unchanged re-ingest embeds nothing and one changed file re-embeds only its own chunks.
    embedded = {name.strip(): int(n) for name, n in
                re.findall(r"^\| ([a-z -]+?)\s+\| [\d.]+\s+\| [\d.]+\s+\| (\d+)\s+\|", text, re.M)}
    assert embedded["unchanged re-ingest"] == 0
    assert 0 < embedded["one file changed"] < embedded["full ingest"]
    n_prompts = 2 * sum(1 for _ in MINI_QUESTIONS.read_text(encoding="utf-8").splitlines()[1:] if _.strip())
    in_process = text.split("## Eval generation")[1].split("## Served")[0]
    assert in_process.count(f"{n_prompts} of {n_prompts}") == 2  # batched answers identical to sequential ones
    assert re.search(r"at most \d+\.\d\dx sequential", text) and re.search(r"\d+% of the bound", text)
    # The served rows: llama.cpp's server with 1 and 2 slots, every prompt answered, its own rates read back.
    for slots in (1, 2):
        row = next(line for line in text.splitlines() if f"served, llama.cpp, {slots} slot(s)" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and re.fullmatch(r"\d+ of \d+", cells[6])
        assert float(cells[7]) > 0 and cells[8].endswith("per request")
    # Where one slot's time goes, split from the server's own timings, and the ceiling that follows.
    floor = re.search(r"reading prompts ([\d.]+) s .* decoding ([\d.]+) s.* caps the server at ([\d.]+)x", text)
    assert floor and float(floor[1]) > 0 and float(floor[3]) > 0
    # The server store: the same three ingests (the unchanged one embeds nothing there either), latency per
    # mode, and the BM25 rebuild at 1x and 3x the corpus.
    server = text.split("## The store on a Chroma server")[1].split("## Retrieval (file-level")[0]
    unchanged = next(line for line in server.splitlines() if line.startswith("| unchanged re-ingest"))
    assert "embedded=0" in unchanged
    for mode in ("dense", "bm25", "hybrid"):
        assert f"| {mode} " in server
    docs = [int(m.replace(",", "")) for m in re.findall(r"^\| [13]x\s+\| ([\d,]+)", server, re.M)]
    assert len(docs) == 2 and docs[1] == 3 * docs[0] > 0
    # What a night costs: the first run generates every answer, an unchanged night none, a docs update (the
    # most cited pages changed) re-embeds those pages and regenerates only some RAG answers.
    cost = text.split("## What a night costs")[1].split("##")[0]
    rows = [line for line in cost.splitlines() if line.startswith("| ") and "---" not in line]
    nights = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows)}
    first, same = nights["first run"], nights["unchanged night"]
    update = next(v for k, v in nights.items() if k.startswith("docs update"))
    assert int(first[4]) == n_prompts and int(first[5]) == 0
    assert int(same[4]) == 0 and int(same[5]) == n_prompts and int(same[7]) == 0
    assert 0 < int(update[7]) and int(update[4]) < n_prompts and int(update[4]) + int(update[5]) == n_prompts
