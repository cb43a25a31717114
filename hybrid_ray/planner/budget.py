"""The planner's budget: anytime planning stops at a wall-clock deadline or a deterministic allowance.

Why two clocks: ``--time-limit`` is the user's wall-clock promise (the plan is ready by then, on
any host, however loaded), and a *deterministic* allowance, counted in simulated iterations (the
planner's unit of work beyond the packing), gives the same plan on any machine for the same
inputs: the simulator's and the benches' default. Each phase asks ``affords(cost)`` before a piece
of work, so the planner keeps the best plan found so far and returns it when either runs out.

``SIM_ITERATIONS_PER_S`` converts between the two: simulated iterations per second of one free
core here (the simulator's measured speed is 90k-230k iterations/s, ``bench perf``); a budget of
S seconds allows ``S * SIM_ITERATIONS_PER_S`` iterations.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

SIM_ITERATIONS_PER_S = 100_000.0
PLAN_SHARE = 0.02               # default: planning costs at most this share of the makespan it plans
# ``make_plan`` options of the CLI's default (no --time-limit): the budget scaled to the batch, no
# wall limit; the benches plan with them too, so their tables are what `simulate` gives
DEFAULT_PLAN_OPTS = {"time_limit_s": math.inf, "plan_share": PLAN_SHARE}


@dataclass
class PlanBudget:
    """What planning may still spend. ``wall_s``: seconds from ``t0`` (inf: none); ``iterations``:
    simulated iterations (inf: none). ``progress(phase, elapsed_s, left_s)`` hears each phase."""

    wall_s: float = math.inf
    iterations: float = math.inf
    progress: Callable[[str, float, float], None] | None = None
    t0: float = field(default_factory=time.perf_counter)
    spent_iterations: int = 0
    run_iterations: int = 0                                  # the longest simulated run so far
    sec_per_iteration: float = 1.0 / SIM_ITERATIONS_PER_S   # measured as simulations run
    phase: str = ""
    skipped: dict[str, int] = field(default_factory=dict)   # work left out for lack of budget: what -> times

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def wall_left(self) -> float:
        return self.wall_s - self.elapsed()

    def iterations_left(self) -> float:
        return self.iterations - self.spent_iterations

    def left_s(self) -> float:
        """The budget left in seconds (the tighter clock; inf when unbounded)."""
        return min(self.wall_left(), self.iterations_left() * self.sec_per_iteration)

    def affords(self, iterations: float) -> bool:
        """Whether a simulation of about ``iterations`` fits what is left on both clocks."""
        return (iterations <= self.iterations_left()
                and iterations * self.sec_per_iteration <= self.wall_left())

    def runs_affordable(self, iterations_per_run: float, cap: int) -> int:
        """How many simulations of ``iterations_per_run`` fit, at most ``cap``."""
        per = max(1.0, iterations_per_run)
        n = min(self.iterations_left() / per, self.wall_left() / (per * self.sec_per_iteration))
        return int(max(0, min(cap, n))) if math.isfinite(n) else cap

    def spend(self, iterations: int, wall_s: float) -> None:
        """Count a simulation's iterations and learn the host's speed from its wall time (the
        slowest seen recently: a loaded host is what the next simulation will meet)."""
        self.spent_iterations += int(iterations)
        if iterations > 0 and wall_s > 0:
            measured = wall_s / iterations
            self.sec_per_iteration = max(measured, 0.5 * self.sec_per_iteration + 0.5 * measured)

    def enter(self, phase: str) -> None:
        self.phase = phase
        if self.progress is not None:
            self.progress(phase, self.elapsed(), self.left_s())

    def skip(self, what: str) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1


def scaled_budget(makespan_s: float, share: float = PLAN_SHARE) -> float:
    """The default planning budget in seconds: ``share`` of the (estimated) makespan it plans."""
    return max(0.0, share * makespan_s)
