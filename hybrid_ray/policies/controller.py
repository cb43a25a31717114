"""Online controller: move not-yet-started work from the replica predicted to finish last to the
one predicted to finish first, as load reports drift from the plan.

Pure logic on LoadReports: the simulator calls it on a virtual-time interval, the Ray
ControllerActor on the reports the replica actors stream.
"""
from __future__ import annotations

from ..replica import LoadReport
from .base import Move


class RebalanceController:
    """Greedy pairwise rebalancing with a dead band.

    Every ``interval_s``, within each replica group, it compares the latest and earliest
    predicted finish times; if they differ by more than ``max(threshold_s, rel_threshold *
    remaining)``, it moves enough queued requests (taken from the back of the queue: the
    smallest, by the sort order) to close half the gap. Half, because both ends move: the source
    loses the work the destination gains. Only within a group: there a request costs the same
    on both ends; across groups (different models or hardware) it does not, and the offline
    plan has already balanced the groups against each other with their own costs.

    With ``keep_plan_profile`` (a length-banded plan, planner/banded.py) it acts on *drift from
    the plan*, not on the load model's raw imbalance: such a plan chose each replica's load with a
    finer model than a load report's work-plus-tail estimate, so the differences the first reports
    show are the plan's intent. They are recorded as a per-replica bias, which shrinks with the
    replica's remaining work, and subtracted from every later prediction. A work-balanced plan
    uses the load reports' own model, so there the raw imbalance is the drift.
    """

    def __init__(self, interval_s: float = 1.0, threshold_s: float = 0.5, rel_threshold: float = 0.01,
                 max_moves: int = 4, keep_plan_profile: bool = False):
        self.interval_s = interval_s
        self.threshold_s = threshold_s
        self.rel_threshold = rel_threshold
        self.max_moves = max_moves
        self.calls = 0
        self.keep_plan_profile = keep_plan_profile
        self.bias: dict[int, tuple[float, float]] = {}   # replica -> (bias, remaining when recorded)

    def rebalance(self, loads: list[LoadReport], now: float) -> list[Move]:
        self.calls += 1
        if self.keep_plan_profile:
            self._record_bias(loads, now)
        groups: dict[str, list[LoadReport]] = {}
        for r in loads:
            groups.setdefault(r.group, []).append(r)
        moves: list[Move] = []
        for members in groups.values():
            moves.extend(self._rebalance_group(members, now))
        return moves

    def _record_bias(self, loads: list[LoadReport], now: float) -> None:
        """At the first report of each group: each replica's predicted finish over its group's earliest."""
        groups: dict[str, list[LoadReport]] = {}
        for r in loads:
            if r.index not in self.bias:
                groups.setdefault(r.group, []).append(r)
        for members in groups.values():
            low = min(r.predicted_finish_s for r in members)
            for r in members:
                self.bias[r.index] = (r.predicted_finish_s - low, max(r.predicted_finish_s - now, 1e-12))

    def _planned_offset(self, r: LoadReport, now: float) -> float:
        bias, remaining0 = self.bias.get(r.index, (0.0, 1.0))
        if bias <= 0.0:
            return 0.0
        left = max(r.predicted_finish_s - now, 0.0)
        return bias * min(1.0, left / remaining0)

    def _rebalance_group(self, loads: list[LoadReport], now: float) -> list[Move]:
        if len(loads) < 2:
            return []
        pending = {r.index: r.predicted_finish_s - self._planned_offset(r, now) for r in loads}
        movable = {r.index: r.movable for r in loads}
        per_item = {r.index: (r.queued_work_s / r.waiting if r.waiting else 0.0) for r in loads}
        moves: list[Move] = []
        for _ in range(self.max_moves):
            hi = max(pending, key=lambda i: (pending[i], -i))
            lo = min(pending, key=lambda i: (pending[i], i))
            gap = pending[hi] - pending[lo]
            if gap <= max(self.threshold_s, self.rel_threshold * (pending[hi] - now)):
                break
            if movable[hi] == 0 or per_item[hi] <= 0:
                break
            count = min(movable[hi], int(gap / 2 / per_item[hi]))
            if count <= 0:
                break
            moved = count * per_item[hi]
            moves.append(Move(hi, lo, count))
            pending[hi] -= moved
            pending[lo] += moved
            movable[hi] -= count
        return moves
