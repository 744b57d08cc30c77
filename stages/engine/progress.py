"""A one-line progress bar (count, named values such as loss, it/s, ETA), drawn only when the stream is a TTY."""
from __future__ import annotations

import sys
import time
from typing import IO, Any


def format_seconds(seconds: float) -> str:
    """'1h02m', '3m05s' or '42s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressBar:
    """`bar = ProgressBar(total, "stage1"); bar.update(k, loss=0.3); bar.close()`.

    `start` is where a resumed count begins, so it/s and ETA only count this run's work. Redraws at most
    every `min_interval` seconds. Silent unless `enabled` (default: the stream is a TTY).
    """

    def __init__(self, total: int, label: str, start: int = 0, stream: IO[str] | None = None,
                 enabled: bool | None = None, width: int = 24, min_interval: float = 0.2):
        self.total, self.label, self.start = total, label, start
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width, self.min_interval = width, min_interval
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.count = start
        self.drawn = False

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return (self.count - self.start) / elapsed if elapsed > 0 else 0.0

    def render(self, values: dict[str, Any]) -> str:
        frac = self.count / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        rate = self.rate()
        eta = format_seconds((self.total - self.count) / rate) if rate > 0 else "?"
        shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} "
                f"{shown} {rate:.2f} it/s ETA {eta}").replace("  ", " ")

    def update(self, count: int, **values: Any) -> None:
        self.count = count
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < self.min_interval and count < self.total):
            return
        self.last_draw = now
        self.stream.write("\r" + self.render(values) + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = False
