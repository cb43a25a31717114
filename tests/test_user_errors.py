"""Every user error is one line on stderr naming the file, key or option, exit 2, and none starts Ray.

Issue 16 item 3 (and issue 15's "Bad input"): CLI numbers, knob ranges with file and key path, Ray's
resource precision, output writability, matplotlib for --plot, batch files with no valid line, input
conflicts. The commands run in-process through ``cli.main``; a stand-in for the Ray driver fails the
test if a run would get as far as starting Ray. Item 5 (``--time-limit`` is wall time, a separate
deterministic budget) is checked on the solver parameters, counted, not timed.
"""
from __future__ import annotations

import json
import math
import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from hybrid_ray.cli import main

CLUSTER = """\
name: t
groups:
  - name: a
    count: 2
    max_batch_size: 8
    kv_capacity_tokens: 4000
    resources: {RES}
    cost_model:
      prefill: {floor_s: 0.001, base_s: 0.001, per_token_s: 0.00001}
      decode: {base_s: 0.005, per_seq_s: 0.00001, per_ctx_token_s: 0.0000001}
policy: {POLICY}
"""


def _cluster(tmp_path: Path, policy: str = "{}", resources: str = "{CPU: 1}") -> str:
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("{RES}", resources).replace("{POLICY}", policy))
    return str(path)


def _workload(tmp_path: Path, *lines: str, name: str = "w.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _batch_line(cid: object, body: dict) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body})


GOOD = '{"id": "a", "prompt_tokens": 10, "output_tokens": 5}'


def _read_only_file(tmp_path: Path) -> str:
    """A file this process cannot write: chmod 444 (as root, which ignores that, a 0444 sysfs file)."""
    if os.geteuid() != 0:
        path = tmp_path / "ro.jsonl"
        path.write_text("")
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        return str(path)
    for cand in ("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "/sys/kernel/profiling",
                 "/sys/kernel/fscaps", "/sys/power/pm_async"):
        p = Path(cand)
        if p.is_file() and not p.stat().st_mode & 0o222:
            return cand
    pytest.skip("no read-only file for root here")


def _dev_full(_tmp_path: Path) -> str:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    return "/dev/full"


# name -> (argv built in tmp_path, text the one line must hold)
CASES = {
    # -- CLI numbers ---------------------------------------------------------------------------
    "run --cpus-per-replica -1": (lambda t: ["run", "--cpus-per-replica", "-1"],
                                  ["argument --cpus-per-replica", "expected a number >= 0.0001", "'-1'"]),
    "run --cpus-per-replica 1e-9": (lambda t: ["run", "--cpus-per-replica", "1e-9"],
                                    ["argument --cpus-per-replica", "would round 1e-09 to 0"]),
    "run --connect-timeout -5": (lambda t: ["run", "--connect-timeout", "-5"],
                                 ["argument --connect-timeout", "expected a number > 0 (seconds)", "'-5'"]),
    "run --heartbeat-timeout -1": (lambda t: ["run", "--heartbeat-timeout", "-1"],
                                   ["argument --heartbeat-timeout", "expected a number > 0 (seconds)"]),
    "run --startup-timeout 0": (lambda t: ["run", "--startup-timeout", "0"], ["argument --startup-timeout"]),
    "run --time-scale inf": (lambda t: ["run", "--time-scale", "inf"],
                             ["argument --time-scale", "expected a number > 0", "'inf'"]),
    "run --time-scale nan": (lambda t: ["run", "--time-scale", "nan"], ["argument --time-scale", "'nan'"]),
    "run --report-interval 0": (lambda t: ["run", "--report-interval", "0"], ["argument --report-interval"]),
    "plan --time-limit -1": (lambda t: ["plan", "--time-limit", "-1"],
                             ["argument --time-limit", "expected a number > 0 (seconds)", "'-1'"]),
    "plan --deterministic-time 0": (lambda t: ["plan", "--deterministic-time", "0"],
                                    ["argument --deterministic-time", "expected a number > 0"]),
    "plan --workers 0": (lambda t: ["plan", "--workers", "0"], ["argument --workers", "expected an integer >= 1"]),
    "plan --workers -2": (lambda t: ["plan", "--workers", "-2"], ["argument --workers", "'-2'"]),
    "simulate --limit 0": (lambda t: ["simulate", "--limit", "0"], ["argument --limit", "expected an integer >= 1"]),
    "simulate --time-limit abc": (lambda t: ["simulate", "--time-limit", "abc"], ["argument --time-limit", "'abc'"]),
    "fit-cost-model --scale 0": (lambda t: ["fit-cost-model", "x.csv", "--scale", "0"], ["argument --scale"]),
    "fit-cost-model <missing file>": (lambda t: ["fit-cost-model", str(t / "nope.csv")],
                                      ["fit-cost-model", "nope.csv: no such file"]),
    "fit-cost-model <not a profile>": (lambda t: ["fit-cost-model", _workload(t, "a,b", "1,2", name="p.csv")],
                                       ["p.csv: unknown profile format"]),
    # -- input conflicts -------------------------------------------------------------------------
    "simulate -i X --workload gsm8k": (
        lambda t: ["simulate", "-i", _workload(t, _batch_line("a", {"prompt": "hi"})), "--workload", "gsm8k"],
        ["argument --workload: conflicts with -i", "give one of them"]),
    "simulate --workload gsm8k -i X": (
        lambda t: ["simulate", "--workload", "gsm8k", "-i", _workload(t, _batch_line("a", {"prompt": "hi"}))],
        ["argument -i/--input: conflicts with --workload gsm8k"]),
    "simulate --seed 3 (no --limit)": (lambda t: ["simulate", "--seed", "3"],
                                       ["--seed 3 changes nothing here", "add --limit N"]),
    "plan --seed 3 --method lpt (no --limit)": (lambda t: ["plan", "--seed", "3", "--method", "lpt"],
                                                ["--seed 3 changes nothing here"]),
    # -- knob ranges, with file and key path (issue 15 "Bad input"), at load: simulate and run ----------
    "policy.chunked.token_budget: 0": (lambda t: ["run", "--config", _cluster(t, "{chunked: {token_budget: 0}}")],
                                       ["c.yaml: policy.chunked.token_budget: expected an integer >= 1, got 0"]),
    "policy.raydata.batch_size: 0": (lambda t: ["run", "--config", _cluster(t, "{raydata: {batch_size: 0}}")],
                                     ["c.yaml: policy.raydata.batch_size: expected an integer >= 1, got 0"]),
    "policy.serve.max_ongoing_requests: -1": (
        lambda t: ["simulate", "--config", _cluster(t, "{serve: {max_ongoing_requests: -1}}")],
        ["c.yaml: policy.serve.max_ongoing_requests: expected an integer >= 0 (0: 2 x each replica's", "got -1"]),
    "policy.hybrid.interval_s: -1": (lambda t: ["simulate", "--config", _cluster(t, "{hybrid: {interval_s: -1}}")],
                                     ["c.yaml: policy.hybrid.interval_s: expected a number >= 0.001", "got -1"]),
    "policy.hybrid.horizon: 0": (lambda t: ["plan", "--config", _cluster(t, "{hybrid: {horizon: 0}}")],
                                 ["c.yaml: policy.hybrid.horizon: expected an integer >= 1, got 0"]),
    "policy.hybrid.multiplier: .nan": (lambda t: ["run", "--config", _cluster(t, "{hybrid: {multiplier: .nan}}")],
                                       ["c.yaml: policy.hybrid.multiplier: expected a number >= 0, got nan"]),
    "policy.hybrid.threshold_s: .inf": (lambda t: ["simulate", "--config", _cluster(t, "{hybrid: {threshold_s: .inf}}")],
                                        ["c.yaml: policy.hybrid.threshold_s: expected a number >= 0, got inf"]),
    "policy.hybrid.sort: random": (lambda t: ["simulate", "--config", _cluster(t, "{hybrid: {sort: random}}")],
                                   ["policy.hybrid.sort: expected one of 'plan', 'longest', got 'random'"]),
    "policy.hybrid.horizon: 2.5": (lambda t: ["simulate", "--config", _cluster(t, "{hybrid: {horizon: 2.5}}")],
                                   ["policy.hybrid.horizon: expected an integer >= 1, got 2.5"]),
    "policy.hybrid.multiplyer (typo)": (lambda t: ["simulate", "--config", _cluster(t, "{hybrid: {multiplyer: 1}}")],
                                   ["policy.hybrid: unknown key 'multiplyer' (did you mean 'multiplier'?)"]),
    "policy.hybird (typo)": (lambda t: ["simulate", "--config", _cluster(t, "{hybird: {}}")],
                             ["c.yaml: policy: unknown policy 'hybird' (did you mean 'hybrid'?)"]),
    # -- resources against Ray's precision; YAML nesting -------------------------------------------
    "resources: {CPU: 1e-9}": (lambda t: ["run", "--config", _cluster(t, resources="{CPU: 1e-9}")],
                               ["c.yaml: groups[0].resources.CPU: expected a number >= 0.0001",
                                "would round 1e-09 to 0"]),
    "deeply nested YAML": (lambda t: ["simulate", "--config", _workload(t, "a: " + "[" * 5000 + "]" * 5000,
                                                                         name="deep.yaml")],
                           ["deep.yaml: invalid YAML: nested too deeply"]),
    # -- workload and batch lines ------------------------------------------------------------------------
    "arrival_s: 1e308": (lambda t: ["simulate", "--workload",
                                    _workload(t, '{"id": "a", "prompt_tokens": 5, "output_tokens": 3, "arrival_s": 1e308}')],
                         ["w.jsonl line 1: arrival_s must be a number of seconds in [0, 1e+09], got 1e+308"]),
    "arrival_s: NaN": (lambda t: ["simulate", "--workload",
                                  _workload(t, GOOD, '{"id": "b", "prompt_tokens": 5, "output_tokens": 3, "arrival_s": NaN}')],
                       ["w.jsonl line 2: arrival_s must be", "got nan"]),
    "workload line nested too deeply": (lambda t: ["simulate", "--workload", _workload(t, "[" * 100000)],
                                        ["w.jsonl line 1: invalid JSON (nested too deeply)"]),
    "negative prompt_token_ids": (lambda t: ["simulate", "-i", _workload(t, _batch_line("q", {"prompt_token_ids": [1, -2]}))],
                                  ["no valid request in 1 line(s): line 1 (q): invalid_request:",
                                   "body.prompt_token_ids[1] = -2: token ids must be integers in [0, 2147483647]"]),
    "non-int prompt_token_ids": (lambda t: ["plan", "-i", _workload(t, _batch_line("q", {"prompt_token_ids": [1.5]}))],
                                 ["line 1 (q): invalid_request: body.prompt_token_ids must be a non-empty list of integers"]),
    "negative token ids as prompt": (lambda t: ["simulate", "-i", _workload(t, _batch_line("q", {"prompt": [3, -1]}))],
                                     ["line 1 (q): invalid_request: body.prompt[1] = -1"]),
    "run -i with no valid line": (lambda t: ["run", "-i", _workload(t, "garbage", _batch_line("q", {"prompt": ""})),
                                             "-o", str(t / "out.jsonl")],
                                  ["w.jsonl: no valid request in 2 line(s): line 1 (line-1): invalid_json_line",
                                   "line 2 (q): invalid_request: body.prompt is empty"]),
    "simulate -i with no valid line": (lambda t: ["simulate", "-i", _workload(t, "garbage")],
                                       ["w.jsonl: no valid request in 1 line(s)"]),
    # -- output paths, before Ray starts and before any simulation ---------------------------------
    "run -o under a regular file": (lambda t: ["run", "-o", _workload(t, "x") + "/out.jsonl"],
                                    ["-o/--output", "w.jsonl is a file, not a folder"]),
    "simulate --json under a regular file": (lambda t: ["simulate", "--json", _workload(t, "x") + "/a/m.json"],
                                             ["--json", "w.jsonl is a file, not a folder"]),
    "run -o a directory": (lambda t: ["run", "-o", str(t)], ["is a directory; give a file path"]),
    "run -o a read-only file": (lambda t: ["run", "-o", _read_only_file(t)], ["cannot write: Permission denied"]),
    "run -o /dev/full": (lambda t: ["run", "-o", _dev_full(t)], ["-o/--output /dev/full: cannot write: No space left"]),
    "simulate -o /dev/full": (lambda t: ["simulate", "-o", _dev_full(t), "--limit", "5"],
                              ["-o/--output /dev/full: cannot write: No space left"]),
    "run --resume under a regular file": (lambda t: ["run", "--resume", _workload(t, "x") + "/r.jsonl"],
                                          ["--resume", "is a file, not a folder"]),
    "simulate --plot <a file>": (lambda t: ["simulate", "--plot", _workload(t, "x"), "--limit", "5"],
                                 ["--plot", "is a file; give a folder"]),
}


@pytest.fixture
def no_ray(monkeypatch):
    """A run that got past its checks would build the Ray driver: make that fail the test."""
    fake = types.ModuleType("hybrid_ray.actors.driver")

    class Driver:
        def __init__(self, *a, **k):
            raise AssertionError("the run got as far as starting Ray")

    fake.Driver = Driver
    monkeypatch.setitem(sys.modules, "hybrid_ray.actors.driver", fake)


def one_line_error(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, the stderr line, stdout); asserts stderr is exactly one line and no traceback."""
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return rc, lines[0], out


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2(case, tmp_path, capsys, no_ray):
    build, needles = CASES[case]
    rc, line, out = one_line_error(build(tmp_path), capsys)
    assert rc == 2, line
    assert line.startswith("hybrid-ray"), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "simulating" not in out and "planning" not in out          # nothing ran before the error


def test_run_plot_without_matplotlib_fails_before_the_run(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # as if not installed
    for argv in (["run", "--plot", str(tmp_path / "p")], ["simulate", "--plot", str(tmp_path / "p")]):
        rc, line, out = one_line_error(argv, capsys)
        assert rc == 2 and "needs matplotlib" in line and "hybrid-ray[plot]" in line
        assert "simulating" not in out and "running" not in out
    assert not (tmp_path / "p").exists()


def test_checks_leave_files_untouched(tmp_path, capsys, no_ray):
    """The writability probe never changes an existing output file (it probes beside it)."""
    out = tmp_path / "o.jsonl"
    out.write_bytes(b'{"id": "half')                     # a resume file with a cut last line
    rc, line, _ = one_line_error(["run", "-o", str(out), "--policy", "chunked",
                                  "--config", _cluster(tmp_path, "{chunked: {token_budget: 0}}")], capsys)
    assert rc == 2 and "token_budget" in line
    assert out.read_bytes() == b'{"id": "half'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.jsonl")] == []


def test_seed_with_a_consumer_works(tmp_path, capsys):
    """--seed without --limit is fine where something uses it (the serve router's draws)."""
    wl = _workload(tmp_path, *(f'{{"id": "r{k}", "prompt_tokens": {5 + k}, "output_tokens": 3}}' for k in range(6)))
    cfg = _cluster(tmp_path)
    assert main(["simulate", "--config", cfg, "--workload", wl, "--policy", "serve", "--seed", "3"]) == 0
    assert main(["simulate", "--config", cfg, "--workload", wl, "--limit", "3", "--seed", "3"]) == 0
    assert "3/3 completed" in capsys.readouterr().out


def test_writer_turns_io_errors_into_one_line():
    """A failure at write time (disk full after the check) is one ResultsError with the resume hint,
    raised once: closing the writer afterwards does not raise again."""
    from hybrid_ray.results import CompletionRecord, ResultsError, ResultsWriter

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    w = ResultsWriter("/dev/full", append=True)
    with pytest.raises(ResultsError) as info:
        w.write([CompletionRecord("a", "r-0", 0.0, 0.1, 0.2, 3, 2)])
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "--resume /dev/full" in msg
    w.close()                                            # no second error


# -- custom_id "line-2" against the placeholder of malformed line 2 ------------------------------------

def test_placeholder_ids_never_collide_with_custom_ids(tmp_path, capsys):
    from hybrid_ray.openai_batch import output_lines, read_batch, read_output

    good = {"prompt": "hi", "prompt_tokens": 5, "max_tokens": 3}
    path = _workload(tmp_path, _batch_line("a", good), "garbage", _batch_line("line-2", good),
                     '{"custom_id": 7}', _batch_line("line-4", good), _batch_line("line-4#2", good),
                     name="in.jsonl")
    batch = read_batch(path)
    assert sorted(batch.lines) == ["a", "line-2", "line-4", "line-4#2"]
    errs = {e.line: e for e in batch.errors}
    assert errs[2].custom_id == "line-2#2" and errs[2].keyed_by_line          # line-2 is taken by line 3
    assert errs[4].custom_id == "line-4#3" and errs[4].keyed_by_line          # line-4, line-4#2: lines 5, 6
    out = tmp_path / "out.jsonl"
    assert main(["simulate", "-i", path, "-o", str(out), "--config", _cluster(tmp_path)]) == 0
    objs = output_lines(out)
    ids = [o["custom_id"] for o in objs]
    assert len(ids) == len(set(ids)) == 6                                      # one line each, none shared
    assert ids == ["a", "line-2#2", "line-2", "line-4#3", "line-4", "line-4#2"]   # input order
    assert objs[2]["error"] is None and objs[1]["error"]["line"] == 2
    # read back (resume): the success line settles "line-2"; the placeholder settles no request
    done = read_output(out)
    assert {"a", "line-2", "line-4", "line-4#2"} <= done.ids
    assert {e.custom_id: e.settles for e in done.errors} == {"line-2#2": None, "line-4#3": None}
    assert batch.pending_errors(done) == []


def test_placeholder_without_collision_is_unchanged(tmp_path):
    from hybrid_ray.openai_batch import read_batch

    batch = read_batch(_workload(tmp_path, _batch_line("a", {"prompt": "hi"}), "garbage"))
    assert [e.custom_id for e in batch.errors] == ["line-2"]


# -- item 5: --time-limit is wall-clock seconds; --deterministic-time is a separate budget -----------------

@pytest.fixture
def solver_params(monkeypatch):
    """The parameters of every CP-SAT solve (their limits), without changing the solve."""
    from ortools.sat.python import cp_model

    seen: list[dict] = []
    real = cp_model.CpSolver.solve

    def solve(self, model, *a, **k):
        prm = self.parameters
        seen.append({"wall": prm.max_time_in_seconds, "det": prm.max_deterministic_time})
        return real(self, model, *a, **k)

    monkeypatch.setattr(cp_model.CpSolver, "solve", solve)
    return seen


def _hard_instance():
    work = np.random.default_rng(11).lognormal(0, 1, 60)
    return work, np.array([1.0, 1.0, 1.0, 2.0])


def test_time_limit_is_the_wall_clock_limit(solver_params):
    from hybrid_ray.planner import binpack as bp

    work, speeds = _hard_instance()
    bp.pack_cpsat(work, speeds, time_limit_s=3.0)
    bp.pack(work, speeds, time_limit_s=3.0)
    assert len(solver_params) == 2
    for s in solver_params:
        assert 0 < s["wall"] <= 3.0                        # what is left of the 3 s, never more
        assert s["det"] == pytest.approx(bp.DET_TIME_PER_SECOND * 3.0)


def test_deterministic_time_alone_has_no_wall_limit(solver_params):
    from hybrid_ray.planner import binpack as bp

    work, speeds = _hard_instance()
    a = bp.pack(work, speeds, time_limit_s=math.inf, deterministic_time=0.3, seed=2)
    b = bp.pack(work, speeds, time_limit_s=math.inf, deterministic_time=0.3, seed=2)
    assert [s["det"] for s in solver_params] == [0.3, 0.3]
    assert all(math.isinf(s["wall"]) for s in solver_params)            # CP-SAT's default: none
    np.testing.assert_array_equal(a.assignment, b.assignment)


def test_no_time_left_means_no_solver(solver_params):
    from hybrid_ray.planner import binpack as bp

    work, speeds = _hard_instance()
    r = bp.pack(work, speeds, time_limit_s=1e-9)
    assert solver_params == [] and r.status == "HEURISTIC"


def test_make_plan_counts_its_own_time(monkeypatch):
    """The plan's wall limit runs from make_plan's start: pack gets what the cost matrices left."""
    from hybrid_ray.config import load_cluster
    from hybrid_ray import planning as plan_mod
    from hybrid_ray.workload import load_workload

    calls = []
    real = plan_mod.pack

    def pack(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(plan_mod, "pack", pack)
    cluster, reqs = load_cluster("local"), load_workload("gsm8k", limit=40)
    plan_mod.make_plan(cluster, reqs, time_limit_s=2.0)
    plan_mod.make_plan(cluster, reqs, time_limit_s=math.inf, deterministic_time=0.5)
    assert 0 < calls[0]["time_limit_s"] < 2.0 and calls[0]["deterministic_time"] == pytest.approx(0.8)
    assert math.isinf(calls[1]["time_limit_s"]) and calls[1]["deterministic_time"] == 0.5
    with pytest.raises(ValueError):
        plan_mod.make_plan(cluster, reqs, time_limit_s=-1.0)


def test_plan_cli_deterministic_budget(capsys, solver_params):
    outs = []
    for _ in range(2):
        assert main(["plan", "--config", "hetero", "--limit", "120", "--seed", "1", "--deterministic-time", "0.2"]) == 0
        outs.append([line for line in capsys.readouterr().out.splitlines() if "solve time" not in line])
    assert "with cpsat, deterministic budget 0.2," in outs[0][0]
    assert outs[0] == outs[1]                                  # the same plan, whatever the load
    assert solver_params and all(s["det"] == 0.2 and math.isinf(s["wall"]) for s in solver_params)
    assert main(["plan", "--config", "hetero", "--limit", "120", "--time-limit", "1.5"]) == 0
    assert "time limit 1.5 s" in capsys.readouterr().out
    assert 0 < solver_params[-1]["wall"] <= 1.5
