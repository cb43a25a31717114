"""The engine interface a ``ReplicaActor`` drives: run one iteration, report its duration.

The replica's policy chooses the iteration and ``ReplicaState.begin`` validates it before the
engine sees it, so an engine never makes a scheduling decision. Durations are *modelled* seconds:
for the emulated engine the cost model's time, for a real engine the measured time (its
time_scale is 1). A real engine reports every sequence it finished in ``completions`` (text,
tokens, finish reason); one it stopped before our state's count (EOS, a stop string) is freed by
the replica (``ReplicaState.finish_early``): the state learns the true length then.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..payload import Completion
from ..replica import Iteration, ReplicaState


@dataclass(slots=True)
class EngineResult:
    duration_s: float                                        # modelled seconds the iteration took
    completions: dict[str, Completion] = field(default_factory=dict)  # sequences the engine finished, by id


class Engine(Protocol):
    """Executes iterations; async because it runs inside an async Ray actor."""

    time_scale: float      # real seconds per modelled second (1.0 for a real engine)

    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult: ...

    def reset_pace(self) -> None:
        """The replica was idle: the next iteration starts now, not at the previous one's end."""
