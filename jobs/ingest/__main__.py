"""`python -m jobs.ingest`: the ingest job's command line (jobs.ingest.job)."""

from jobs.common.log import run_cli
from jobs.ingest.job import build_parser, main, profile_from_args  # noqa: F401 - the command line's parser, for tools

if __name__ == "__main__":
    run_cli(main)
