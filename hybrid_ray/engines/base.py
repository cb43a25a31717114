"""The engine interface a ``ReplicaActor`` drives: run one iteration, report its duration.

The replica's policy chooses the iteration and ``ReplicaState.begin`` validates it before the
engine sees it, so an engine never makes a scheduling decision. Durations are *modelled* seconds:
for the emulated engine the cost model's time, for a real engine the measured time (its
time_scale is 1). A real engine reports every sequence it finished in ``completions`` (text,
tokens, finish reason); one it stopped before our state's count (EOS, a stop string) is freed by
the replica (``ReplicaState.finish_early``): the state learns the true length then.

Four optional members (read with ``getattr``):

* ``seeded_chunking`` (default True): whether the engine can split a seeded sequence's prefill
  over iterations. vLLM rewinds a seeded request's ``torch.Generator`` after a partial prefill
  (``set_offset``), which a CPU generator cannot do, so ``VLLMEngine`` detects it on its device;
  when False, the replica's state prefills seeded sequences whole (``ReplicaState.whole_seeded``,
  set by ``whole_seeded_prefill``) and every policy's chunking respects it.
* ``prefix_caching`` (default False): whether the engine reuses cached prompt prefixes as the
  replica's state models them (``ReplicaState.prefix``); where False the state models no cache
  (``engine_prefix_caching``), so it never skips prompt tokens the engine computes. The emulated
  engine prices the state's iterations, so it has one.
* ``prefix_probe`` (default None): an engine with a prefix cache of its own, which the state asks
  for its hits instead of modelling them (``ReplicaState.prefix_probe``, ``replica.PrefixProbe``):
  ``VLLMEngine``'s, with vLLM's prefix caching on (vLLM's default; a group's ``prefix_caching:
  false`` turns it off). The transformers engine caches nothing.
* ``reset()``: forget every sequence, after ``execute`` raised (the replica restarts them from
  their prompts, ``actors/replica.py``); an engine without it cannot recover from a failed step.
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


def whole_seeded_prefill(engine, state: ReplicaState) -> None:
    """Tell ``state`` whether ``engine`` must prefill seeded sequences in one piece (``seeded_chunking``)."""
    state.whole_seeded = not getattr(engine, "seeded_chunking", True)


def engine_prefix_caching(engine, state: ReplicaState) -> None:
    """Turn ``state``'s prefix cache off unless ``engine`` reuses prefixes as it models (``prefix_caching``);
    an engine with a cache of its own answers the state's questions about hits (``prefix_probe``).
    Before any sequence is added: a sequence's cache keys are cut when it joins a queue."""
    if not getattr(engine, "prefix_caching", False):
        state.prefix = None
    state.prefix_probe = getattr(engine, "prefix_probe", None)


class Engine(Protocol):
    """Executes iterations; async because it runs inside an async Ray actor."""

    time_scale: float      # real seconds per modelled second (1.0 for a real engine)

    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult: ...

    def reset_pace(self) -> None:
        """The replica was idle: the next iteration starts now, not at the previous one's end."""
