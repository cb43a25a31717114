"""Policy knobs a cluster YAML may set (``policy: {NAME: {...}}``): defaults, ranges, validation.

Plain data with no import of the policies, so ``config`` checks a YAML's knobs at load (one line naming
the file and key path) and ``schedulers`` builds the policies with them, neither importing the other.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

RAMPS = ("shortest", "plan", "off")     # start-up program orders (LagrangianPolicy._start), or none

# Knobs a cluster YAML may set under `policy: {NAME: {...}}`, with their defaults.
KNOBS: dict[str, dict[str, object]] = {
    "chunked": {"token_budget": 512},
    # ray.data.llm's defaults (policies/raydata.py cites the source); 0 in-flight: 2 x max_concurrent_batches
    "raydata": {"batch_size": 32, "max_concurrent_batches": 8, "max_tasks_in_flight_per_actor": 0},
    "serve": {"max_ongoing_requests": 0},          # 0: 2 x each replica's max_batch_size
    # PrefixCacheAffinityRouter's defaults (policies/serve_prefix.py); imbalanced_threshold 0: none
    # (Ray's default, inf: prefix routing whatever the load), else the queue-length difference past which
    # it falls back to power-of-two choices (Ray's docs example sets 20)
    "serve-prefix": {"imbalanced_threshold": 0, "match_rate_threshold": 0.1},
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
    "raydata": {"batch_size": _INT1, "max_concurrent_batches": _INT1,
                "max_tasks_in_flight_per_actor": KnobRange("int", 0, note="0: 2 x max_concurrent_batches, "
                                                                          "Ray Data's default")},
    "serve": {"max_ongoing_requests": KnobRange("int", 0, note="0: 2 x each replica's max_batch_size")},
    "serve-prefix": {"imbalanced_threshold": KnobRange("int", 0, note="0: none, Ray's default"),
                     "match_rate_threshold": KnobRange("float", 0)},
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
