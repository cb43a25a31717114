"""Named schedulers: `build_scheduler(name, cluster, requests)` gives the bundle a run uses."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from ..config import ClusterSpec
from ..errors import ConfigError
from ..planner.estimate import sequence_work
from ..workload import Request
from .base import Scheduler
from .chunked import ChunkedPrefill
from .controller import RebalanceController
from .fcfs import FCFSPrefillFirst
from .lagrangian import RAMPS, LagrangianPolicy
from .predict import make_predictor
from .raydata import RayDataDispatcher
from .routing import EarliestFinishRouter, LeastLoadedRouter, PlanRouter, RoundRobinRouter
from .serve import ServeDispatcher
from .sorting import SortedQueue, longest_predicted_first, plan_rank

# Knobs a cluster YAML may set under `policy: {NAME: {...}}`, with their defaults.
KNOBS: dict[str, dict[str, object]] = {
    "chunked": {"token_budget": 512},
    "raydata": {"batch_size": 32, "max_concurrent_batches": 8},
    "serve": {"max_ongoing_requests": 0},          # 0: 2 x each replica's max_batch_size
    "hybrid": {"multiplier": 1.0, "allow_mixed": True, "chunk_tokens": 512, "horizon": 32, "ramp": "shortest", "sort": "plan",
               "interval_s": 1.0, "threshold_s": 0.5, "rel_threshold": 0.01, "max_moves": 4,
               "dispatch": "auto"},
}


@dataclass(frozen=True, slots=True)
class KnobRange:
    """What a knob accepts: ``kind`` int | float (finite) | bool | choice, with bounds or choices."""

    kind: str                          # int | float | bool | choice | str
    lo: float | None = None            # minimum (inclusive unless lo_open)
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    note: str = ""                     # e.g. what 0 means

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "str":
            return "a string"
        what = "an integer" if self.kind == "int" else "a number"
        bound = "" if self.lo is None else f" {'>' if self.lo_open else '>='} {self.lo:g}"
        return what + bound + (f" ({self.note})" if self.note else "")

    def accepts(self, value: object) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind in ("choice", "str"):
            return isinstance(value, str) and (self.kind == "str" or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind == "float" else int):
            return False
        if self.kind == "float":
            try:
                if not math.isfinite(value):          # nan, inf, or an int beyond any float
                    return False
            except OverflowError:
                return False
        return self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)


_INT1 = KnobRange("int", 1)
# The range of every knob in KNOBS: checked when a cluster YAML is loaded (config.py), so a bad value
# fails before anything runs, with the file and key path.
KNOB_RANGES: dict[str, dict[str, KnobRange]] = {
    "chunked": {"token_budget": _INT1},
    "raydata": {"batch_size": _INT1, "max_concurrent_batches": _INT1},
    "serve": {"max_ongoing_requests": KnobRange("int", 0, note="0: 2 x each replica's max_batch_size")},
    "hybrid": {"multiplier": KnobRange("float", 0), "allow_mixed": KnobRange("bool"),
               "chunk_tokens": KnobRange("int", 0, note="0: mixed insertions are not chunked"),
               "horizon": _INT1, "ramp": KnobRange("choice", choices=RAMPS),
               "sort": KnobRange("choice", choices=("plan", "longest")),
               # a tick below a millisecond of modelled time would make the controller run forever
               "interval_s": KnobRange("float", 1e-3, note="seconds between rebalancing rounds"),
               "threshold_s": KnobRange("float", 0), "rel_threshold": KnobRange("float", 0),
               "max_moves": KnobRange("int", 0),
               # auto: the planner simulates plan-routed and bounded (late-binding) dispatch and keeps the faster
               "dispatch": KnobRange("choice", choices=("auto", "plan", "bounded"))},
}


class KnobError(ValueError):
    """A ``policy:`` section problem; ``path`` is the key path (``policy.hybrid.horizon``)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _knob_range(name: str, key: str) -> KnobRange:
    """The knob's range; a knob without one is typed by its default."""
    spec = KNOB_RANGES.get(name, {}).get(key)
    if spec is not None:
        return spec
    default = KNOBS[name][key]
    if isinstance(default, bool):
        return KnobRange("bool")
    if isinstance(default, int):
        return KnobRange("int")
    if isinstance(default, float):
        return KnobRange("float")
    return KnobRange("str")


def _show(value: object) -> str:
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return "null" if value is None else repr(value)


def check_policy_knobs(policy: object) -> dict[str, dict]:
    """Validate a cluster's ``policy:`` section (policy name -> knobs) against KNOBS and KNOB_RANGES.

    Returns it unchanged; raises KnobError naming the key path on an unknown policy or knob, or a
    value of the wrong type or out of range.
    """
    if not isinstance(policy, dict):
        raise KnobError("policy", f"expected a mapping of policy name -> knobs, got {_show(policy)}")
    for name, knobs in policy.items():
        if name not in KNOBS:
            close = difflib.get_close_matches(str(name), list(KNOBS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KnobError("policy", f"unknown policy {name!r}{hint}; knobs exist for {', '.join(sorted(KNOBS))}")
        if not isinstance(knobs, dict):
            raise KnobError(f"policy.{name}", f"expected a mapping of knob -> value, got {_show(knobs)}")
        for key, value in knobs.items():
            if key not in KNOBS[name]:
                close = difflib.get_close_matches(str(key), list(KNOBS[name]), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise KnobError(f"policy.{name}", f"unknown key {key!r}{hint}; allowed: "
                                                  f"{', '.join(sorted(KNOBS[name])) or '(none)'}")
            spec = _knob_range(name, key)
            if not spec.accepts(value):
                raise KnobError(f"policy.{name}.{key}", f"expected {spec.describe()}, got {_show(value)}")
    return policy


def _knobs(cluster: ClusterSpec, name: str) -> dict:
    """The policy's knobs: defaults overridden by the YAML (validated as at config load: a hand-built
    ClusterSpec gets the same one-line errors)."""
    try:
        check_policy_knobs(cluster.policy)
    except KnobError as e:
        raise ConfigError(f"{cluster.source}: {e}") from None
    return {**KNOBS.get(name, {}), **cluster.policy.get(name, {})}


def build_baseline(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("baseline", LeastLoadedRouter(), lambda r: FCFSPrefillFirst())


def build_round_robin(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("round-robin", RoundRobinRouter(), lambda r: FCFSPrefillFirst())


def build_chunked(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    budget = int(_knobs(cluster, "chunked")["token_budget"])
    return Scheduler("chunked", LeastLoadedRouter(), lambda r: ChunkedPrefill(budget))


def vllm_v1_engine(r) -> ChunkedPrefill:
    """vLLM v1's scheduler inside a replica: chunked prefill always on, its token budget the group's
    ``max_batched_tokens`` (vLLM's ``max_num_batched_tokens``), running requests first, then waiting
    ones FCFS; recompute preemption of the newest when KV runs out (``ReplicaState.begin``)."""
    return ChunkedPrefill(r.max_batched_tokens)


def build_vllm(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    """`vllm serve` data parallelism: least-loaded routing (fewest outstanding) to v1 engines."""
    return Scheduler("vllm", LeastLoadedRouter(), vllm_v1_engine)


def build_serve(cluster: ClusterSpec, requests: list[Request], seed: int = 0, **_) -> Scheduler:
    """Ray Serve LLM: power-of-two-choices routing with bounded replica queues, v1 engines (policies/serve.py)."""
    bound = int(_knobs(cluster, "serve")["max_ongoing_requests"])
    if bound < 0:
        raise ConfigError(f"{cluster.source}: policy.serve.max_ongoing_requests: expected an integer >= 1 "
                          f"(or 0 for 2 x max_batch_size), got {bound}")
    limits = {r.index: bound or 2 * r.group.max_batch_size for r in cluster.replicas()}
    sch = Scheduler("serve", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = ServeDispatcher(limits, seed=seed)
    return sch


def build_raydata(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    """Ray Data LLM: blocks of rows to the least-busy engine actor, a vLLM v1 engine inside each
    (its stage builds ``vllm.AsyncLLMEngine``: v1, chunked prefill; policies/raydata.py)."""
    k = _knobs(cluster, "raydata")
    sch = Scheduler("raydata", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = RayDataDispatcher(len(requests), int(k["batch_size"]), int(k["max_concurrent_batches"]))
    return sch


def build_lpt_engine(cluster: ClusterSpec, requests: list[Request], predictor=None, **_) -> Scheduler:
    """A per-engine batch scheduler modelled on vLLM-Ascend's batch-job-aware one (an LPT waiting
    queue inside a vLLM v1 scheduler): least-loaded routing, then each v1 engine's waiting queue
    sorted longest predicted output first (preempted requests stay in front). No cluster plan, no
    controller. docs/scheduling.md section 7 says where it differs from vLLM-Ascend's."""
    return Scheduler("lpt-engine", LeastLoadedRouter(), lambda r: SortedQueue(vllm_v1_engine(r)),
                     predictor=predictor or make_predictor("oracle", requests), sort_key=longest_predicted_first,
                     rekey=longest_predicted_first)


def initial_batch(requests: list[Request]) -> list[Request]:
    """The requests known before the run starts (those at the first arrival time): what a plan covers."""
    t0 = min((q.arrival_s for q in requests), default=0.0)
    return [q for q in requests if q.arrival_s == t0]


def plan_bands(policy: str, predictor) -> str:
    """The planner's ``bands`` option for ``policy``: length bands (planner/banded.py) are the
    hybrid's, and only with known lengths: a band of requests predicted long that turn out short
    leaves its replica idle, and with learned lengths the planner's simulation that chooses
    between the candidates would run on the same wrong lengths."""
    return "auto" if policy == "hybrid" and predictor.name == "oracle" else "off"


def plan_dispatch(policy: str, predictor, cluster: ClusterSpec) -> str:
    """The planner's default ``dispatch`` for ``policy`` (the YAML's policy.hybrid.dispatch wins).

    Known lengths: ``auto``, the planner simulates plan routing and late binding and keeps the
    faster. Learned lengths: no simulation can tell (it would run on the same wrong lengths), so a
    rule. One group: late binding (Serve's bounded queues, fed longest predicted first), which
    balances by completions and needs no lengths; several groups: the plan, which puts work where
    it is cheapest, where late binding would hand long requests to a slow replica that frees first
    (docs/scheduling.md section 7 has the measurements)."""
    if policy != "hybrid":
        return "plan"
    if predictor.name == "oracle":
        return "auto"
    return "bounded" if len(cluster.groups) == 1 else "plan"


def _planned(cluster: ClusterSpec, requests: list[Request], plan, predictor, plan_opts: dict):
    """The offline plan of the initial batch, made with the predictor's lengths."""
    from ..planner.plan import make_plan

    if plan is None:
        batch = initial_batch(requests)
        predicted = np.array([predictor.predict(q) for q in batch], dtype=np.float64)
        plan = make_plan(cluster, batch, predicted_output=predicted, **plan_opts)
    index = {r.name: r.index for r in cluster.replicas()}
    return plan, {rid: index[name] for rid, name in plan.assignment.items()}


def build_offline(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, seed: int = 0,
                  **plan_opts) -> Scheduler:
    """The paper's offline method: planned assignment and start order, FCFS inside replicas.

    ``plan`` may come precomputed (e.g. from a PlannerActor); else it is made here.
    """
    predictor = predictor or make_predictor("oracle", requests)
    plan, assignment = _planned(cluster, requests, plan, predictor, {"bands": plan_bands("offline", predictor), **plan_opts})
    rank = plan_rank(plan.rank())
    sch = Scheduler("offline", PlanRouter(assignment, LeastLoadedRouter()),
                    lambda r: SortedQueue(FCFSPrefillFirst()), predictor=predictor, sort_key=rank)
    sch.info["plan"] = plan
    return sch


def build_hybrid(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, seed: int = 0,
                 **plan_opts) -> Scheduler:
    """The hybrid method: offline plan + queue sorting + Lagrangian iteration rule + controller."""
    k = _knobs(cluster, "hybrid")
    if k["sort"] not in ("plan", "longest"):
        raise ConfigError(f"{cluster.source}: policy.hybrid.sort: expected 'plan' or 'longest', got {k['sort']!r}")
    predictor = predictor or make_predictor("oracle", requests)
    plan, assignment = _planned(cluster, requests, plan, predictor, {"bands": plan_bands("hybrid", predictor),
                                "dispatch": plan_dispatch("hybrid", predictor, cluster), **plan_opts})
    # the online rule's settings the planner found faster on this batch (planner.plan.tune_rule);
    # never one the YAML sets
    given = set(cluster.policy.get("hybrid", {}))
    k.update({key: v for key, v in plan.info.get("rule", {}).items() if key not in given})
    key = plan_rank(plan.rank()) if k["sort"] == "plan" else longest_predicted_first
    groups = [r.group for r in cluster.replicas()]

    def work_of(s, i: int) -> float:
        g = groups[i]
        return sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                             s.predicted_output)

    mult, mixed, horizon, chunk = float(k["multiplier"]), bool(k["allow_mixed"]), int(k["horizon"]), int(k["chunk_tokens"])
    sch = Scheduler("hybrid", PlanRouter(assignment, EarliestFinishRouter(work_of)),
                    lambda r: SortedQueue(LagrangianPolicy(mult, mixed, horizon, chunk, str(k["ramp"]))),
                    RebalanceController(float(k["interval_s"]), float(k["threshold_s"]),
                                        float(k["rel_threshold"]), int(k["max_moves"]),
                                        keep_plan_profile=bool(plan.info.get("bands"))),
                    predictor=predictor, sort_key=key, rekey=None if k["sort"] == "plan" else key)
    if plan.info.get("dispatch") == "bounded":
        # late binding (planner.plan: kept when its simulated run is faster): Serve's bounded
        # replica queues, 2 x the batch, fed longest predicted first
        limits = {r.index: 2 * r.group.max_batch_size for r in cluster.replicas()}
        sch.dispatcher = ServeDispatcher(limits, seed=seed, order_key=longest_predicted_first)
    sch.info["plan"] = plan
    return sch


BUILDERS = {
    "baseline": build_baseline,
    "round-robin": build_round_robin,
    "chunked": build_chunked,
    "offline": build_offline,
    "hybrid": build_hybrid,
    "raydata": build_raydata,
    "vllm": build_vllm,
    "serve": build_serve,
    "lpt-engine": build_lpt_engine,
}

PLANNED = {"offline", "hybrid"}

DESCRIPTIONS = {
    "baseline": "the paper's baseline: least-loaded routing + FCFS prefill-first continuous batching (vLLM v0, no chunking)",
    "round-robin": "round-robin routing + FCFS prefill-first",
    "chunked": "least-loaded routing + Sarathi-style chunked prefill (token budget, vLLM v1 style)",
    "offline": "CP-SAT makespan plan (assignment + longest-first order) + FCFS prefill-first",
    "hybrid": "offline plan + sorting + Lagrangian prefill-vs-decode rule + rebalancing controller",
    "raydata": "ray.data.llm's dispatch: blocks of 32 rows to the least-busy engine (<= 8 blocks in flight), vLLM v1 engines",
    "lpt-engine": "least-loaded routing + vLLM v1 engines, waiting queue longest-predicted-first (per-engine batch scheduler)",
    "vllm": "`vllm serve` data parallel: least-loaded routing + vLLM v1 engines (chunked prefill, budget = max_batched_tokens)",
    "serve": "Ray Serve LLM: power-of-two-choices router, <= max_ongoing_requests per replica (2 x batch), vLLM v1 engines",
}


def policy_names() -> list[str]:
    return list(BUILDERS)


def needs_plan(name: str) -> bool:
    """Whether the policy starts from an offline plan (``build_scheduler(..., plan=...)``)."""
    return name in PLANNED


def build_scheduler(name: str, cluster: ClusterSpec, requests: list[Request], lengths: str = "oracle",
                    seed: int = 0, history: list[tuple[int, int]] | None = None, predictor=None,
                    **kw) -> Scheduler:
    """The named policy's bundle; ``plan=`` passes a precomputed offline plan to planned policies.

    Every policy gets the same length predictor (``lengths``: oracle | quantile | online, starting
    from ``history`` pairs), or ``predictor`` when given (the runtime plans with it first): those
    that ignore lengths still report predicted work, and none sees a true length before the finish.
    """
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(BUILDERS)}") from None
    if predictor is None:
        predictor = make_predictor(lengths, requests, seed, history=history)
    sch = builder(cluster, requests, predictor=predictor, seed=seed, **kw)
    sch.predictor = predictor
    return sch
