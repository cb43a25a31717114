"""Independent work as Ray tasks (e.g. the 100-case study): ``map_tasks(fn, items)``.

Results come back in input order whatever the finishing order, so a parallel study prints the
same table as a sequential one. Progress is reported as tasks finish (``ray.wait``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable


def map_tasks(fn: Callable[..., Any], arg_tuples: Iterable[tuple], address: str | None = None,
              progress: Callable[[int, int], None] | None = None, num_cpus_per_task: float = 1.0) -> list:
    import ray

    from .session import connect_ray, shutdown_ray

    started = connect_ray(address)
    try:
        remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=2)(fn)
        refs = [remote.remote(*args) for args in arg_tuples]
        index = {r: k for k, r in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=60.0)
            for ref in done:
                results[index[ref]] = ray.get(ref)
            if progress and done:
                progress(len(refs) - len(pending), len(refs))
        return results
    finally:
        if started:
            shutdown_ray()
