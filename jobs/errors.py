"""The one exception a job turns into a one-line error and a non-zero exit."""


class JobError(Exception):
    """A problem the user can fix (bad input, missing model, locked store): printed without a traceback."""
