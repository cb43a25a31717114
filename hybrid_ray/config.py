"""Cluster topology YAML -> ClusterSpec. Every key is validated; errors name file + key path.

The loader is strict on purpose: a typo in a cluster file (``max_batchsize``, ``count: 2.5``)
would otherwise silently fall back to a default and skew every scheduling result. So every
mapping rejects unknown keys (with a "did you mean"), every value is type- and range-checked,
and each message reads ``<file>: <key path>: <what was expected>, got <what was found>``.

Schema (see ``cluster_configs/*.yaml`` for commented examples)::

    name: str                     optional, default: the file stem
    time_scale: float > 0         optional, default 1.0
    groups:                       required, non-empty list of
      - name: [A-Za-z0-9_.-]+     unique across groups
        count: int >= 1
        max_batch_size: int >= 1
        kv_capacity_tokens: int >= 1
        max_batched_tokens: int >= 1            optional, default 8192
        prefix_caching: bool                    optional, default true (vLLM v1's default; prefix_cache.py)
        block_size: int >= 1                    optional, default 16 (vLLM's KV block, in tokens)
        resources: {str: number in [0.0001, 1e9]}   optional, default {CPU: 1} (Ray's unit: 0.0001)
        cost_model:
          prefill: {floor_s, base_s, per_token_s, per_token_sq_s (optional)}   all >= 0
          decode:  {base_s > 0, per_seq_s, per_ctx_token_s}                    all >= 0
    policy: {policy name: {knob: value}}        optional; names, knobs and ranges from knobs.KNOBS
                                                and KNOB_RANGES, checked here so a bad knob fails at load
"""
from __future__ import annotations

import copy
import difflib
import importlib.resources
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, TypeVar

import yaml

from .costmodel import CostModel, DecodeCost, PrefillCost
from .errors import ConfigError, one_line
from .knobs import KnobError, check_policy_knobs

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReplicaGroupSpec:
    """A set of identical replicas (same model, same hardware, same limits)."""

    name: str
    count: int
    max_batch_size: int          # concurrent sequences in the running batch
    kv_capacity_tokens: int      # KV-cache capacity in tokens (prompt + generated)
    cost_model: CostModel
    max_batched_tokens: int = 8192   # token budget of one prefill iteration (vLLM max_num_batched_tokens)
    resources: dict = field(default_factory=lambda: {"CPU": 1})   # Ray resources per replica actor
    prefix_caching: bool = True      # the engine reuses cached prompt prefixes (vLLM v1's default)
    block_size: int = 16             # KV block in tokens: only full blocks are cached (vLLM's default)

    def to_dict(self) -> dict:
        """Plain, YAML-dumpable form that ``parse_cluster`` reads back unchanged."""
        return {
            "name": self.name,
            "count": self.count,
            "max_batch_size": self.max_batch_size,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_batched_tokens": self.max_batched_tokens,
            "resources": dict(self.resources),
            "prefix_caching": self.prefix_caching,
            "block_size": self.block_size,
            "cost_model": self.cost_model.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica: ``name`` is unique in the cluster (``<group>-<k>``)."""

    name: str
    index: int
    group: ReplicaGroupSpec


ENGINE_KINDS = ("emulated", "transformers", "vllm")     # = engines.ENGINES (tested), kept here: no import


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The engine a config's replicas run under ``hybrid-ray run`` unless ``--engine`` says otherwise.

    A topology of real CPU replicas of a small model (``cpu_tiny.yaml``) names its model here, so
    ``run --config`` runs it for real; ``simulate`` and ``plan`` ignore it.
    """
    kind: str = "emulated"
    model: str | None = None      # real engines: a preset or a local model directory
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {k: v for k, v in (("kind", self.kind), ("model", self.model), ("device", self.device)) if v}


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    groups: tuple[ReplicaGroupSpec, ...]
    time_scale: float = 1.0          # emulated engine: real seconds slept per modelled second
    source: str = "<memory>"         # file it came from, for messages
    policy: dict = field(default_factory=dict)   # policy knobs by policy name (validated by knobs.py)
    engine: EngineChoice | None = None           # `run`'s default engine (None: emulated)

    def replicas(self) -> list[ReplicaSpec]:
        # Names cannot collide: group names are unique and the suffix after the last '-' is digits.
        out: list[ReplicaSpec] = []
        for g in self.groups:
            for k in range(g.count):
                out.append(ReplicaSpec(f"{g.name}-{k}", len(out), g))
        return out

    @property
    def num_replicas(self) -> int:
        return sum(g.count for g in self.groups)

    def with_cost_model(self, cost: CostModel) -> "ClusterSpec":
        """Every group on ``cost`` (a real engine runs one model on every replica: one profile)."""
        return replace(self, groups=tuple(replace(g, cost_model=cost) for g in self.groups))

    def to_dict(self) -> dict:
        """Plain dict (no dataclasses, no shared mutable state) that ``parse_cluster`` accepts back."""
        return {
            "name": self.name,
            "time_scale": self.time_scale,
            "groups": [g.to_dict() for g in self.groups],
            "policy": copy.deepcopy(self.policy),
            **({"engine": self.engine.to_dict()} if self.engine is not None else {}),
        }


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

_BUNDLED_PACKAGE = "hybrid_ray.cluster_configs"
_YAML_SUFFIXES = (".yaml", ".yml")


def load_cluster(path_or_name: str | Path) -> ClusterSpec:
    """Load a cluster from a YAML file, or from a bundled config by bare name (``local``)."""
    path = Path(path_or_name)
    if path.is_file():
        return _load_text(_read(path, str(path)), str(path))
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a cluster YAML file or a bundled config name")
    raw = str(path_or_name)
    name = raw
    for suffix in _YAML_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    bundled = list_bundled_configs()
    looks_like_path = "/" in raw or "\\" in raw
    if not looks_like_path and name in bundled:
        resource = _bundled_dir() / f"{name}.yaml"
        return _load_text(_read(resource, str(resource)), str(resource))
    what = "no such file" if looks_like_path else "no such file, and not a bundled config name"
    raise ConfigError(f"{raw}: {what}; bundled configs: {', '.join(bundled) or '(none found)'}")


def list_bundled_configs() -> list[str]:
    """Names (file stems) of the cluster configs shipped with the package, sorted."""
    directory = _bundled_dir()
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[: -len(".yaml")] for e in entries if e.name.endswith(".yaml") and e.is_file())


def parse_cluster(data: object, source: str) -> ClusterSpec:
    """Validate already-parsed YAML (or a hand-built dict) into a ClusterSpec.

    ``source`` names the origin in every message and provides the default cluster name (its stem).
    """
    try:
        return _parse_cluster(data, source)
    except _Invalid as e:
        where = f"{source}: {e.path}" if e.path else source
        raise ConfigError(f"{where}: {e.message}") from None


# ---------------------------------------------------------------------------------------------
# File access and YAML parsing
# ---------------------------------------------------------------------------------------------

def _bundled_dir() -> Any:
    """The bundled config directory: the installed package, else the repo's ``cluster_configs/``.

    The fallback covers running from a source checkout that was never ``pip install``-ed (the
    top-level ``cluster_configs/`` only becomes ``hybrid_ray.cluster_configs`` through the
    package-dir mapping in pyproject.toml).
    """
    try:
        return importlib.resources.files(_BUNDLED_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "cluster_configs"


def _read(resource: Any, source: str) -> str:
    """Text of a Path or importlib Traversable; I/O and encoding problems become ConfigError."""
    try:
        return resource.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-5`` as a float (as YAML 1.2 does).

    PyYAML follows YAML 1.1, where a float needs a '.', so ``1e-5`` would silently be a string;
    and a repeated key would silently keep the last value. Both hide typos in cost coefficients.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_text(text: str, source: str) -> ClusterSpec:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(one_line(f"{where}: invalid YAML{context}: {e.problem}")) from None
    except yaml.YAMLError as e:
        raise ConfigError(one_line(f"{source}: invalid YAML: {e}")) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply for the parser; a cluster file needs "
                          f"only a few levels") from None
    except (ValueError, TypeError, OverflowError) as e:   # a scalar PyYAML cannot build, e.g. 2024-13-01
        raise ConfigError(one_line(f"{source}: invalid YAML value: {e}")) from None
    try:
        return parse_cluster(data, source)
    except RecursionError:
        raise ConfigError(f"{source}: a value is nested too deeply; a cluster file needs only a few levels") from None


# ---------------------------------------------------------------------------------------------
# Validation toolkit: each check returns the typed value or raises _Invalid(path, message);
# parse_cluster adds the file name, so the helpers never need it.
# ---------------------------------------------------------------------------------------------

class _Invalid(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


_MISSING: Any = object()
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: object) -> str:
    """A value as the user wrote it, with its YAML type where the repr alone would mislead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _expected(path: str, what: str, value: object) -> NoReturn:
    raise _Invalid(path, f"expected {what}, got {_show(value)}")


def _as_int(value: object, path: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _expected(path, f"an integer >= {minimum}", value)
    return value


def _as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _expected(path, "true or false", value)
    return value


def _finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float (a 400-digit int is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_float(value: object, path: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite number (ints accepted) >= minimum, or > minimum when ``strict``."""
    what = f"a number {'>' if strict else '>='} {minimum:g}"
    if not _finite_number(value):
        _expected(path, what, value)
    if value < minimum or (strict and value == minimum):
        _expected(path, what, value)
    return float(value)


def _as_str(value: object, path: str, pattern: re.Pattern | None = None) -> str:
    if pattern is not None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            _expected(path, f"a string matching {pattern.pattern}", value)
    elif not isinstance(value, str) or not value:
        _expected(path, "a non-empty string", value)
    return value


def _as_list(value: object, path: str) -> list:
    if not isinstance(value, list):
        _expected(path, "a list", value)
    return value


def _did_you_mean(value: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_mapping(value: object, path: str, allowed: Iterable[str] | None = None) -> dict:
    """A mapping; with ``allowed``, unknown keys are rejected with a did-you-mean suggestion."""
    if not isinstance(value, Mapping):
        _expected(path, "a mapping", value)
    if allowed is not None:
        allowed = sorted(allowed)
        for key in value:
            if key not in allowed:
                label = "unknown key" if path else "unknown top-level key"
                raise _Invalid(path, f"{label} {key!r}{_did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return dict(value)


def _get(mapping: Mapping, key: str, path: str, check: Callable[..., T], *args: Any,
         default: Any = _MISSING) -> T:
    """``check(mapping[key], path.key, *args)``; a missing key is an error unless a default is given."""
    if key not in mapping:
        if default is _MISSING:
            raise _Invalid(path, f"missing required key {key!r}")
        return default
    return check(mapping[key], _join(path, key), *args)


def _req_int(m: Mapping, key: str, path: str, minimum: int = 1) -> int:
    return _get(m, key, path, _as_int, minimum)


def _opt_int(m: Mapping, key: str, path: str, default: int, minimum: int = 1) -> int:
    return _get(m, key, path, _as_int, minimum, default=default)


def _req_float(m: Mapping, key: str, path: str, minimum: float = 0.0, strict: bool = False) -> float:
    return _get(m, key, path, _as_float, minimum, strict)


def _opt_float(m: Mapping, key: str, path: str, default: float, minimum: float = 0.0,
               strict: bool = False) -> float:
    return _get(m, key, path, _as_float, minimum, strict, default=default)


def _req_mapping(m: Mapping, key: str, path: str, allowed: Iterable[str] | None = None) -> dict:
    return _get(m, key, path, _as_mapping, allowed)


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "time_scale", "groups", "policy", "engine")
_ENGINE_KEYS = ("kind", "model", "device")
_GROUP_KEYS = ("name", "count", "max_batch_size", "kv_capacity_tokens", "max_batched_tokens",
               "resources", "cost_model", "prefix_caching", "block_size")
_COST_KEYS = ("prefill", "decode")
_PREFILL_KEYS = ("floor_s", "base_s", "per_token_s", "per_token_sq_s")
_DECODE_KEYS = ("base_s", "per_seq_s", "per_ctx_token_s")


def _parse_cluster(data: object, source: str) -> ClusterSpec:
    if data is None:
        raise _Invalid("", "the file is empty (or only comments); expected a mapping with a 'groups' list")
    if not isinstance(data, Mapping):
        raise _Invalid("", f"expected a mapping at the top level, got {_show(data)}")
    top = _as_mapping(data, "", _TOP_KEYS)
    name = _get(top, "name", "", _as_str, default=Path(source).stem)
    time_scale = _opt_float(top, "time_scale", "", 1.0, strict=True)
    groups_raw = _get(top, "groups", "", _as_list)
    if not groups_raw:
        raise _Invalid("groups", "expected a non-empty list of replica groups, got an empty list")
    groups = tuple(_parse_group(g, f"groups[{i}]") for i, g in enumerate(groups_raw))
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        if g.name in seen:
            raise _Invalid(f"groups[{i}].name", f"duplicate group name {g.name!r} (also groups[{seen[g.name]}])")
        seen[g.name] = i
    policy = _get(top, "policy", "", _parse_policy, default={})
    engine = _get(top, "engine", "", _parse_engine, default=None)
    return ClusterSpec(name=name, groups=groups, time_scale=time_scale, source=source, policy=policy, engine=engine)


def _parse_engine(value: object, path: str) -> EngineChoice:
    e = _as_mapping(value, path, _ENGINE_KEYS)
    kind = _get(e, "kind", path, _as_str)
    if kind not in ENGINE_KINDS:
        raise _Invalid(_join(path, "kind"), f"unknown engine {kind!r}{_did_you_mean(kind, ENGINE_KINDS)}; "
                                            f"choose from {', '.join(ENGINE_KINDS)}")
    return EngineChoice(kind, _get(e, "model", path, _as_str, default=None),
                        _get(e, "device", path, _as_str, default="cpu"))


def _parse_group(value: object, path: str) -> ReplicaGroupSpec:
    g = _as_mapping(value, path, _GROUP_KEYS)
    return ReplicaGroupSpec(
        name=_get(g, "name", path, _as_str, _GROUP_NAME),
        count=_req_int(g, "count", path),
        max_batch_size=_req_int(g, "max_batch_size", path),
        kv_capacity_tokens=_req_int(g, "kv_capacity_tokens", path),
        max_batched_tokens=_opt_int(g, "max_batched_tokens", path, 8192),
        resources=_get(g, "resources", path, _parse_resources, default={"CPU": 1}),
        cost_model=_get(g, "cost_model", path, _parse_cost_model),
        prefix_caching=_get(g, "prefix_caching", path, _as_bool, default=True),
        block_size=_opt_int(g, "block_size", path, 16),
    )


RAY_RESOURCE_UNIT = 1e-4      # Ray stores resource amounts in fixed point: multiples of 0.0001
RAY_RESOURCE_MAX = 1e9        # far beyond any node, far below Ray's fixed-point overflow


def check_ray_amount(amount: object) -> str | None:
    """Why a Ray resource amount cannot be requested (None when it can): Ray counts in units of 0.0001,
    so a smaller amount becomes 0 (Ray rejects it when the actor is created, after the cluster started)."""
    if not _finite_number(amount) or amount <= 0:
        return f"expected a number >= {RAY_RESOURCE_UNIT:g} (Ray's unit), got {_show(amount)}"
    if amount < RAY_RESOURCE_UNIT:
        return (f"expected a number >= {RAY_RESOURCE_UNIT:g}: Ray counts resources in units of "
                f"{RAY_RESOURCE_UNIT:g} and would round {amount:g} to 0, got {_show(amount)}")
    if amount > RAY_RESOURCE_MAX:
        return f"expected a number <= {RAY_RESOURCE_MAX:g}, got {_show(amount)}"
    return None


def _parse_resources(value: object, path: str) -> dict:
    """Ray resource name -> amount per replica actor (e.g. {GPU: 1} or {CPU: 1})."""
    res = _as_mapping(value, path)
    for key, amount in res.items():
        if not isinstance(key, str) or not key:
            raise _Invalid(path, f"expected resource names to be non-empty strings, got {_show(key)}")
        problem = check_ray_amount(amount)
        if problem:
            raise _Invalid(_join(path, key), problem)
    return res


def _parse_cost_model(value: object, path: str) -> CostModel:
    cm = _as_mapping(value, path, _COST_KEYS)
    pre_path, dec_path = _join(path, "prefill"), _join(path, "decode")
    p = _req_mapping(cm, "prefill", path, _PREFILL_KEYS)
    prefill = PrefillCost(
        floor_s=_req_float(p, "floor_s", pre_path),
        base_s=_req_float(p, "base_s", pre_path),
        per_token_s=_req_float(p, "per_token_s", pre_path),
        per_token_sq_s=_opt_float(p, "per_token_sq_s", pre_path, 0.0),
    )
    if prefill.floor_s == 0 and prefill.base_s == 0:
        # A prefill that costs nothing for short prompts would let the planner admit them for free.
        raise _Invalid(pre_path, "at least one of floor_s and base_s must be > 0, got both 0")
    d = _req_mapping(cm, "decode", path, _DECODE_KEYS)
    decode = DecodeCost(
        base_s=_req_float(d, "base_s", dec_path, strict=True),   # a decode step streams the weights
        per_seq_s=_req_float(d, "per_seq_s", dec_path),
        per_ctx_token_s=_req_float(d, "per_ctx_token_s", dec_path),
    )
    return CostModel(prefill, decode)


def _parse_policy(value: object, path: str) -> dict:
    """Policy name -> knobs, each name, knob and range checked against ``knobs.KNOBS`` /
    ``KNOB_RANGES`` now, so every command fails at load (before Ray starts) on a bad knob."""
    policy = _as_mapping(value, path)
    for name, knobs in policy.items():
        if not isinstance(name, str) or not name:
            raise _Invalid(path, f"expected policy names to be non-empty strings, got {_show(name)}")
        policy[name] = _as_mapping(knobs, _join(path, name))
    try:
        check_policy_knobs(policy)
    except KnobError as e:
        raise _Invalid(e.path, e.message) from None
    return copy.deepcopy(policy)
