"""Fuzzing the three input formats a user writes: loading succeeds or raises the project's one-line
user error, never another exception (issue 16 item 3).

Cluster YAML documents, workload JSONL lines and OpenAI batch lines are generated near their schemas
(right keys, wrong values: negative, huge, NaN, nested, mistyped) and as raw text. Deterministic
(``derandomize``), no deadline; the whole module takes a few seconds.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hybrid_ray.config import ClusterSpec, _load_text, load_cluster  # noqa: E402
from hybrid_ray.errors import ConfigError, HybridRayError, WorkloadError  # noqa: E402
from hybrid_ray.openai_batch import BODY_KEYS, check_batch_feasible, describe_errors, read_batch  # noqa: E402
from hybrid_ray.workload import FILE_KEYS, load_workload  # noqa: E402

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- values: what a careless or hostile file holds ----------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 10**400, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-9, 1e308, -0.0, 0.5, 2.5, 1e-4]))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=8),
                    st.sampled_from(["", "1e-5", "plan", "12", " 3 ", "nan", "a\nb"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)


def _nested(depth: int) -> object:
    out: object = 1
    for _ in range(depth):
        out = [out]
    return out


DEEP = st.sampled_from([50, 5000]).map(_nested)
# YAML: PyYAML takes about a second to hit the recursion limit, so the fuzzer nests 50 levels and the
# too-deep documents are fixed examples (and test_cluster_file_nested_too_deeply).
DEEP_YAML = st.just(50).map(_nested)

# -- cluster YAML ---------------------------------------------------------------------------------------

KNOB_NAMES = {"chunked": ["token_budget"],
              "raydata": ["batch_size", "max_concurrent_batches", "max_tasks_in_flight_per_actor"],
              "serve": ["max_ongoing_requests"],
              "hybrid": ["multiplier", "allow_mixed", "chunk_tokens", "horizon", "sort", "interval_s",
                         "threshold_s", "rel_threshold", "max_moves", "lambda"], "hybird": ["x"]}


def _valid_group() -> dict:
    return {"name": "a", "count": 2, "max_batch_size": 8, "kv_capacity_tokens": 4000,
            "resources": {"CPU": 1},
            "cost_model": {"prefill": {"floor_s": 0.001, "base_s": 0.001, "per_token_s": 1e-5},
                           "decode": {"base_s": 0.005, "per_seq_s": 1e-5, "per_ctx_token_s": 1e-7}}}


@st.composite
def cluster_docs(draw) -> object:
    """A valid cluster with a few keys replaced (or dropped) by fuzzed values."""
    doc: dict = {"name": "f", "time_scale": 1.0, "groups": [_valid_group()], "policy": {}}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "group", "prefill", "decode", "resources", "policy"]))
        value = draw(st.one_of(VALUES, DEEP_YAML)) if draw(st.booleans()) else draw(VALUES)
        g = doc["groups"][0] if isinstance(doc["groups"], list) and doc["groups"] else None
        if where == "top":
            doc[draw(st.sampled_from(["name", "time_scale", "groups", "policy", "engine", "nmae"]))] = value
        elif where == "group" and isinstance(g, dict):
            g[draw(st.sampled_from(["name", "count", "max_batch_size", "kv_capacity_tokens", "max_batched_tokens",
                                    "cost_model", "resources", "cuont"]))] = value
        elif where in ("prefill", "decode") and isinstance(g, dict) and isinstance(g.get("cost_model"), dict):
            part = g["cost_model"].get(where)
            if isinstance(part, dict):
                key = draw(st.sampled_from(["floor_s", "base_s", "per_token_s", "per_token_sq_s", "per_seq_s",
                                            "per_ctx_token_s"]))
                if draw(st.booleans()):
                    part.pop(key, None)
                else:
                    part[key] = value
        elif where == "resources" and isinstance(g, dict):
            g["resources"] = {draw(st.sampled_from(["CPU", "GPU", "", "x"])): value}
        elif where == "policy":
            name = draw(st.sampled_from(sorted(KNOB_NAMES)))
            doc["policy"] = {name: {draw(st.sampled_from(KNOB_NAMES[name])): value}}
    return doc


def _yaml_text(doc: object) -> str:
    """YAML for ``doc`` (flow style, so 5,000 levels stay one line the parser must refuse)."""
    import yaml

    try:
        return yaml.safe_dump(doc, default_flow_style=True, width=10**9, allow_unicode=True)
    except RecursionError:
        return "a: " + "[" * 5000 + "]" * 5000


def _check_cluster(text: str) -> None:
    try:
        spec = _load_text(text, "fuzz.yaml")
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("fuzz.yaml") and "\n" not in msg, msg
        return
    assert isinstance(spec, ClusterSpec)
    assert all(g.count >= 1 and g.kv_capacity_tokens >= 1 for g in spec.groups)
    assert all(1e-4 <= v for g in spec.groups for v in g.resources.values())


def _with(**changes) -> dict:
    group = {**_valid_group(), **changes.pop("group", {})}
    return {"name": "f", "groups": [group], **changes}


@FUZZ
@given(cluster_docs())
@example(_with(group={"resources": {"CPU": 10**400}}))          # found: math.isfinite(huge int) overflowed
@example(_with(time_scale=10**400))
@example(_with(policy={"hybrid": {"multiplier": 10**400}}))
@example(_with(group={"resources": {"CPU": 1e-9}}))
@example(_with(policy={"hybrid": {"interval_s": 1e-300}}))
def test_fuzz_cluster_documents(doc):
    _check_cluster(_yaml_text(doc))


@FUZZ
@given(st.one_of(st.text(max_size=60),
                 st.sampled_from(["groups: [", "{{{", "a: *x", "? [a]\n: 1", "x: 2024-13-45", "\t- a",
                                  "groups:\n  - &a {name: a}\n  - *a", "x: !!python/object:os.system {}",
                                  "x: !!binary 'AAA'", "\x00", "a: 1\na: 2", "%YAML 1.1\n---\nx: 1"]),
                 st.sampled_from([1, 100]).map(lambda d: "- " + "{a: " * d + "1" + "}" * d)))
@example("- " + "{a: " * 5000 + "1" + "}" * 5000)                  # nested beyond the parser: one line too
@example("policy: {hybrid: {horizon: " + "[" * 5000 + "]" * 5000 + "}}")
def test_fuzz_cluster_raw_text(text):
    _check_cluster(text)


def test_cluster_file_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("groups:\n" + "  " + "- " * 3000 + "x\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# -- workload JSONL lines ---------------------------------------------------------------------------------

@st.composite
def workload_lines(draw) -> str:
    if draw(st.integers(0, 5)) == 0:                                     # raw text
        return draw(st.one_of(st.text(max_size=30), st.sampled_from(["[" * 100000, "1" * 5000, "{", "null"])))
    obj: dict = {"prompt_tokens": 5, "output_tokens": 3}
    for _ in range(draw(st.integers(1, 3))):
        obj[draw(st.sampled_from(list(FILE_KEYS) + ["promt_tokens"]))] = draw(st.one_of(VALUES, DEEP))
    try:
        return json.dumps(obj)
    except (RecursionError, ValueError):
        return "[" * 100000


_TMP = tempfile.TemporaryDirectory(prefix="hr-fuzz-")      # one file, rewritten per example; removed at exit


def _tmpfile(text: str, suffix: str) -> Path:
    path = Path(_TMP.name) / f"f{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@FUZZ
@given(st.lists(workload_lines(), min_size=1, max_size=4))
def test_fuzz_workload_lines(lines):
    path = _tmpfile("\n".join(lines) + "\n", ".jsonl")
    try:
        reqs = load_workload(str(path))
    except WorkloadError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return
    for q in reqs:
        assert q.prompt_tokens >= 1 and q.output_tokens >= 1
        assert math.isfinite(q.arrival_s) and 0 <= q.arrival_s <= 1e9


# -- OpenAI batch lines ---------------------------------------------------------------------------------

@st.composite
def batch_lines(draw) -> str:
    if draw(st.integers(0, 6)) == 0:
        return draw(st.one_of(st.text(max_size=30), st.sampled_from(["[" * 100000, "9" * 5000, "{}", "[]"])))
    body: dict = {"prompt": "hello", "max_tokens": 4}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(BODY_KEYS) + ["logprobs", "a\nb"]))
        body[key] = draw(st.one_of(VALUES, DEEP, st.lists(st.integers(-5, 2**40), max_size=4)))
    obj = {"custom_id": draw(st.one_of(st.sampled_from(["a", "b", "line-1", "line-2", "line-2#2"]), VALUES)),
           "method": draw(st.sampled_from(["POST", "GET"])) if draw(st.integers(0, 4)) == 0 else "POST",
           "url": draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])),
           "body": body if draw(st.integers(0, 6)) else draw(VALUES)}
    if obj["url"] == "/v1/chat/completions" and isinstance(obj["body"], dict):
        obj["body"]["messages"] = draw(st.one_of(
            st.just([{"role": "user", "content": "hi"}]), VALUES))
    try:
        return json.dumps(obj)
    except (RecursionError, ValueError):
        return "[" * 100000


@FUZZ
@given(st.lists(batch_lines(), min_size=1, max_size=5))
def test_fuzz_batch_lines(lines):
    path = _tmpfile("\n".join(lines) + "\n", ".jsonl")
    try:
        batch = read_batch(path)
    except WorkloadError as e:                                  # only an empty file
        assert "\n" not in str(e)
        return
    batch = check_batch_feasible(batch, load_cluster("local"))
    assert "\n" not in describe_errors(batch)
    ids = [b.custom_id for b in batch.lines.values()] + [e.custom_id for e in batch.errors]
    assert len(ids) == len(set(ids)) or any(e.code == "duplicate_custom_id" for e in batch.errors)
    placeholders = [e.custom_id for e in batch.errors if e.by_line]
    assert not set(placeholders) & set(batch.lines)             # a placeholder never takes a real custom_id
    for q in batch.requests:
        assert q.prompt_tokens >= 1 and q.output_tokens >= 1
    from hybrid_ray.inputs import load_inputs

    try:
        load_inputs("local", str(path))
    except HybridRayError as e:
        assert "\n" not in str(e)
