"""Workload loaders: bundled data matches its documented stats; bad files fail with file:line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_ray.errors import InfeasibleRequestError, WorkloadError
from hybrid_ray.workload import (
    Request,
    check_feasible,
    load_azure,
    load_file,
    load_gsm8k,
    load_workload,
    workload_stats,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# --- bundled data ------------------------------------------------------------------------------

def test_gsm8k_matches_documented_stats() -> None:
    reqs = load_gsm8k()
    stats = workload_stats(reqs)
    assert stats["count"] == 1319
    assert stats["prompt_mean"] == pytest.approx(67.4, abs=0.1)
    assert stats["output_mean"] == pytest.approx(131.8, abs=0.1)
    assert stats["prompt_p50"] == 63 and stats["output_p50"] == 122
    assert stats["duration_s"] == 0.0
    assert all(r.arrival_s == 0.0 for r in reqs)
    assert reqs[0] == Request("gsm8k-0", 73, 66, 0.0)
    assert [r.id for r in reqs[:3]] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]


def test_gsm8k_limit_keeps_file_order() -> None:
    assert load_gsm8k(limit=5) == load_gsm8k()[:5]


def test_azure_conv() -> None:
    reqs = load_azure("conv")
    stats = workload_stats(reqs)
    assert stats["count"] == 19366
    assert stats["prompt_mean"] == pytest.approx(1155, abs=1)
    assert stats["output_mean"] == pytest.approx(211, abs=1)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals[0] == 0.0
    assert all(a <= b for a, b in zip(arrivals, arrivals[1:]))
    assert 3400 < arrivals[-1] < 3600  # about an hour (3,502 s documented)
    assert reqs[1].arrival_s == pytest.approx(4.314579)  # 18:15:50.9951690 - 18:15:46.6805900
    assert reqs[0] == Request("azure-conv-0", 374, 44, 0.0)
    assert min(r.output_tokens for r in reqs) >= 1


def test_azure_parses_each_row_once_and_limit_stops_early(monkeypatch) -> None:
    """Counted work, not wall time: one timestamp parse per row; ``limit`` stops reading the file."""
    from hybrid_ray import workload

    calls = {"parse": 0, "rows": 0}
    parse, rows = workload._parse_timestamp, workload._open_bundled_csv

    def counting_parse(text):
        calls["parse"] += 1
        return parse(text)

    def counting_rows(resource):
        for item in rows(resource):
            calls["rows"] += 1
            yield item

    monkeypatch.setattr(workload, "_parse_timestamp", counting_parse)
    monkeypatch.setattr(workload, "_open_bundled_csv", counting_rows)
    assert len(load_azure("conv")) == 19366
    assert calls == {"parse": 19366, "rows": 19366}
    calls.update(parse=0, rows=0)
    assert [r.id for r in load_azure("conv", limit=10)] == [f"azure-conv-{i}" for i in range(10)]
    assert calls["parse"] == 10 and calls["rows"] <= 11          # not the other 19,356 rows


def test_azure_code() -> None:
    reqs = load_azure("code")
    stats = workload_stats(reqs)
    assert stats["count"] == 8819
    assert stats["prompt_mean"] == pytest.approx(2048, abs=1)
    assert stats["output_mean"] == pytest.approx(28, abs=1)
    assert reqs[0].arrival_s == 0.0 and 3400 < reqs[-1].arrival_s < 3600
    assert reqs[-1].id == "azure-code-8818"


def test_azure_unknown_kind() -> None:
    with pytest.raises(WorkloadError, match="conv, code"):
        load_azure("chat")


def test_bundled_gsm8k_is_byte_identical_to_shared() -> None:
    shared = SHARED_DATA / "gsm8k" / "test_llama_token_counts.csv"
    if not shared.parent.is_dir():
        pytest.skip(f"{shared.parent} not present")
    bundled = REPO / "hybrid_ray" / "data" / "gsm8k" / "test_llama_token_counts.csv"
    assert bundled.read_bytes() == shared.read_bytes()


def test_bundled_data_keeps_licenses() -> None:
    data = REPO / "hybrid_ray" / "data"
    assert "MIT License" in (data / "gsm8k" / "LICENSE").read_text(encoding="utf-8")
    azure_license = (data / "azure_llm_2023" / "LICENSE").read_text(encoding="utf-8-sig")
    assert "Attribution 4.0" in azure_license


# --- load_workload: names, limit, sampling -----------------------------------------------------

def test_load_workload_names() -> None:
    assert load_workload("gsm8k") == load_gsm8k()
    assert len(load_workload("azure-code")) == 8819
    assert load_workload("azure-conv", limit=3) == load_azure("conv")[:3]


def test_unknown_workload_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError) as err:
        load_workload(str(tmp_path / "nope"))
    msg = str(err.value)
    assert "nope" in msg
    for name in ("gsm8k", "azure-conv", "azure-code"):
        assert name in msg


def test_limit_takes_first_n() -> None:
    reqs = load_workload("gsm8k", limit=10)
    assert [r.id for r in reqs] == [f"gsm8k-{i}" for i in range(10)]


def test_seeded_sample_is_reproducible_and_ordered() -> None:
    a = load_workload("gsm8k", limit=50, seed=1)
    b = load_workload("gsm8k", limit=50, seed=1)
    c = load_workload("gsm8k", limit=50, seed=2)
    assert a == b
    assert a != c
    assert len(a) == 50 and len({r.id for r in a}) == 50
    assert a != load_workload("gsm8k", limit=50)  # a sample, not the first 50
    indices = [int(r.id.split("-")[1]) for r in a]
    assert indices == sorted(indices)


def test_seeded_sample_of_trace_keeps_time_order() -> None:
    reqs = load_workload("azure-conv", limit=100, seed=7)
    arrivals = [r.arrival_s for r in reqs]
    assert len(reqs) == 100 and arrivals == sorted(arrivals)


def test_limit_larger_than_workload_returns_all() -> None:
    assert len(load_workload("gsm8k", limit=10_000, seed=3)) == 1319


@pytest.mark.parametrize("limit", [0, -1])
def test_bad_limit(limit: int) -> None:
    with pytest.raises(WorkloadError, match="limit"):
        load_workload("gsm8k", limit=limit)


def test_load_workload_sorts_file_by_arrival_stably(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,prompt_tokens,output_tokens,arrival_s\n"
                    "a,1,1,2.0\nb,1,1,1.0\nc,1,1,2.0\nd,1,1,1.0\n")
    assert [r.id for r in load_file(path)] == ["a", "b", "c", "d"]
    assert [r.id for r in load_workload(str(path))] == ["b", "d", "a", "c"]


# --- load_file: good files ---------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path: Path) -> None:
    expected = [Request("x", 10, 5, 0.0), Request("y", 3, 7, 1.5), Request("z", 1, 1, 2.0)]
    path = tmp_path / "good.jsonl"
    lines = [json.dumps({"id": r.id, "prompt_tokens": r.prompt_tokens,
                         "output_tokens": r.output_tokens, "arrival_s": r.arrival_s})
             for r in expected]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # blank line is skipped
    assert load_file(path) == expected
    assert load_workload(str(path)) == expected


def test_jsonl_defaults(tmp_path: Path) -> None:
    path = tmp_path / "reqs.json"
    path.write_text('{"prompt_tokens": 4, "output_tokens": 2}\n\n'
                    '{"prompt_tokens": 5.0, "output_tokens": "3", "id": 7}\n')
    assert load_file(path) == [Request("reqs-1", 4, 2, 0.0), Request("7", 5, 3, 0.0)]


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "good.csv"
    path.write_text("id,prompt_tokens,output_tokens,arrival_s\r\n"
                    "a,12,3,0\r\n"
                    "b, 7 ,1,0.25\r\n"
                    ",5,2.0,\r\n")  # blank id/arrival take the defaults
    assert load_file(path) == [Request("a", 12, 3, 0.0), Request("b", 7, 1, 0.25),
                               Request("good-4", 5, 2, 0.0)]


def test_csv_minimal_columns_any_order(tmp_path: Path) -> None:
    path = tmp_path / "min.csv"
    path.write_text("output_tokens,prompt_tokens\n2,9\n")
    assert load_file(path) == [Request("min-2", 9, 2, 0.0)]


# --- load_file: bad files ----------------------------------------------------------------------

def _error(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(WorkloadError) as err:
        load_file(path)
    return str(err.value)


def _assert_names(msg: str, path: Path, line: int, *needles: str) -> None:
    assert path.name in msg
    assert f"line {line}" in msg
    for needle in needles:
        assert needle in msg


CSV_HEADER = "id,prompt_tokens,output_tokens,arrival_s\n"
GOOD_ROW = "ok,10,10,0\n"


@pytest.mark.parametrize(
    ("row", "key", "shown"),
    [
        ("r,10,-3,0", "output_tokens", "'-3'"),         # negative
        ("r,0,5,0", "prompt_tokens", "'0'"),            # zero
        ("r,10,abc,0", "output_tokens", "'abc'"),       # non-numeric
        ("r,10.5,5,0", "prompt_tokens", "'10.5'"),      # fractional
        ("r,nan,5,0", "prompt_tokens", "'nan'"),        # NaN
        ("r,10,inf,0", "output_tokens", "'inf'"),       # inf
        ("r,10,5,-1", "arrival_s", "'-1'"),             # negative arrival
        ("r,10,5,nan", "arrival_s", "'nan'"),           # NaN arrival
        ("r,10,,0", "output_tokens", "missing"),        # missing (blank cell)
    ],
)
def test_csv_bad_values(tmp_path: Path, row: str, key: str, shown: str) -> None:
    path = tmp_path / "requests.csv"
    msg = _error(path, CSV_HEADER + GOOD_ROW + row + "\n")
    _assert_names(msg, path, 3, key, shown)


def test_csv_error_message_format(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    rows = "".join(f"ok{i},10,10,0\n" for i in range(5))
    msg = _error(path, CSV_HEADER + rows + "r,10,-3,0\n")
    assert msg.endswith("requests.csv line 7: output_tokens must be an integer >= 1, got '-3'")


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    _assert_names(_error(path, "id,prompt_tokens\na,3\n"), path, 1, "output_tokens")


def test_csv_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    msg = _error(path, "id,promt_tokens,output_tokens\na,3,4\n")
    _assert_names(msg, path, 1, "promt_tokens", "prompt_tokens", "arrival_s")


def test_csv_multiline_cell_reports_row_start(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    msg = _error(path, CSV_HEADER + GOOD_ROW + '"multi\nline",1,x,0\n' + GOOD_ROW)
    _assert_names(msg, path, 3, "output_tokens", "'x'")


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    _assert_names(_error(path, CSV_HEADER + GOOD_ROW + "a,1,2\n"), path, 3, "expected 4 fields")


def test_csv_duplicate_id(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    msg = _error(path, CSV_HEADER + "a,1,1,0\nb,1,1,0\na,2,2,0\n")
    _assert_names(msg, path, 4, "duplicate id 'a'", "line 2")


def test_csv_header_only_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    assert "no requests" in _error(path, CSV_HEADER)
    assert path.name in _error(path, CSV_HEADER)


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ({"prompt_tokens": 5, "output_tokens": -3}, "output_tokens"),     # negative
        ({"prompt_tokens": 0, "output_tokens": 3}, "prompt_tokens"),      # zero
        ({"prompt_tokens": 5}, "output_tokens"),                          # missing
        ({"prompt_tokens": "five", "output_tokens": 3}, "prompt_tokens"),  # non-numeric
        ({"prompt_tokens": 5, "output_tokens": 2.5}, "output_tokens"),    # fractional
        ({"prompt_tokens": True, "output_tokens": 3}, "prompt_tokens"),   # bool is not a count
        ({"prompt_tokens": 5, "output_tokens": 3, "arrival_s": -0.5}, "arrival_s"),
        ({"prompt_tokens": 5, "output_tokens": 3, "id": [1]}, "id"),
    ],
)
def test_jsonl_bad_values(tmp_path: Path, obj: dict, key: str) -> None:
    path = tmp_path / "requests.jsonl"
    good = json.dumps({"prompt_tokens": 1, "output_tokens": 1})
    msg = _error(path, f"{good}\n\n{json.dumps(obj)}\n")
    _assert_names(msg, path, 3, key)


def test_jsonl_nan_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    msg = _error(path, '{"prompt_tokens": NaN, "output_tokens": 1}\n')
    _assert_names(msg, path, 1, "prompt_tokens", "nan")
    msg = _error(path, '{"prompt_tokens": 1, "output_tokens": 1, "arrival_s": Infinity}\n')
    _assert_names(msg, path, 1, "arrival_s", "inf")


def test_jsonl_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    msg = _error(path, '{"prompt_tokens": 1, "output_tokens": 1, "arival_s": 0}\n')
    _assert_names(msg, path, 1, "'arival_s'", "allowed", "prompt_tokens", "output_tokens",
                  "did you mean 'arrival_s'")


def test_jsonl_duplicate_id(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    row = '{"id": "a", "prompt_tokens": 1, "output_tokens": 1}\n'
    _assert_names(_error(path, row + row), path, 2, "duplicate id 'a'")


def test_jsonl_default_id_collision_is_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    text = ('{"prompt_tokens": 1, "output_tokens": 1}\n'
            '{"id": "requests-1", "prompt_tokens": 1, "output_tokens": 1}\n')
    _assert_names(_error(path, text), path, 2, "duplicate id 'requests-1'")


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    msg = _error(path, '{"prompt_tokens": 1, "output_tokens": 1}\n{"prompt_tokens": 1,\n')
    _assert_names(msg, path, 2, "invalid JSON")


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    _assert_names(_error(path, "[1, 2]\n"), path, 1, "JSON object", "list")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.jsonl"
    msg = _error(path, text)
    assert path.name in msg and "no requests" in msg


def test_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    msg = _error(path, "")
    assert path.name in msg and "empty" in msg


def test_bad_extension(tmp_path: Path) -> None:
    path = tmp_path / "requests.txt"
    msg = _error(path, "prompt_tokens,output_tokens\n1,1\n")
    assert path.name in msg and "'.txt'" in msg and ".jsonl" in msg and ".csv" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(WorkloadError, match="absent.csv"):
        load_file(path)


# --- check_feasible ----------------------------------------------------------------------------

def test_check_feasible_passes_when_all_fit() -> None:
    reqs = [Request("a", 100, 50), Request("b", 10, 10)]
    check_feasible(reqs, [150])
    check_feasible(reqs, [100, 1000])


def test_check_feasible_reports_ids() -> None:
    reqs = [Request("fits", 100, 50), Request("too-long", 900, 200), Request("big", 2000, 1)]
    with pytest.raises(InfeasibleRequestError) as err:
        check_feasible(reqs, [1000, 512])
    assert err.value.request_ids == ["too-long", "big"]
    msg = str(err.value)
    assert "too-long (900+200=1100 tokens)" in msg and "big (2000+1=2001 tokens)" in msg
    assert "1000" in msg and "fits" not in msg


def test_check_feasible_boundary() -> None:
    # prompt + output == capacity fits; one token more does not.
    check_feasible([Request("a", 100, 50)], [150])
    with pytest.raises(InfeasibleRequestError) as err:
        check_feasible([Request("a", 100, 51)], [150])
    assert err.value.request_ids == ["a"]


def test_check_feasible_truncates_message() -> None:
    reqs = [Request(f"r{i}", 100, 100) for i in range(13)]
    with pytest.raises(InfeasibleRequestError) as err:
        check_feasible(reqs, [50])
    msg = str(err.value)
    assert "r9 " in msg and "r10 " not in msg and "and 3 more" in msg
    assert err.value.request_ids == [f"r{i}" for i in range(13)]


def test_workload_stats_keys() -> None:
    stats = workload_stats([Request("a", 1, 10, 0.0), Request("b", 3, 20, 5.0)])
    assert stats == {"count": 2, "prompt_mean": 2.0, "prompt_p50": 2.0,
                     "prompt_p99": pytest.approx(2.98), "output_mean": 15.0, "output_p50": 15.0,
                     "output_p99": pytest.approx(19.9), "duration_s": 5.0}
