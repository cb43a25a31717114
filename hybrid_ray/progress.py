"""Live progress lines on stderr: a run's (``Progress``) and a long step's (``PhaseLine``)."""
from __future__ import annotations

import sys
import time


class _LiveLine:
    """One status line: rewritten in place on a TTY, a plain line per update elsewhere."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def _write(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


class Progress(_LiveLine):
    """The run's status line: carriage-return updates on a TTY (<= 4/s), plain lines (1/2 s) otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        super().__init__(enabled, stream)
        self.total = total
        self.period = 0.25 if self.tty else 2.0
        self._last = 0.0

    def update(self, done: int, tokens: int, model_elapsed: float, wall: float, queues: list[str],
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        rate = tokens / model_elapsed if model_elapsed > 0 else 0.0
        self._write(f"run: {done}/{self.total} done ({100 * done / max(self.total, 1):.1f} %) | "
                    f"{rate:,.0f} tok/s modelled | t {model_elapsed:.1f} s modelled, {wall:.1f} s wall | "
                    f"queues {' '.join(queues)}")


class PhaseLine(_LiveLine):
    """The live line of a long step (planning, a bench): its phase, the elapsed time and the budget
    left (where there is one). Quiet for the first ``quiet_s`` seconds (a short step prints
    nothing), then on a TTY one line rewritten in place, elsewhere a line per phase. Call it as
    ``line(phase, elapsed_s, left_s)`` (``planner.budget.PlanBudget``'s progress hook) or
    ``line(phase)`` (its own clock, no budget: a bench's steps); ``close()`` ends the line."""

    def __init__(self, what: str, enabled: bool = True, stream=None, quiet_s: float = 2.0):
        super().__init__(enabled, stream)
        self.what = what
        self.quiet_s = quiet_s
        self._t0 = time.monotonic()

    def __call__(self, phase: str, elapsed_s: float | None = None, left_s: float = float("inf")) -> None:
        elapsed = time.monotonic() - self._t0 if elapsed_s is None else elapsed_s
        if not self.enabled or elapsed < self.quiet_s:
            return
        line = f"{self.what}: {phase} | {elapsed:.1f} s elapsed"
        if left_s != float("inf"):
            line += f" | budget {max(0.0, left_s):.1f} s left"
        self._write(line)
