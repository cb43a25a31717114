"""Per-request work estimate on a replica group: the seconds of replica time a request costs.

A replica in steady state runs a full batch of B sequences; a decode step's time
``base + per_seq*B + per_ctx*C`` is shared by the B sequences it advances, so one request's
share of its ``O - 1`` decode steps (context ``P + k`` at step k) is

    decode_share = (O - 1) * (base / B + per_seq) + per_ctx * ((O - 1) * P + (O - 1) * O / 2)

and under prefill-first continuous batching a freed slot is refilled by a prefill of one prompt
(it stalls the batch for that iteration), so a request also costs its own prefill:

    w = prefill([P]) + decode_share

Work is additive, so a replica's predicted finish time is the sum of its requests' work, which
makes the assignment a makespan bin-packing problem. ``B`` is capped by what the KV cache can
hold at the workload's mean context, since a KV-bound replica never fills its batch.
"""
from __future__ import annotations

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec
from ..costmodel import CostModel


def effective_batch(group: ReplicaGroupSpec, prompt: np.ndarray, output: np.ndarray) -> float:
    """Sequences a replica of ``group`` keeps running on average: max batch, or KV-bound."""
    if len(prompt) == 0:
        return float(group.max_batch_size)
    mean_ctx = float(np.mean(prompt + output / 2.0)) + 1.0
    return float(max(1.0, min(group.max_batch_size, group.kv_capacity_tokens / mean_ctx)))


def prefill_alone(cost: CostModel, prompt: np.ndarray) -> np.ndarray:
    """Vectorised ``cost.prompt_prefill_time([P])`` for each prompt."""
    p = cost.prefill
    return np.maximum(p.floor_s, p.base_s + p.per_token_s * prompt) + p.per_token_sq_s * prompt * prompt


def decode_share(cost: CostModel, prompt: np.ndarray, output: np.ndarray, batch: float) -> np.ndarray:
    d = cost.decode
    steps = np.maximum(output - 1, 0).astype(np.float64)
    ctx = steps * prompt + steps * (steps + 1) / 2.0
    return steps * (d.base_s / batch + d.per_seq_s) + d.per_ctx_token_s * ctx


def request_work(group: ReplicaGroupSpec, prompt: np.ndarray, output: np.ndarray,
                 batch: float | None = None) -> np.ndarray:
    """Estimated replica-seconds of each request on one replica of ``group``."""
    prompt = np.asarray(prompt, dtype=np.float64)
    output = np.asarray(output, dtype=np.float64)
    b = effective_batch(group, prompt, output) if batch is None else batch
    return prefill_alone(group.cost_model, prompt) + decode_share(group.cost_model, prompt, output, b)


def sequence_work(cost: CostModel, max_batch: int, kv_capacity: int, prompt: int, output: int) -> float:
    """Scalar ``request_work`` for one sequence (hot path: no numpy); batch capped by KV."""
    b = min(float(max_batch), kv_capacity / (prompt + output / 2.0 + 1.0))
    b = b if b > 1.0 else 1.0
    p, d = cost.prefill, cost.decode
    lin = p.base_s + p.per_token_s * prompt
    pre = (lin if lin > p.floor_s else p.floor_s) + p.per_token_sq_s * prompt * prompt
    steps = output - 1 if output > 1 else 0
    return pre + steps * (d.base_s / b + d.per_seq_s) + d.per_ctx_token_s * (steps * prompt + steps * (steps + 1) / 2.0)


def work_matrix(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """work[g, j]: request j's estimated seconds on a replica of group g."""
    return np.stack([request_work(g, prompt, output) for g in cluster.groups])


def request_latency(group: ReplicaGroupSpec, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Seconds a request takes from its prefill to its last token inside a busy batch.

    A replica cannot finish before its longest request does, whatever its throughput: on a slow
    model with a big batch (high throughput, slow tokens) one long request can set the makespan.
    """
    prompt = np.asarray(prompt, dtype=np.float64)
    output = np.asarray(output, dtype=np.float64)
    b = effective_batch(group, prompt, output)
    ctx = float(np.mean(prompt + output / 2.0)) if len(prompt) else 0.0
    step = group.cost_model.decode_time(int(round(b)), int(round(b * ctx)))
    return prefill_alone(group.cost_model, prompt) + np.maximum(output - 1, 0) * step


def latency_matrix(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """latency[g, j]: request j's time in a busy batch of group g."""
    return np.stack([request_latency(g, prompt, output) for g in cluster.groups])
