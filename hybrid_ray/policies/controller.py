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
    """

    def __init__(self, interval_s: float = 1.0, threshold_s: float = 0.5, rel_threshold: float = 0.01,
                 max_moves: int = 4):
        self.interval_s = interval_s
        self.threshold_s = threshold_s
        self.rel_threshold = rel_threshold
        self.max_moves = max_moves
        self.calls = 0

    def rebalance(self, loads: list[LoadReport], now: float) -> list[Move]:
        self.calls += 1
        groups: dict[str, list[LoadReport]] = {}
        for r in loads:
            groups.setdefault(r.group, []).append(r)
        moves: list[Move] = []
        for members in groups.values():
            moves.extend(self._rebalance_group(members, now))
        return moves

    def _rebalance_group(self, loads: list[LoadReport], now: float) -> list[Move]:
        if len(loads) < 2:
            return []
        pending = {r.index: r.predicted_finish_s for r in loads}
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
