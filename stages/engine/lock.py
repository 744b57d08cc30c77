"""The experiment lock (output/<exp>/.lock holding pid, host and start time) and SIGINT/SIGTERM handling.

One `run` (or `clean`) at a time may hold an experiment folder. A lock left by a dead process on this host is
taken over with a message; a live one makes the second run fail with the first one's pid. `status` never locks.
`interrupt_guard` turns SIGINT/SIGTERM into `Interrupted` so `finally` blocks release the lock;
`defer_interrupts` holds a signal back until a snapshot or manifest write has finished.

The handler raises wherever the main thread happens to be, and some library code swallows that exception: a
Cython extension's module init registers its types with `abc` inside a bare `except:` (numpy.random, lxml), so a
signal that lands during such an import is lost. The guard therefore also remembers the signal, and the loops
(each training iteration, each proposal or detection image, each step) call `raise_if_interrupted()`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import Interrupted, LockError
from .paths import contained

LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_identity(pid: int) -> str | None:
    """'<boot id>:<start time>' of a process on Linux (tells a reused pid or a rebooted node apart), else None."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def read_lock(exp_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock's {pid, host, started} or None when there is no lock; {} when it is unreadable."""
    try:
        text = (Path(exp_dir) / LOCK_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def lock_holder_alive(info: dict[str, Any] | None) -> bool:
    """Whether a lock's owner still runs (an owner on another host is assumed alive)."""
    if not info or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return True
    if not pid_alive(info["pid"]):
        return False
    recorded = info.get("identity")
    return recorded is None or process_identity(info["pid"]) in (None, recorded)


class RunLock:
    """`with RunLock(exp_dir, echo=print):` holds output/<exp>/.lock for the duration of a run."""

    def __init__(self, exp_dir: str | os.PathLike[str], echo: Callable[[str], None] = print):
        self.exp_dir = Path(exp_dir)
        self.path = self.exp_dir / LOCK_NAME
        self.echo = echo
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "identity": process_identity(os.getpid())}
        self.held = False

    def acquire(self) -> None:
        contained(self.exp_dir).mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return
            holder = read_lock(self.exp_dir)
            if holder is None:
                continue
            if lock_holder_alive(holder):
                hint = "wait for it to finish"
                if holder.get("host") != socket.gethostname():
                    hint = (f"this host ({socket.gethostname()}) cannot tell whether a process on another host is "
                            f"still alive: wait for it to finish, or, if that run is gone, remove {self.path} by "
                            "hand and run again")
                raise LockError(f"{self.exp_dir} is in use by another run (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, started {holder.get('started')}); {hint}")
            self._take_over(holder)
        raise LockError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")

    def _try_create(self) -> bool:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=self.exp_dir)
        except OSError as err:  # a full or read-only disk: say which file
            raise OSError(err.errno, f"{err.strerror} while writing", str(self.path)) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.info, handle)
            os.link(tmp, self.path)  # atomic: fails if a lock exists, and the lock is never seen empty
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror} while writing", str(self.path)) from None
        finally:
            os.unlink(tmp)

    def _take_over(self, holder: dict[str, Any]) -> None:
        if read_lock(self.exp_dir) != holder:
            return
        what = f"pid {holder['pid']} is gone" if holder.get("pid") else "it is unreadable"
        if holder.get("pid") and pid_alive(holder["pid"]):
            what = f"pid {holder['pid']} is now another process"
        self.echo(f"taking over the stale lock {self.path} ({what})")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def release(self) -> None:
        if self.held and read_lock(self.exp_dir) == self.info:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_state = threading.local()
_received: list[int] = []  # signals caught under the current interrupt_guard (main thread only)


def _handler(signum: int, frame: object) -> None:
    _received.append(signum)
    if getattr(_state, "deferring", 0):
        return
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise `Interrupted` when a signal arrived under `interrupt_guard` (outside a `defer_interrupts` block),
    even if the exception the handler raised was swallowed on the way. A no-op outside the guard."""
    if _received and not getattr(_state, "deferring", 0):
        raise Interrupted(_received[0])


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    outer = list(_received)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received[:] = outer


@contextlib.contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (under `interrupt_guard`) until the block ends, then raise `Interrupted`."""
    _state.deferring = getattr(_state, "deferring", 0) + 1
    try:
        yield
    finally:
        _state.deferring -= 1
    raise_if_interrupted()
