"""The orchestrator's exceptions: each carries a one-line message that names the key, step or file at fault.

Bad input is a *typed* error: `PipelineError` and its subclasses here, and the typed errors of the other packages
named in BAD_INPUT_TYPES (by module and class name, so the engine imports none of them), plus an OSError that says
the disk is full or read-only. `pipeline.py` prints those as one line and exits with status 2; `Interrupted` exits
with 130 after saying how to continue; anything else is a bug: exit 1 with the traceback.
"""
from __future__ import annotations

import errno

# (module, class) of the typed bad-input errors of roidb, nets and kernels (the engine may not import them).
BAD_INPUT_TYPES: set[tuple[str, str]] = {
    ("roidb.errors", "DataError"),
    ("nets.checkpoint", "CheckpointError"),
    ("nets.backbones", "WeightsError"),
}
# An OSError with one of these is the environment's answer to a write, not a bug: one line, exit 2.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_bad_input(err: BaseException) -> bool:
    """Whether `err` is bad input or a hostile environment (one line, exit 2) rather than a bug (traceback)."""
    if isinstance(err, PipelineError):
        return True
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return True
    return any((cls.__module__, cls.__name__) in BAD_INPUT_TYPES for cls in type(err).__mro__)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(w if len(w) <= 300 else f"{w[:280]}...({len(w)} chars)" for w in str(text).split())


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


class DataInputError(PipelineError):
    """A data input (the training or test imdb) cannot be read or digested."""
