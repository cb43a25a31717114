"""Protocols shared by every policy, and the Scheduler bundle the simulator and actors consume.

Policies are pure: they read replica state (and a plan) and return decisions; no Ray, no clocks,
no I/O. The simulator and the Ray actors call the very same objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..replica import Iteration, LoadReport, ReplicaState, Sequence
from ..workload import Request


class IterationPolicy(Protocol):
    """Chooses a replica's next iteration (or None when it has nothing to do)."""

    def schedule(self, replica: ReplicaState) -> Iteration | None: ...


class Router(Protocol):
    """Chooses a replica index for each newly arrived sequence (a batch arriving together).

    It sees the replicas only through their latest load reports, as a Ray driver would.
    """

    def route(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Move:
    """Controller decision: move not-yet-started sequences between replicas."""

    src: int
    dst: int
    count: int


class Controller(Protocol):
    """Watches load reports (every ``interval_s``) and moves not-yet-started work."""

    interval_s: float

    def rebalance(self, loads: list[LoadReport], now: float) -> list[Move]: ...


class Dispatcher(Protocol):
    """Pull-based dispatch: holds arrivals centrally and releases them as replicas finish work.

    Used instead of a Router by policies that model a central queue (Ray Data's actor pool).
    Both calls return (sequence, replica index) pairs to enqueue now.
    """

    def admit(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[tuple[Sequence, int]]: ...

    def on_finished(self, replica: int, finished: list[Sequence], loads: list[LoadReport]
                    ) -> list[tuple[Sequence, int]]: ...


class Predictor(Protocol):
    """Output-length prediction a policy may use (the true length stays hidden until the finish).

    ``observe`` is told each finished request's true length; ``version`` increases when that moved
    the predictions (then queued work is re-predicted); ``snapshot`` is the current predictions as
    plain data with a ``predict(req)``, which the runtime pushes to its replica actors.
    """

    name: str
    version: int

    def predict(self, req: Request) -> int: ...

    def observe(self, req: Request, true_len: int) -> None: ...

    def snapshot(self) -> object: ...


class OraclePredictor:
    """Lengths known in advance (the paper's offline setting)."""

    name = "oracle"
    version = 0

    def predict(self, req: Request) -> int:
        return req.output_tokens

    def observe(self, req: Request, true_len: int) -> None:
        """Already knows."""

    def snapshot(self) -> "OraclePredictor":
        return self


class PlannedLengths:
    """The lengths a plan was made with, by request id: what the policies see in the planner's
    simulated runs when those runs draw the true lengths from the predictor's distribution
    (``planning.make_plan``'s ``scenario_output``), as the real run's policies see predictions."""

    name = "planned"
    version = 0

    def __init__(self, lengths: dict[str, int]):
        self.lengths = lengths

    def predict(self, req: Request) -> int:
        return self.lengths[req.id]

    def observe(self, req: Request, true_len: int) -> None:
        """Fixed: the plan's lengths do not move."""

    def snapshot(self) -> "PlannedLengths":
        return self


@dataclass(slots=True)
class Scheduler:
    """Everything one named policy needs: routing, per-replica iteration policy, controller."""

    name: str
    router: Router
    policy_factory: Callable[[ReplicaState], IterationPolicy]
    controller: Controller | None = None
    predictor: Predictor = field(default_factory=OraclePredictor)
    sort_key: Callable[[Sequence], float] | None = None   # queue order for SortedQueue policies
    dispatcher: Dispatcher | None = None   # pull-based dispatch (replaces the router when set)
    info: dict = field(default_factory=dict)
    # the sort key to recompute when queued sequences are re-predicted (None: the order does not
    # depend on predictions, e.g. the plan's rank)
    rekey: Callable[[Sequence], float] | None = None
    # request id -> prediction when first scheduled (kept across a recompute elsewhere; metrics)
    first_predictions: dict[str, int] = field(default_factory=dict)

    def make_sequence(self, req: Request) -> Sequence:
        pred = self.predictor.predict(req)
        s = Sequence(req, pred)
        s.predicted_first = self.first_predictions.setdefault(req.id, pred)
        if self.sort_key is not None:
            s.sort_key = self.sort_key(s)
        return s

    def repredict(self, state: ReplicaState, predict: Callable[[Request], int] | None = None) -> int:
        """Re-predict ``state``'s not-yet-started queue (after the predictor's version moved) with
        ``predict`` (default: this scheduler's predictor); returns how many predictions changed."""
        return state.repredict(predict or self.predictor.snapshot().predict, self.rekey)
