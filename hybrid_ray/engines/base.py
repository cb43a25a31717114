"""The engine interface a ``ReplicaActor`` drives: run one iteration, report its duration.

The replica's policy chooses the iteration and ``ReplicaState.begin`` validates it before the
engine sees it, so an engine never makes a scheduling decision. Durations are *modelled* seconds:
for the emulated engine the cost model's time, for a real engine the measured time (its
time_scale is 1). A real engine may also stop sequences early (EOS before max tokens):
``finished_early`` names them so the replica can free their slots (``ReplicaState.finish_early``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..replica import Iteration, ReplicaState


@dataclass(slots=True)
class EngineResult:
    duration_s: float                                        # modelled seconds the iteration took
    finished_early: list[str] = field(default_factory=list)  # sequence ids stopped before max tokens


class Engine(Protocol):
    """Executes iterations; async because it runs inside an async Ray actor."""

    time_scale: float      # real seconds per modelled second (1.0 for a real engine)

    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult: ...

    def reset_pace(self) -> None:
        """The replica was idle: the next iteration starts now, not at the previous one's end."""
