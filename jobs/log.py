"""Job start-up shared by every job: logging, environment, CPU threads; and the CLI error boundary."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from jobs import threads
from jobs.errors import JobError

EXIT_USAGE = 2


def setup(verbose: bool = False) -> None:
    # Libraries log heavily at INFO (httpx, chromadb, sentence-transformers); keep them at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "chromadb", "sentence_transformers", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Chroma must never phone home from a nightly job.
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads.configure()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a job's main; a JobError becomes `error: ...` on stderr and exit code 2."""
    try:
        code = main(argv)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
