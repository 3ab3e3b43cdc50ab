"""The exception family: every error a user can fix is a CkmergeError with a one-line message."""


class CkmergeError(Exception):
    """Base of every error ckmerge-ray raises for bad input or a failed run."""


class CheckpointError(CkmergeError):
    """A checkpoint directory is missing, unreadable, unsafe or does not match its pair."""


class ConfigError(CkmergeError, ValueError):
    """An argument is out of range or inconsistent (e.g. alpha outside [0, 1))."""


class ObjectiveError(CkmergeError):
    """The objective's data or settings are unusable (missing file, unknown field, ...)."""


class RunError(CkmergeError):
    """The tuning run itself failed (every trial failed, output directory in use, ...)."""


class RunInterrupted(CkmergeError):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run; its state is saved and it can be resumed.
    `signum` is the signal; the CLI exits with 128 + signum (130, 143)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class OutputError(CkmergeError):
    """A file of the run could not be written (disk full, quota, read-only): what was written
    before stays intact; free space and resume the run."""


def last_line(e: BaseException) -> str:
    """The last line of an error's message: for a Ray task error, which carries the worker's
    whole traceback, the error itself."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
