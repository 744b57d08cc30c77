"""The orchestrator's exceptions: each carries a one-line message that names the key, step or file at fault.

`pipeline.py` prints `PipelineError` (and the ValueError/KeyError/OSError raised by bad input elsewhere) as one
line and exits with status 2; `Interrupted` exits with 130 after saying how to continue.
"""
from __future__ import annotations


class PipelineError(Exception):
    """Base of the orchestrator's errors; str(e) is the one-line message shown to the user."""


class ConfigError(PipelineError, ValueError):
    """An unknown config key, a value of the wrong type, or an unreadable config file."""


class StepSelectionError(PipelineError, ValueError):
    """A bad --until/--from/--only/--force combination, or a selected step whose inputs are not done."""


class LockError(PipelineError):
    """Another live run holds the experiment's lock."""


class MissingStepBodyError(PipelineError):
    """A selected step has no registered body (see `stages.register_step`)."""


class StepFailedError(PipelineError):
    """A step's body raised, reported a missing output, or its isolated child process died."""


class NonFiniteLossError(PipelineError, FloatingPointError):
    """A training loss became NaN or inf; names the iteration and the last good snapshot."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class SnapshotMismatchError(PipelineError):
    """A snapshot cannot resume this run (it was written by a different number of torchrun processes)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised in the main thread so `finally` blocks release the lock.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (the kernel build's
    fallback, a snapshot probe) swallows it and lets the run go on.
    """

    def __init__(self, signum: int, message: str = ""):
        import signal
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {self.signame}")
