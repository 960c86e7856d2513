"""Job start-up shared by every job: logging, environment, CPU threads; and the CLI error boundary."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from jobs.common import threads
from jobs.common.errors import JobError
from jobs.common.urls import redact_text

EXIT_USAGE = 2


def setup(verbose: bool = False) -> None:
    # Libraries log heavily at INFO (httpx, chromadb, sentence-transformers); keep them at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "openai", "chromadb", "sentence_transformers", "urllib3", "filelock",
                  "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _redact_records()
    # Chroma must never phone home from a nightly job.
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads.configure()


def _redact_records() -> None:
    """Every log record, ours and the libraries' (an HTTP client logs the URLs it calls), with the credentials of
    any URL in it replaced (jobs.urls): a URL may carry ``user:password@``, and logs end up in mail and CI."""
    base = logging.getLogRecordFactory()
    if getattr(base, "redacts", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return record
        if "://" in message:
            clean = redact_text(message)
            if clean != message:
                record.msg, record.args = clean, None
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a job's main; a JobError becomes `error: ...` on stderr and exit code 2."""
    try:
        code = main(argv)
    except JobError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
