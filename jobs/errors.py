"""The one exception a job turns into a one-line error and a non-zero exit."""


class JobError(Exception):
    """A problem the user can fix (bad input, missing model, locked store): printed without a traceback.
    Exit code 2 unless said otherwise (4: a run stopped half-way that ``--resume`` continues)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
