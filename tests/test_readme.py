"""Every command the README shows works as written.

Each `make` and `python -m jobs.…` command in the README's code blocks (the cron line included) is expanded
by make itself (``make -n``) into the job command lines it would run, and each job parses its arguments with
its own parser and loads its profile with the settings given: an option handed to a job that does not take
it fails here, not at 2 a.m. The nightly commands also run for real, through make, with the offline test
models standing in for the production profile (InternLM2's weights cannot exist here)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.common.config import ROOT, load_profile
from tests.conftest import eval_profile

README = ROOT / "README.md"
# Fenced blocks of shell commands (bash, sh, cron); each line is one command, comments allowed.
BLOCKS = re.compile(r"```(?:bash|sh|cron)\n(.*?)```", re.DOTALL)
PLACEHOLDER = re.compile(r"<[^<>]+>")
SHA = "0123456789abcdef0123456789abcdef01234567"
VENV = Path(sys.executable).parent.parent


def readme_commands(text: str) -> list[list[str]]:
    """Every `make …` and `python -m jobs.…` command in the README's shell blocks, as argv, placeholders such as
    `<sha>` filled in. Shell operators (`&&`, `>>`, `||`, `|`) end a command: the cron line gives its make call."""
    out = []
    for block in BLOCKS.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(PLACEHOLDER.sub(SHA, line), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
            for i, tok in enumerate(tokens):
                if tok == "make" or (tok == "python" and tokens[i + 1:i + 2] == ["-m"]):
                    end = next((j for j in range(i + 1, len(tokens)) if set(tokens[j]) <= set("&|;><")), len(tokens))
                    out.append(tokens[i:end])
    return out


def make_expands(argv: list[str]) -> list[list[str]]:
    """The job command lines `make` would run for ``argv`` (dry run; the install step is taken as done)."""
    dry = subprocess.run([*argv[:1], "-n", "-o", f"{VENV}/.installed", f"VENV={VENV}", *argv[1:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, f"{shlex.join(argv)}: {dry.stderr}"
    return [shlex.split(line) for line in dry.stdout.splitlines() if " -m jobs." in line]


def job_argv(command: list[str]) -> tuple[str, list[str]]:
    i = command.index("-m")
    return command[i + 1], command[i + 2:]


def test_the_readme_shows_the_nightly_commands():
    commands = [shlex.join(c) for c in readme_commands(README.read_text(encoding="utf-8"))]
    assert f"make eval PROFILE=internlm2 'ARGS=--set llm.revision={SHA} --fail-under rag.keyword_hit_rate=0.5'" \
        in commands  # the production command, and the cron line's
    assert len(commands) >= 10


def test_every_readme_command_hands_each_job_only_options_it_takes():
    checked = []
    for command in readme_commands(README.read_text(encoding="utf-8")):
        if command[0] == "make":
            expanded = make_expands(command)  # a target make does not know fails here
        else:
            expanded = [command]
        for line in expanded:
            module, argv = job_argv(line)
            if any("[" in a for a in argv):
                continue  # a usage synopsis (`[--questions CSV]`), not a command
            job = importlib.import_module(module)
            if hasattr(job, "__path__"):  # a package run with -m: its __main__ module
                job = importlib.import_module(f"{module}.__main__")
            try:
                args = job.build_parser().parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README: `{shlex.join(command)}` runs `{module}` with options it refuses (exit {exc})")
            if hasattr(job, "profile_from_args"):
                job.profile_from_args(args)  # every --set names a real setting with a valid value
            elif getattr(args, "profile", None):
                load_profile(args.profile)
            checked.append(f"{module} {shlex.join(argv)}")
    assert any(c.startswith("jobs.eval --profile internlm2 --ingest --set llm.revision=") for c in checked)
    assert any(c.startswith("jobs.ingest ") for c in checked)


@pytest.fixture
def stand_in(tmp_path, corpus_dir, minilm_path, tiny_llm) -> Path:
    """The production profile as these machines can run it: the same job, the offline test models."""
    return eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm)


def _make(argv: list[str], profile: Path) -> subprocess.CompletedProcess:
    argv = [a if not a.startswith("PROFILE=") else f"PROFILE={profile}" for a in argv]
    return subprocess.run([*argv[:1], "-o", f"{VENV}/.installed", f"VENV={VENV}", *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_the_readme_nightly_command_runs_as_written(stand_in):
    command = next(c for c in readme_commands(README.read_text(encoding="utf-8"))
                   if c[:2] == ["make", "eval"] and any("--fail-under" in a for a in c))
    done = _make(command, stand_in)
    out = done.stdout + done.stderr
    assert "unrecognized arguments" not in out and "Traceback" not in out, out[-3000:]
    assert "report: " in done.stdout and "answers: 8, none failed" in done.stdout, out[-3000:]
    # The random stand-in model misses the threshold: that is the threshold working (the job's exit 3; make
    # reports any failed step as its own exit 2).
    assert "FAIL: rag.keyword_hit_rate" in done.stderr and done.returncode == 2, out[-3000:]


def test_an_eval_only_option_reaches_only_the_eval(stand_in):
    done = _make(["make", "eval", "PROFILE=offline", "ARGS=--limit 3"], stand_in)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "answers: 6, none failed" in done.stdout
    assert re.search(r"files=\d+ skipped=\d+ added=\d+", done.stdout)  # the ingest ran first, in the same process
