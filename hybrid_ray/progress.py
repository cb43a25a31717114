"""The live progress line of ``hybrid-ray run`` (stderr)."""
from __future__ import annotations

import sys
import time


class Progress:
    """One status line on stderr: carriage-return updates on a TTY (<= 4/s), plain lines (1/2 s) otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.period = 0.25 if self.tty else 2.0
        self._last = 0.0
        self._width = 0

    def update(self, done: int, tokens: int, model_elapsed: float, wall: float, queues: list[str],
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        rate = tokens / model_elapsed if model_elapsed > 0 else 0.0
        line = (f"run: {done}/{self.total} done ({100 * done / max(self.total, 1):.1f} %) | "
                f"{rate:,.0f} tok/s modelled | t {model_elapsed:.1f} s modelled, {wall:.1f} s wall | "
                f"queues {' '.join(queues)}")
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
