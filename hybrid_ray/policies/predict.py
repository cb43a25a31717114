"""Output-length predictors: what a policy may know about a request's length before it ends.

``oracle`` knows the true length (the paper's offline setting). ``quantile`` is what an operator
with history has: the q-quantile of output length among past requests with a similar prompt
length (prompt-length buckets at the history's quantiles). It is fitted on a seeded sample of
the workload (the "history"), so its errors are real errors.
"""
from __future__ import annotations

import bisect
import random

import numpy as np

from ..workload import Request
from .base import OraclePredictor


class QuantilePredictor:
    name = "quantile"

    def __init__(self, history: list[Request], q: float = 0.5, buckets: int = 8):
        if not history:
            raise ValueError("QuantilePredictor needs a non-empty history")
        prompts = np.array([r.prompt_tokens for r in history], dtype=np.float64)
        outputs = np.array([r.output_tokens for r in history], dtype=np.float64)
        edges = np.unique(np.quantile(prompts, np.linspace(0, 1, buckets + 1)[1:-1]))
        self.edges = edges.tolist()
        which = np.searchsorted(edges, prompts, side="right")
        overall = float(np.quantile(outputs, q))
        self.values = [max(1, round(float(np.quantile(outputs[which == b], q)) if np.any(which == b) else overall))
                       for b in range(len(edges) + 1)]

    def predict(self, req: Request) -> int:
        return self.values[bisect.bisect_right(self.edges, req.prompt_tokens)]


def make_predictor(kind: str, requests: list[Request], seed: int = 0, history_fraction: float = 0.1):
    """``oracle`` or ``quantile`` (fitted on a seeded ``history_fraction`` sample of the workload)."""
    if kind == "oracle":
        return OraclePredictor()
    if kind == "quantile":
        rng = random.Random(seed)
        n = max(1, int(len(requests) * history_fraction))
        return QuantilePredictor(rng.sample(requests, min(n, len(requests))))
    raise ValueError(f"unknown length predictor {kind!r}; choose oracle or quantile")
