"""A progress line for long work (pulling, extracting, loading), written to stderr.

On a terminal it redraws one line at most ten times a second; elsewhere (logs, CI) it prints a line
every 10% so the log shows progress without flooding.
"""
from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, label: str, total: int | None, *, quiet: bool = False, stream=None):
        self.label = label
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, n: int) -> None:
        self.n += n
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + self._line(now) + "\x1b[K")
                self.stream.flush()
        elif self.total:
            decile = int(10 * self.n / self.total)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def _line(self, now: float) -> str:
        dt = max(now - self.start, 1e-9)
        rate = self.n / dt
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (self.total - self.n) / rate if rate > 0 else 0
            return (f"{self.label} [{bar:<30}] {100 * frac:5.1f}% {human_bytes(self.n)}/{human_bytes(self.total)}"
                    f" {human_bytes(rate)}/s eta {eta:.0f}s")
        return f"{self.label} {human_bytes(self.n)} {human_bytes(rate)}/s"

    def done(self) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self._line(now) + "\x1b[K\n")
        elif self._last_decile < 10:
            self.stream.write(self._line(now) + "\n")
        self.stream.flush()
