"""Cluster YAML loading: bundled configs load, round trip, and every bad input names file + key path."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from hybrid_ray.config import (ClusterSpec, list_bundled_configs, load_cluster, parse_cluster)
from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost
from hybrid_ray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "cluster_configs"

# name -> (replica count per group, in order)
EXPECTED = {
    "local": {"llama7b": 4},
    "h100_llama7b": {"llama7b": 8},
    "hetero": {"h100-13b": 2, "h100-7b": 4},
}

SEVEN_B = {
    "prefill": {"floor_s": 0.0073316, "base_s": 0.00240003, "per_token_s": 2.08622e-05,
                "per_token_sq_s": 5.12493e-10},
    "decode": {"base_s": 0.00625503, "per_seq_s": 6.75929e-06, "per_ctx_token_s": 1.67819e-07},
}


def _valid() -> dict:
    """A small valid cluster with two groups; each bad case below breaks one thing in it."""
    return {
        "name": "t",
        "time_scale": 0.5,
        "groups": [
            {"name": "a", "count": 2, "max_batch_size": 8, "kv_capacity_tokens": 1000,
             "cost_model": copy.deepcopy(SEVEN_B)},
            {"name": "b", "count": 1, "max_batch_size": 4, "kv_capacity_tokens": 500,
             "max_batched_tokens": 2048, "resources": {"GPU": 1, "CPU": 0.5},
             "cost_model": copy.deepcopy(SEVEN_B)},
        ],
        "policy": {"hybrid": {"multiplier": 0.1}},
    }


def _write(tmp_path: Path, data_or_text: object, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    text = data_or_text if isinstance(data_or_text, str) else yaml.safe_dump(data_or_text, sort_keys=False)
    path.write_text(text)
    return path


def _error(tmp_path: Path, data_or_text: object) -> str:
    """Load the data from a file and return the ConfigError message (which must name the file)."""
    path = _write(tmp_path, data_or_text)
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


# -- bundled configs -------------------------------------------------------------------------

def test_bundled_names_listed():
    assert set(EXPECTED) <= set(list_bundled_configs())


@pytest.mark.parametrize("name", sorted(set(EXPECTED) | set(list_bundled_configs())))
def test_every_bundled_config_loads(name):
    by_name = load_cluster(name)
    assert by_name == load_cluster(f"{name}.yaml")
    by_path = load_cluster(CONFIG_DIR / f"{name}.yaml")
    assert by_path.to_dict() == by_name.to_dict()
    assert by_name.name == name
    names = [r.name for r in by_name.replicas()]
    assert len(names) == len(set(names)) == by_name.num_replicas
    assert [r.index for r in by_name.replicas()] == list(range(by_name.num_replicas))
    if name in EXPECTED:
        assert {g.name: g.count for g in by_name.groups} == EXPECTED[name]


def test_bundled_values():
    local = load_cluster("local")
    g = local.groups[0]
    assert (local.time_scale, g.max_batch_size, g.kv_capacity_tokens, g.resources) == (0.1, 64, 40000, {"CPU": 1})
    assert g.cost_model.to_dict() == SEVEN_B
    h = load_cluster("h100_llama7b")
    assert (h.time_scale, h.groups[0].max_batch_size, h.groups[0].kv_capacity_tokens) == (0.1, 128, 112000)
    assert h.groups[0].resources == {"GPU": 1}
    het = load_cluster("hetero")
    big, small = het.groups
    assert (big.max_batch_size, big.kv_capacity_tokens, small.max_batch_size, small.kv_capacity_tokens) == (
        64, 56000, 128, 112000)
    assert big.cost_model.decode.base_s == 0.0110116 and small.cost_model == g.cost_model
    # the bigger model is slower per iteration: the point of the heterogeneous config
    assert big.cost_model.decode_time(32, 32000) > small.cost_model.decode_time(32, 32000)


def test_unknown_bundled_name_lists_names():
    with pytest.raises(ConfigError) as info:
        load_cluster("no_such_cluster")
    msg = str(info.value)
    assert "no_such_cluster" in msg
    for name in EXPECTED:
        assert name in msg


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(tmp_path / "nope.yaml")


# -- parsing and round trip ------------------------------------------------------------------

def test_parse_defaults_and_types():
    spec = parse_cluster(_valid(), "mem.yaml")
    a, b = spec.groups
    assert a.max_batched_tokens == 8192 and a.resources == {"CPU": 1}
    assert b.max_batched_tokens == 2048 and b.resources == {"GPU": 1, "CPU": 0.5}
    assert a.cost_model == CostModel(PrefillCost(**SEVEN_B["prefill"]), DecodeCost(**SEVEN_B["decode"]))
    assert spec.policy == {"hybrid": {"multiplier": 0.1}} and spec.source == "mem.yaml"
    minimal = {"groups": [{"name": "g", "count": 1, "max_batch_size": 1, "kv_capacity_tokens": 1,
                           "cost_model": {"prefill": {"floor_s": 1, "base_s": 0, "per_token_s": 0},
                                          "decode": {"base_s": 1, "per_seq_s": 0, "per_ctx_token_s": 0}}}]}
    m = parse_cluster(minimal, "dir/small.yaml")
    assert (m.name, m.time_scale, m.policy) == ("small", 1.0, {})      # name defaults to the file stem
    assert m.groups[0].cost_model.prefill.per_token_sq_s == 0.0
    assert isinstance(m.groups[0].cost_model.prefill.floor_s, float)   # ints accepted as floats


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_round_trip_bundled(name):
    spec = load_cluster(name)
    d = spec.to_dict()
    assert parse_cluster(d, spec.source) == spec
    assert parse_cluster(yaml.safe_load(yaml.safe_dump(d)), spec.source) == spec   # plain YAML-able dict


def test_round_trip_does_not_share_state():
    spec = parse_cluster(_valid(), "mem.yaml")
    d = spec.to_dict()
    assert parse_cluster(d, "mem.yaml") == spec
    d["policy"]["hybrid"]["multiplier"] = 99
    d["groups"][1]["resources"]["GPU"] = 7
    assert spec.policy["hybrid"]["multiplier"] == 0.1 and spec.groups[1].resources["GPU"] == 1


def test_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML (YAML 1.1) would read 1e-5 as a string; cost coefficients are written that way."""
    text = yaml.safe_dump(_valid()).replace("2.08622e-05", "2e-5")
    assert "2e-5" in text
    spec = load_cluster(_write(tmp_path, text))
    assert spec.groups[0].cost_model.prefill.per_token_s == 2e-5


# -- bad inputs: (mutation, substrings the message must contain) -----------------------------

def _set(path: str, value):
    """Mutation setting a dotted key path (``groups.1.count``) of the valid dict."""
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return apply


def _del(path: str):
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        del d[last]
    return apply


def _rename(path: str, old: str, new: str):
    def apply(d: dict) -> None:
        for p in path.split(".") if path else []:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[new] = d.pop(old)
    return apply


BAD_CASES = {
    "unknown top-level key": (_rename("", "groups", "grups"),
                              ["unknown top-level key 'grups'", "did you mean 'groups'?", "allowed: engine, groups, name"]),
    "unknown group key": (_rename("groups.0", "max_batch_size", "max_batchsize"),
                          ["groups[0]: unknown key 'max_batchsize'", "(did you mean 'max_batch_size'?)",
                           "allowed: block_size, cost_model, count, kv_capacity_tokens"]),
    "unknown cost key": (_rename("groups.1.cost_model.decode", "per_seq_s", "per_sequence_s"),
                         ["groups[1].cost_model.decode: unknown key 'per_sequence_s'", "did you mean 'per_seq_s'"]),
    "missing count": (_del("groups.0.count"), ["groups[0]: missing required key 'count'"]),
    "missing cost_model": (_del("groups.1.cost_model"), ["groups[1]: missing required key 'cost_model'"]),
    "missing decode": (_del("groups.0.cost_model.decode"), ["groups[0].cost_model: missing required key 'decode'"]),
    "missing groups": (_del("groups"), ["missing required key 'groups'"]),
    "string for int": (_set("groups.1.max_batch_size", "lots"),
                       ["groups[1].max_batch_size: expected an integer >= 1, got 'lots' (a string)"]),
    "bool for int": (_set("groups.0.count", True), ["groups[0].count: expected an integer >= 1, got true (a boolean)"]),
    "float for int": (_set("groups.0.count", 2.5), ["groups[0].count: expected an integer >= 1, got 2.5"]),
    "integral float for int": (_set("groups.0.kv_capacity_tokens", 2.0),
                               ["groups[0].kv_capacity_tokens: expected an integer >= 1, got 2.0"]),
    "zero count": (_set("groups.0.count", 0), ["groups[0].count: expected an integer >= 1, got 0"]),
    "negative max_batch_size": (_set("groups.1.max_batch_size", -4),
                                ["groups[1].max_batch_size: expected an integer >= 1, got -4"]),
    "zero kv_capacity_tokens": (_set("groups.1.kv_capacity_tokens", 0),
                                ["groups[1].kv_capacity_tokens: expected an integer >= 1, got 0"]),
    "zero max_batched_tokens": (_set("groups.1.max_batched_tokens", 0),
                                ["groups[1].max_batched_tokens: expected an integer >= 1, got 0"]),
    "zero time_scale": (_set("time_scale", 0), ["time_scale: expected a number > 0, got 0"]),
    "negative time_scale": (_set("time_scale", -0.5), ["time_scale: expected a number > 0, got -0.5"]),
    "string time_scale": (_set("time_scale", "fast"), ["time_scale: expected a number > 0, got 'fast' (a string)"]),
    "negative prefill coefficient": (_set("groups.0.cost_model.prefill.per_token_s", -1e-5),
                                     ["groups[0].cost_model.prefill.per_token_s: expected a number >= 0, got -1e-05"]),
    "negative decode coefficient": (_set("groups.1.cost_model.decode.per_ctx_token_s", -1.0),
                                    ["groups[1].cost_model.decode.per_ctx_token_s: expected a number >= 0"]),
    "bool coefficient": (_set("groups.0.cost_model.prefill.base_s", False),
                         ["groups[0].cost_model.prefill.base_s: expected a number >= 0, got false (a boolean)"]),
    "decode base_s 0": (_set("groups.0.cost_model.decode.base_s", 0),
                        ["groups[0].cost_model.decode.base_s: expected a number > 0, got 0"]),
    "prefill floor and base 0": (lambda d: d["groups"][0]["cost_model"]["prefill"].update(floor_s=0, base_s=0.0),
                                 ["groups[0].cost_model.prefill: at least one of floor_s and base_s must be > 0"]),
    "duplicate group names": (_set("groups.1.name", "a"), ["groups[1].name: duplicate group name 'a'", "groups[0]"]),
    "bad group name": (_set("groups.0.name", "my group!"),
                       ["groups[0].name: expected a string matching [A-Za-z0-9_.-]+, got 'my group!'"]),
    "int group name": (_set("groups.0.name", 7), ["groups[0].name: expected a string matching"]),
    "empty groups": (_set("groups", []), ["groups: expected a non-empty list"]),
    "groups not a list": (_set("groups", {"a": 1}), ["groups: expected a list, got a mapping"]),
    "group not a mapping": (_set("groups.1", "b"), ["groups[1]: expected a mapping, got 'b' (a string)"]),
    "resources non-numeric": (_set("groups.1.resources", {"GPU": "one"}),
                              ["groups[1].resources.GPU: expected a number >= 0.0001 (Ray's unit), got 'one' (a string)"]),
    "resources zero": (_set("groups.1.resources", {"GPU": 0}), ["groups[1].resources.GPU: expected a number >= 0.0001"]),
    "resources below Ray's unit": (_set("groups.1.resources", {"CPU": 1e-9}),
                                   ["groups[1].resources.CPU: expected a number >= 0.0001", "round 1e-09 to 0"]),
    "resources beyond any node": (_set("groups.1.resources", {"CPU": 1e12}),
                                  ["groups[1].resources.CPU: expected a number <= 1e+09"]),
    "unknown policy": (_set("policy", {"hybird": {}}), ["policy: unknown policy 'hybird' (did you mean 'hybrid'?)"]),
    "unknown knob": (_set("policy", {"hybrid": {"lambda": 1}}), ["policy.hybrid: unknown key 'lambda'"]),
    "knob below range": (_set("policy", {"chunked": {"token_budget": 0}}),
                         ["policy.chunked.token_budget: expected an integer >= 1, got 0"]),
    "knob nan": (_set("policy", {"hybrid": {"multiplier": float("nan")}}),
                 ["policy.hybrid.multiplier: expected a number >= 0, got nan"]),
    "knob float for int": (_set("policy", {"raydata": {"batch_size": 2.5}}),
                           ["policy.raydata.batch_size: expected an integer >= 1, got 2.5"]),
    "resources not a mapping": (_set("groups.0.resources", ["GPU"]), ["groups[0].resources: expected a mapping"]),
    "policy not a mapping": (_set("policy", ["hybrid"]), ["policy: expected a mapping, got a list"]),
    "policy knobs not a mapping": (_set("policy", {"hybrid": 3}), ["policy.hybrid: expected a mapping, got 3"]),
    "name not a string": (_set("name", 5), ["name: expected a non-empty string, got 5"]),
    "engine kind typo": (_set("engine", {"kind": "transformer", "model": "tiny"}),
                         ["engine.kind: unknown engine 'transformer' (did you mean 'transformers'?)"]),
    "engine key typo": (_set("engine", {"kind": "transformers", "modle": "tiny"}),
                        ["engine: unknown key 'modle' (did you mean 'model'?)"]),
    "engine without kind": (_set("engine", {"model": "tiny"}), ["engine: missing required key 'kind'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_names_file_and_key_path(tmp_path, case):
    mutate, expected = BAD_CASES[case]
    data = _valid()
    mutate(data)
    msg = _error(tmp_path, data)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    # the same data handed over directly (no file) names the given source instead
    with pytest.raises(ConfigError) as info:
        parse_cluster(data, "cluster_configs/x.yaml")
    assert str(info.value).startswith("cluster_configs/x.yaml: ")
    assert all(part in str(info.value) for part in expected)


def test_message_format_exact():
    data = _valid()
    data["groups"][1]["max_batch_size"] = -4
    with pytest.raises(ConfigError) as info:
        parse_cluster(data, "cluster_configs/x.yaml")
    assert str(info.value) == "cluster_configs/x.yaml: groups[1].max_batch_size: expected an integer >= 1, got -4"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "name: t\ngroups:\n  - name: a\n    count: [1, 2\n    max_batch_size: 4\n"
    msg = _error(tmp_path, text)
    assert "line 5" in msg and "invalid YAML" in msg
    msg = _error(tmp_path, "name: t\ngroups: x\n  bad: indent\n")
    assert "line 3" in msg


def test_yaml_duplicate_key_rejected(tmp_path):
    text = yaml.safe_dump(_valid(), sort_keys=False).replace("  count: 2\n", "  count: 2\n  count: 3\n", 1)
    msg = _error(tmp_path, text)
    assert "duplicate key 'count'" in msg and "line " in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    assert "file is empty" in _error(tmp_path, text)


def test_top_level_not_a_mapping(tmp_path):
    assert "expected a mapping at the top level, got a list" in _error(tmp_path, "- a\n- b\n")


def test_valid_file_loads_with_stem_name(tmp_path):
    data = _valid()
    del data["name"]
    spec = load_cluster(_write(tmp_path, data, "my_cluster.yaml"))
    assert isinstance(spec, ClusterSpec) and spec.name == "my_cluster" and spec.num_replicas == 3
    assert [r.name for r in spec.replicas()] == ["a-0", "a-1", "b-0"]


def test_bundled_fallback_without_installed_package(monkeypatch):
    """From a checkout that was never pip-installed, the repo's cluster_configs/ is used."""
    import hybrid_ray.config as config

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(config.importlib.resources, "files", not_installed)
    assert config._bundled_dir() == CONFIG_DIR
    assert set(EXPECTED) <= set(list_bundled_configs())
    assert load_cluster("local").source == str(CONFIG_DIR / "local.yaml")


def test_engine_choice_parses_round_trips_and_matches_the_engines():
    from hybrid_ray.config import ENGINE_KINDS, EngineChoice
    from hybrid_ray.engines.factory import ENGINES

    assert ENGINE_KINDS == ENGINES
    data = _valid()
    assert parse_cluster(data, "x.yaml").engine is None and "engine" not in parse_cluster(data, "x").to_dict()
    data["engine"] = {"kind": "transformers", "model": "tiny"}
    c = parse_cluster(data, "x.yaml")
    assert c.engine == EngineChoice("transformers", "tiny", "cpu")
    assert parse_cluster(c.to_dict(), "y.yaml").engine == c.engine
    assert c.with_cost_model(c.groups[0].cost_model).engine == c.engine
    assert load_cluster("cpu_tiny").engine == EngineChoice("transformers", "tiny", "cpu")
