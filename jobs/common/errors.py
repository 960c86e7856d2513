"""The one exception a job turns into a one-line error and a non-zero exit."""

# A run stopped half-way (a server it needs went away, a disk filled): nothing half-done is published; run it
# again (the eval keeps every answer so far and continues with --resume, an ingest starts over from the live
# generation).
EXIT_STOPPED = 4


class JobError(Exception):
    """A problem the user can fix (bad input, missing model, locked store): printed without a traceback.
    Exit code 2 unless said otherwise (4: a run stopped half-way that ``--resume`` continues)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
