"""A theoretical lower bound on the total inference time that *no* policy can beat.

Two families of bounds, both derived from the cost model (docs/scheduling.md has the proofs):

* **chain**: request r cannot finish before its own prefill and its ``O_r - 1`` decode steps,
  each at least a decode of a batch of one holding r's context::

      chain_r = min_g [ prefill_g([P_r]) + sum_{k=1}^{O_r-1} decode_g(1, P_r + k) ]

  and with arrivals, the end is at least ``arrival_r + chain_r``.

* **work**: every iteration costs at least ``lin + max(X, Y)`` where ``lin`` is the decode's
  per-sequence and per-context part, ``X = base * b / B`` (the weight-streaming part a decode
  step of b <= B sequences shares out) and ``Y`` the prefill tokens' part
  (``prefill.base/B + per_token*L + per_token_sq*L^2`` per prompt; a mixed iteration costs
  at least ``max(decode, prefill + lin)``). Summing per request and over replicas::

      R * T >= max( sum_r min_g (lin_rg + X_rg),  sum_r min_g (lin_rg + Y_rg) )

  The batch limit enters through ``base / B``: a replica cannot advance more than B sequences
  per step. With arrivals, the requests arriving at or after t need ``t + their work / R``.

The bound is the maximum of the two. It ignores the prefill floor and every tail effect, so a
policy's gap to it is an upper bound on how far it is from optimal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ClusterSpec
from ..workload import Request


@dataclass(frozen=True, slots=True)
class LowerBound:
    value_s: float
    chain_s: float          # longest single request (with its arrival)
    work_s: float           # total work over total capacity (with arrivals)
    critical_request: str   # id of the request achieving chain_s


def _arrays(requests: list[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.fromiter((q.prompt_tokens for q in requests), np.float64, len(requests))
    o = np.fromiter((q.output_tokens for q in requests), np.float64, len(requests))
    a = np.fromiter((q.arrival_s for q in requests), np.float64, len(requests))
    return p, o, a


def lower_bound(cluster: ClusterSpec, requests: list[Request]) -> LowerBound:
    """Valid lower bound on the makespan (first arrival to last finish) for any policy."""
    if not requests:
        return LowerBound(0.0, 0.0, 0.0, "")
    p, o, a = _arrays(requests)
    a = a - a.min()
    steps = np.maximum(o - 1, 0)
    ctx = steps * p + steps * (steps + 1) / 2.0
    chain = np.full(len(requests), np.inf)
    x_work = np.full(len(requests), np.inf)
    y_work = np.full(len(requests), np.inf)
    for g in cluster.groups:
        pc, dc = g.cost_model.prefill, g.cost_model.decode
        pre = np.maximum(pc.floor_s, pc.base_s + pc.per_token_s * p) + pc.per_token_sq_s * p * p
        dec = steps * (dc.base_s + dc.per_seq_s) + dc.per_ctx_token_s * ctx
        chain = np.minimum(chain, pre + dec)
        lin = steps * dc.per_seq_s + dc.per_ctx_token_s * ctx
        b = min(g.max_batch_size, g.kv_capacity_tokens)
        x_work = np.minimum(x_work, lin + dc.base_s * steps / b)
        y_work = np.minimum(y_work, lin + pc.base_s / b + pc.per_token_s * p + pc.per_token_sq_s * p * p)
    ends = a + chain
    k = int(np.argmax(ends))
    chain_s = float(ends[k])
    work_s = max(_work_bound(a, x_work, cluster.num_replicas), _work_bound(a, y_work, cluster.num_replicas))
    # shrink by a few ulps so float summation order can never lift the bound above a makespan
    value = max(chain_s, work_s) * (1.0 - 1e-12)
    return LowerBound(value, chain_s, work_s, requests[k].id)


def _work_bound(arrival: np.ndarray, work: np.ndarray, replicas: int) -> float:
    """max over arrival times t of t + (work of requests arriving at or after t) / replicas."""
    order = np.argsort(arrival, kind="stable")
    a, w = arrival[order], work[order]
    suffix = np.cumsum(w[::-1])[::-1]
    return float(np.max(a + suffix / replicas))
