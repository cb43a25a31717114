"""Output-length predictors: what a policy may know about a request's length before it ends.

``oracle`` knows the true length (the paper's offline setting). ``quantile`` is what an operator
with history has: the q-quantile of output length among past requests with a similar prompt
length (prompt-length buckets at the history's quantiles), fitted once on a seeded sample of the
workload (or on ``--history``), so its errors are real errors. ``online`` learns from this run's
own completions (``OnlinePredictor``), as a server facing traffic it has never seen must.
``learned`` (``learned.py``) reads the request (prompt text, kind, model, system prompt, max_tokens)
and predicts quantiles (``predict_quantiles``).

Predictors are pure (no I/O): history arrives as (prompt_tokens, output_tokens) pairs, read by
``hybrid_ray/history.py``.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..workload import Request
from .base import OraclePredictor

LENGTH_MODES = ("oracle", "quantile", "online", "learned")

PRIOR_TOKENS = 256            # online prediction before any completion or history (capped at max_tokens)
# Fixed prompt-length buckets (log-spaced): bucket k holds prompts in [EDGES[k-1], EDGES[k]).
BUCKET_EDGES: tuple[int, ...] = tuple(2 ** k for k in range(4, 16))     # 16, 32, ..., 32768
GLOBAL = -1                   # the bucket index of a whole group's cell


def bucket_of(prompt_tokens: int) -> int:
    """The fixed log-spaced bucket of a prompt length (0 .. len(BUCKET_EDGES))."""
    return bisect.bisect_right(BUCKET_EDGES, prompt_tokens)


def group_of(req: Request) -> str:
    """The predictor group: the batch line's ``model`` or shared-prefix group; '' without a payload."""
    return req.payload.group if req.payload is not None else ""


def history_pairs(requests: Iterable[Request]) -> list[tuple[int, int]]:
    """(prompt, true output) pairs of past requests: the only place a predictor sees true lengths."""
    out = []
    for q in requests:                            # a loop, not a comprehension: one frame to audit
        out.append((q.prompt_tokens, q.output_tokens))
    return out


def predict_quantiles(predictor, req: Request) -> tuple[int, ...]:
    """(p50, p90) of ``req``'s output tokens from a predictor (or its snapshot): its ``quantiles`` when it
    has them (``learned``), else its point prediction twice."""
    q = getattr(predictor, "quantiles", None)
    if q is not None:
        return tuple(q(req))
    p = predictor.predict(req)
    return (p, p)


Z90 = 1.2815515655446004    # the standard normal's 0.9 quantile
MIN_LOG_SPREAD = 0.25        # a non-oracle prediction's log-length spread where its quantiles show none


def has_distribution(predictor) -> bool:
    """Whether the predictor gives a fitted distribution (``learned`` once it has fitted a model):
    only then can a draw from it stand for the truth (``scenario_lengths``). A prior alone (online
    at the start) knows neither the lengths' scale nor their spread."""
    return getattr(predictor, "quantiles", None) is not None and getattr(predictor, "model", None) is not None


def scenario_lengths(predictor, requests: list[Request], seed: int = 0) -> np.ndarray | None:
    """One seeded draw of the requests' output lengths from the predictor's distribution: lognormal
    through its p50 and p90 (a spread of at least MIN_LOG_SPREAD: a single number is not a
    certainty), capped at each request's ``max_tokens``. None for the oracle (its lengths are the
    truth). What the planner's simulated runs serve, so that a cut that bets on the medians pays for
    the long tail the way the real run will (``planning.make_plan``)."""
    if predictor.name == "oracle":
        return None
    from .learned import max_tokens_of          # the predictor's feature module, imported on use

    qs = np.array([predict_quantiles(predictor, q)[:2] for q in requests], dtype=np.float64).reshape(-1, 2)
    med = np.maximum(qs[:, 0], 1.0)
    spread = np.maximum(np.log(np.maximum(qs[:, 1], med) / med) / Z90, MIN_LOG_SPREAD)
    z = np.random.default_rng(seed).standard_normal(len(requests))
    draw = med * np.exp(spread * z)
    cap = np.array([max_tokens_of(q) or np.inf for q in requests], dtype=np.float64)
    return np.maximum(1.0, np.minimum(np.rint(draw), cap))


class QuantilePredictor:
    name = "quantile"
    version = 0                                  # fitted once: predictions never move

    def __init__(self, history: list[Request] | list[tuple[int, int]], q: float = 0.5, buckets: int = 8):
        if not history:
            raise ValueError("QuantilePredictor needs a non-empty history")
        pairs = history_pairs(history) if isinstance(history[0], Request) else history
        prompts = np.array([p for p, _ in pairs], dtype=np.float64)
        outputs = np.array([o for _, o in pairs], dtype=np.float64)
        edges = np.unique(np.quantile(prompts, np.linspace(0, 1, buckets + 1)[1:-1]))
        self.edges = edges.tolist()
        which = np.searchsorted(edges, prompts, side="right")
        overall = float(np.quantile(outputs, q))
        self.values = [max(1, round(float(np.quantile(outputs[which == b], q)) if np.any(which == b) else overall))
                       for b in range(len(edges) + 1)]

    def predict(self, req: Request) -> int:
        return self.values[bisect.bisect_right(self.edges, req.prompt_tokens)]

    def observe(self, req: Request, true_len: int) -> None:
        """Fitted once: completions do not change it."""

    def snapshot(self) -> "QuantilePredictor":
        return self


class LengthHistogram:
    """Counts of output lengths in log-spaced bins, in a Fenwick tree: O(log B) insert and quantile,
    bounded memory, deterministic. Exact below ``EXACT`` tokens, 2.2 % wide bins above."""

    EXACT = 256
    PER_OCTAVE = 32
    OCTAVES = 12                                  # up to 256 * 2^12 = 1M tokens
    SIZE = EXACT + PER_OCTAVE * OCTAVES
    _TOP = 1 << (SIZE.bit_length() - 1)           # highest power of two <= SIZE (Fenwick descent)

    __slots__ = ("tree", "n")

    def __init__(self) -> None:
        self.tree = [0] * (self.SIZE + 1)
        self.n = 0

    @classmethod
    def bin(cls, x: int) -> int:
        if x < cls.EXACT:
            return max(int(x), 0)
        return min(cls.EXACT + int(cls.PER_OCTAVE * math.log2(x / cls.EXACT)), cls.SIZE - 1)

    @classmethod
    def value(cls, k: int) -> float:
        """The representative length of bin ``k`` (geometric middle of a wide bin)."""
        if k < cls.EXACT:
            return float(k)
        return cls.EXACT * 2.0 ** ((k - cls.EXACT + 0.5) / cls.PER_OCTAVE)

    def add(self, x: int) -> None:
        i = self.bin(x) + 1
        tree, size = self.tree, self.SIZE
        while i <= size:
            tree[i] += 1
            i += i & -i
        self.n += 1

    def quantile(self, q: float) -> float:
        """The ceil(q n)-th smallest length (q = 0.5: the lower median); 0 when empty."""
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        pos, step, tree = 0, self._TOP, self.tree
        while step:
            nxt = pos + step
            if nxt <= self.SIZE and tree[nxt] < rank:
                pos = nxt
                rank -= tree[nxt]
            step >>= 1
        return self.value(pos)                    # pos = 0-based bin holding the rank-th length


@dataclass(frozen=True, slots=True)
class PredictionTable:
    """One published version of the online predictions: what replicas re-predict their queues with.

    ``values[(group, bucket)]``; ``(group, GLOBAL)`` is a group's cell and ``("", GLOBAL)`` the global
    one. A request takes its most specific cell present. Plain data: it crosses Ray actor boundaries.
    """

    version: int
    values: dict[tuple[str, int], int] = field(default_factory=dict)
    name: str = "online"

    def lookup(self, group: str, bucket: int) -> int:
        v = self.values
        got = v.get((group, bucket))
        if got is None and group:
            got = v.get((group, GLOBAL))
        return got if got is not None else v.get(("", GLOBAL), PRIOR_TOKENS)

    def predict(self, req: Request) -> int:
        b = bisect.bisect_right(BUCKET_EDGES, req.prompt_tokens)       # bucket_of, inlined (hot: re-predicting)
        payload = req.payload
        if payload is None:
            got = self.values.get(("", b))
            return got if got is not None else self.lookup("", GLOBAL)
        value = self.lookup(payload.group, b)     # a real request: its max_tokens bounds the output
        s = payload.sampling
        return max(1, s.max_tokens if s.ignore_eos else min(value, s.max_tokens))


class OnlinePredictor:
    """Learns output lengths from this run's completions (and, optionally, an earlier run's).

    Cells: the global one, one per group (``payload.group``), and one per (group, prompt-length
    bucket); group '' (no payload) has only bucket cells under the global one. Each cell keeps a
    ``LengthHistogram``; its estimate is its q-quantile shrunk toward its parent's estimate,
    ``(n * q_cell + strength * parent) / (n + strength)``, so a cell with few samples says little;
    the global cell shrinks toward ``prior``. ``observe`` is O(log B) per completion.

    Predictions come from a published ``PredictionTable``; it is republished (``version`` + 1) only
    when an observation moves one of the cells it touched by more than ``threshold`` (relative,
    and at least one token) from the published value, and that cell has grown by ``growth`` (50 %)
    since the last publish. Every publish costs a pass over the queued work (re-predicting it), and
    the first completions are the shortest ones (survival bias), so estimates creep up at first:
    the growth rule keeps that to O(log n) publishes per cell instead of one per 10 % step.
    """

    name = "online"

    def __init__(self, history: Iterable[tuple[int, int]] = (), q: float = 0.5, prior: int = PRIOR_TOKENS,
                 strength: float = 4.0, threshold: float = 0.1, growth: float = 0.5):
        self.q, self.prior, self.strength, self.threshold, self.growth = q, prior, strength, threshold, growth
        self._published_n: dict[tuple[str, int], int] = {}     # each cell's sample count at the last publish
        self.cells: dict[tuple[str, int], LengthHistogram] = {}
        self.observed = 0                         # completions observed in this run
        self.history = 0                          # pairs it started from
        for p, o in history:
            self._add("", bucket_of(p), o)
            self.history += 1
        self.table = PredictionTable(0, self._estimates())

    @property
    def version(self) -> int:
        return self.table.version

    def predict(self, req: Request) -> int:
        return self.table.predict(req)

    def snapshot(self) -> PredictionTable:
        """The current predictions, as plain data (the runtime pushes it to replicas)."""
        return self.table

    def observe(self, req: Request, true_len: int) -> None:
        """A request finished with ``true_len`` output tokens; republish if its cells moved."""
        self.observed += 1
        g, b = group_of(req), bucket_of(req.prompt_tokens)
        self._add(g, b, true_len)
        est = float(self.prior)
        for key in self._chain(g, b):
            est = self._shrunk(key, est)
            old = self.table.lookup(*key)
            if (abs(est - old) > max(self.threshold * old, 1.0)
                    and self.cells[key].n >= (1.0 + self.growth) * self._published_n.get(key, 0)):
                self._publish()
                return

    def _publish(self) -> None:
        self.table = PredictionTable(self.table.version + 1, self._estimates())
        self._published_n = {k: h.n for k, h in self.cells.items()}

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _chain(g: str, b: int) -> list[tuple[str, int]]:
        """Cells from the global one down to the leaf (each one's parent precedes it)."""
        return [("", GLOBAL), (g, GLOBAL), (g, b)] if g else [("", GLOBAL), ("", b)]

    def _add(self, g: str, b: int, length: int) -> None:
        for key in self._chain(g, b):
            h = self.cells.get(key)
            if h is None:
                h = self.cells[key] = LengthHistogram()
            h.add(length)

    def _shrunk(self, key: tuple[str, int], parent: float) -> float:
        h = self.cells.get(key)
        if h is None or not h.n:
            return parent
        return (h.n * h.quantile(self.q) + self.strength * parent) / (h.n + self.strength)

    def _estimates(self) -> dict[tuple[str, int], int]:
        """Every cell's estimate, parents before children."""
        out: dict[tuple[str, int], int] = {}
        raw: dict[tuple[str, int], float] = {}
        root = raw[("", GLOBAL)] = self._shrunk(("", GLOBAL), float(self.prior))
        out[("", GLOBAL)] = max(1, round(root))
        for key in sorted(self.cells, key=lambda k: (k[1] != GLOBAL, k)):
            if key == ("", GLOBAL):
                continue
            g, b = key
            parent = root if (b == GLOBAL or not g) else raw.get((g, GLOBAL), root)
            raw[key] = self._shrunk(key, parent)
            out[key] = max(1, round(raw[key]))
        return out


def make_predictor(kind: str, requests: list[Request], seed: int = 0, history_fraction: float = 0.1,
                   history: list[tuple[int, int]] | None = None):
    """``oracle``; ``quantile`` (fitted on ``history`` pairs, else on a seeded ``history_fraction``
    sample of the workload); ``online`` (learns from completions, starting from ``history``);
    ``learned`` (``learned.LearnedPredictor``: reads the prompt, learns from ``history`` rows and
    completions, predicts quantiles; the online predictor answers until its first fit)."""
    if kind == "oracle":
        return OraclePredictor()
    if kind == "quantile":
        if history:
            return QuantilePredictor(list(history))
        rng = random.Random(seed)
        n = max(1, int(len(requests) * history_fraction))
        return QuantilePredictor(history_pairs(rng.sample(requests, min(n, len(requests)))))
    if kind == "online":
        return OnlinePredictor(history or ())
    if kind == "learned":
        from .learned import LearnedPredictor
        return LearnedPredictor(requests, history or (), seed=seed, fallback=OnlinePredictor)
    raise ValueError(f"unknown length predictor {kind!r}; choose {', '.join(LENGTH_MODES)}")
