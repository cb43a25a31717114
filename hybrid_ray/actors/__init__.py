"""Ray actors of the runtime: ReplicaActor, ControllerActor, PlannerActor and the driver: the only Ray code.

Each actor is a plain class that holds pure objects (``ReplicaState``, the scheduler's policy,
router and controller) and only adds messaging and real time; ``remote_class`` turns it into a
Ray actor class when the runtime needs one, so ``import hybrid_ray`` never imports Ray.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def remote_class(cls: type):
    """``ray.remote(cls)``, once per class (async actors: Ray runs their methods on one event loop)."""
    import ray

    return ray.remote(cls)
