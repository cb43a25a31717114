"""The run's modelled clock, shared by every actor through two numbers.

Modelled time is the workload's own time axis (``Request.arrival_s``), the axis ``simulate``
uses. The driver picks a real epoch (``time.time()`` on its host) at which modelled time equals
``t_first``, the first arrival; from then on ``model = t_first + (real - epoch) / time_scale``.
Wall clocks, not monotonic ones, because actors live in other processes (and, on a cluster, on
other hosts: their clocks must be NTP-synchronised, as Ray clusters are).
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelClock:
    epoch: float          # real time.time() at which the run starts
    t_first: float        # modelled time at the epoch (first arrival)
    time_scale: float     # real seconds per modelled second

    def now(self) -> float:
        return self.t_first + (time.time() - self.epoch) / self.time_scale

    def real_at(self, model_t: float) -> float:
        """Real time.time() of a modelled instant."""
        return self.epoch + (model_t - self.t_first) * self.time_scale

    async def wait_until(self, model_t: float) -> None:
        import asyncio

        delay = self.real_at(model_t) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
