"""Unknown output lengths: online predictors, re-predicting queued work, prediction error, --history.

The central property: no policy, router, controller or planner reads a request's true length
(``Request.output_tokens``) before the engine finishes it; only the oracle predictor, a history
sample and the finishing mechanics (``ReplicaState.complete``) may.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

import hybrid_ray
from hybrid_ray.actors.replica import ReplicaActor
from hybrid_ray.cli import main
from hybrid_ray.errors import HistoryError
from hybrid_ray.history import load_history
from hybrid_ray.inputs import load_inputs
from hybrid_ray.metrics import average_ranks, prediction_error, spearman, summarize
from hybrid_ray.payload import Payload, SamplingSpec
from hybrid_ray.planning import build_scheduler
from hybrid_ray.schedulers import policy_names
from hybrid_ray.policies.predict import (BUCKET_EDGES, LengthHistogram, OnlinePredictor, PredictionTable,
                                         bucket_of, make_predictor)
from hybrid_ray.policies.sorting import longest_predicted_first
from hybrid_ray.replica import FINISHED, PREFILL, Iteration, ReplicaState, Sequence
from hybrid_ray.results import CompletionRecord, ResultsWriter
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request

from helpers import cluster


# -- the histogram and the online predictor: hand-computed numbers -----------------------------------

def test_histogram_quantiles_exact_below_256_and_within_a_bin_above():
    h = LengthHistogram()
    for x in (5, 1, 9, 3, 7):
        h.add(x)
    assert h.quantile(0.5) == 5 and h.quantile(0.2) == 1 and h.quantile(1.0) == 9 and h.quantile(0.9) == 9
    h.add(4)                                       # six values: the lower median is the 3rd
    assert h.quantile(0.5) == 4
    big = LengthHistogram()
    for x in (1000, 2000, 3000):
        big.add(x)
    assert big.quantile(0.5) == pytest.approx(2000, rel=0.022)
    assert LengthHistogram().quantile(0.5) == 0.0


def test_buckets_are_fixed_and_log_spaced():
    assert BUCKET_EDGES[:3] == (16, 32, 64)
    assert [bucket_of(p) for p in (1, 15, 16, 31, 32, 100, 10 ** 6)] == [0, 0, 1, 1, 2, 3, len(BUCKET_EDGES)]


def test_online_predictor_shrinks_toward_its_parent():
    p = OnlinePredictor()                          # prior 256, strength 4, median, 10 % threshold
    short, long_ = Request("s", 20, 999), Request("l", 1000, 999)
    assert p.predict(short) == p.predict(long_) == 256 and p.version == 0
    for k, v in enumerate((1, 2, 3)):
        p.observe(Request(f"o{k}", 20, 0), 100)
        assert p.version == v
    # global: (3 * 100 + 4 * 256) / 7 = 189.14; bucket of 20: (3 * 100 + 4 * 189.14) / 7 = 150.94
    assert p.predict(long_) == 189 and p.predict(short) == 151
    assert p.observed == 3


def test_online_predictor_version_moves_only_beyond_the_threshold():
    p = OnlinePredictor()
    for k in range(2000):
        p.observe(Request(f"o{k}", 50, 0), 100 + k % 7)
    assert p.predict(Request("x", 50, 1)) == pytest.approx(103, abs=2)
    assert p.version <= 12                         # converging estimates stop republishing
    v = p.version
    for k in range(500):                           # the same distribution: no move
        p.observe(Request(f"p{k}", 50, 0), 100 + k % 7)
    assert p.version == v


def test_online_predictor_groups_and_caps_at_max_tokens():
    def req(rid, prompt, group, max_tokens, ignore_eos=False):
        return Request(rid, prompt, max_tokens, payload=Payload((1,) * prompt, SamplingSpec(max_tokens,
                                                                                            ignore_eos=ignore_eos),
                                                                 group))

    p = OnlinePredictor(strength=0.0)              # no shrinkage: each cell says its own median
    for k in range(5):
        p.observe(req(f"a{k}", 20, "chat-model", 4096), 600)
        p.observe(req(f"b{k}", 20, "code-model", 4096), 40)
    assert p.predict(req("x", 20, "chat-model", 4096)) == pytest.approx(600, rel=0.022)
    assert p.predict(req("y", 20, "code-model", 4096)) == 40
    assert p.predict(req("z", 20, "chat-model", 100)) == 100          # capped at its max_tokens
    assert p.predict(req("w", 20, "code-model", 4096, ignore_eos=True)) == 4096
    assert p.predict(req("v", 2000, "code-model", 4096)) == 40        # unseen bucket: the group's
    plain = p.predict(Request("plain", 20, 3))                         # no payload: the global cell,
    assert plain == p.snapshot().lookup("", -1) and plain > 3         # not capped by the true length


def test_online_predictor_is_deterministic_and_starts_from_history():
    hist = [(20, 100)] * 50 + [(2000, 400)] * 50
    a, b = OnlinePredictor(hist), OnlinePredictor(hist)
    assert a.version == 0 and a.history == 100
    # global: lower median 100 -> (100 * 100 + 4 * 256) / 104 = 106; bucket of 2000: its 400s (bin middle
    # 399.1) shrunk toward 106: (50 * 399.1 + 4 * 106) / 54 = 377; bucket of 20: (5000 + 424) / 54 = 100
    assert a.predict(Request("s", 20, 1)) == 100
    assert a.predict(Request("l", 2000, 1)) == 377
    for k in range(300):
        q, t = Request(f"r{k}", 10 + 37 * k % 3000, 0), 1 + (k * 7919) % 500
        a.observe(q, t)
        b.observe(q, t)
    assert a.snapshot() == b.snapshot()
    assert make_predictor("quantile", [], history=hist).predict(Request("l", 2000, 1)) == 400


def test_prediction_table_is_plain_data():
    import pickle

    t = PredictionTable(3, {("", -1): 120, ("", 1): 80})
    assert pickle.loads(pickle.dumps(t)) == t
    assert t.predict(Request("a", 20, 1)) == 80 and t.predict(Request("b", 5000, 1)) == 120


# -- re-predicting a replica's queue ------------------------------------------------------------------

def test_repredict_updates_only_waiting_unstarted_sequences():
    r = ReplicaState(cluster(count=1, max_batch=2).replicas()[0])
    seqs = [Sequence(Request(f"q{i}", 50, 30), 30) for i in range(4)]
    r.add(seqs)
    r.waiting_dirty = False
    it = r.begin(Iteration(PREFILL, [(seqs[0], 50)]))
    r.complete(it, 0.0, 0.1)                      # q0 runs
    before = r.report(0.1)
    n = r.repredict(lambda q: 90, rekey=longest_predicted_first)
    assert n == 3 and seqs[0].predicted_output == 30
    assert [s.predicted_output for s in seqs[1:]] == [90, 90, 90]
    assert all(s.work_s == pytest.approx(r.estimate(50, 90)) and s.sort_key == -90 for s in seqs[1:])
    assert r.waiting_dirty
    after = r.report(0.1)
    assert after.queued_work_s == pytest.approx(3 * r.estimate(50, 90))
    assert after.queued_work_s > before.queued_work_s and after.running_work_s == before.running_work_s
    r.waiting_dirty = False
    assert r.repredict(lambda q: 90) == 0 and not r.waiting_dirty       # nothing moved: nothing to re-sort


def test_repredict_keeps_a_preempted_sequence_in_front():
    r = ReplicaState(cluster(count=1, max_batch=2, max_batched_tokens=64).replicas()[0])
    a, b = Sequence(Request("a", 100, 30), 30), Sequence(Request("b", 20, 30), 30)
    r.add([a, b])
    r.begin(Iteration(PREFILL, [(a, 40)]))       # a chunk: a holds a slot, nothing generated yet
    r.current = None
    r._preempt(a)                                # back to the queue, never produced a token
    assert not a.started and a.sort_key == float("-inf")
    r.repredict(lambda q: 70, rekey=longest_predicted_first)
    assert a.predicted_output == b.predicted_output == 70
    assert a.sort_key == float("-inf") and b.sort_key == -70
    assert r.report(0.0).queued_work_s == pytest.approx(r.estimate(100, 70) + r.estimate(20, 70))


def test_replica_actor_set_predictions_repredicts_queue_and_arrivals():
    cl, reqs = load_inputs("paper_llama65b", "gsm8k", 10)
    sch = build_scheduler("baseline", cl, reqs, lengths="online")

    async def go():
        a = ReplicaActor(cl.replicas()[0], sch.policy_factory, 1.0)
        await a.add([sch.make_sequence(q) for q in reqs[:6]], tag=1, at=float("-inf"))
        a._admit()                                # visible now
        await a.add([sch.make_sequence(q) for q in reqs[6:]], tag=2, at=1e9)   # not yet visible
        table = PredictionTable(1, {("", -1): 77})
        rep, tag = await a.set_predictions(table, None, 1)
        assert tag == 2 and rep.waiting == 10
        assert all(s.predicted_output == 77 for s in a.state.waiting)
        assert all(s.predicted_output == 77 for _, _, s in a._arriving)
        assert rep.queued_work_s == pytest.approx(sum(a.state.estimate(q.prompt_tokens, 77) for q in reqs))
        await a.set_predictions(PredictionTable(1, {("", -1): 5}), None, 1)    # a stale version: ignored
        assert a.state.waiting[0].predicted_output == 77

    asyncio.run(go())


# -- prediction error in the summary ------------------------------------------------------------------

def test_average_ranks_and_spearman_by_hand():
    assert average_ranks(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks a = 1, 2.5, 2.5, 4 and b = 1, 2, 4, 3: sum(da db) = 3, sum da^2 = 4.5, sum db^2 = 5
    assert spearman([1, 2, 2, 4], [10, 20, 40, 30]) == pytest.approx(3 / np.sqrt(22.5))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([5, 5, 5], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_prediction_error_by_hand():
    seqs = []
    for i, (first, start, true) in enumerate([(100, 110, 120), (50, 50, 50), (200, 160, 150)]):
        s = Sequence(Request(f"r{i}", 10, true), start, status=FINISHED, generated=true, finish_s=1.0,
                     predicted_first=first)
        seqs.append(s)
    seqs.append(Sequence(Request("unfinished", 10, 7), 1, predicted_first=1))        # not counted
    mae, rho = prediction_error(seqs)
    assert mae == pytest.approx((20 + 0 + 50) / 3) and rho == pytest.approx(1.0)
    mae_start, _ = prediction_error(seqs, at_start=True)
    assert mae_start == pytest.approx((10 + 0 + 10) / 3)


# -- the simulator with unknown lengths ---------------------------------------------------------------

@pytest.fixture(scope="module")
def paper200():
    return load_inputs("paper_llama65b", "gsm8k", 200)


def test_oracle_summary_reports_zero_error(paper200):
    cl, reqs = paper200
    s = summarize(simulate(cl, build_scheduler("hybrid", cl, reqs, time_limit_s=1.0), reqs))
    assert s.length_predictor == "oracle" and s.prediction_mae == 0.0 and s.prediction_spearman == pytest.approx(1.0)
    assert s.output_tokens == sum(q.output_tokens for q in reqs)


def test_online_lengths_learn_repredict_and_are_deterministic(paper200):
    cl, reqs = paper200
    # plan routing (one group binds late by default with learned lengths, which starts requests
    # sooner, on earlier predictions): the queued requests wait on their replicas to be re-predicted
    cl = dataclasses.replace(cl, policy={"hybrid": {"dispatch": "plan"}})
    runs = [simulate(cl, build_scheduler("hybrid", cl, reqs, lengths="online", time_limit_s=float("inf"),
                                             deterministic_time=0.4), reqs)
            for _ in range(2)]
    a, b = (summarize(r) for r in runs)
    assert a.to_dict() == b.to_dict()
    assert runs[0].extra["repredictions"] > 0 and a.requests_completed == 200
    assert a.length_predictor == "online"
    true = np.array([q.output_tokens for q in reqs])
    assert a.prediction_mae == pytest.approx(np.abs(256 - true).mean())   # all planned at t=0 on the prior
    assert a.prediction_spearman is None
    assert a.prediction_mae_start < 0.6 * a.prediction_mae             # re-predicted before they started
    assert a.prediction_spearman_start > 0.2


def test_learned_lengths_bind_late_on_one_group_and_follow_the_plan_on_several(paper200):
    cl, reqs = paper200
    one = build_scheduler("hybrid", cl, reqs, lengths="online")
    assert one.dispatcher is not None and one.info["plan"].info["dispatch"] == "bounded"
    hetero, hreqs = load_inputs("hetero", "gsm8k", 200)
    several = build_scheduler("hybrid", hetero, hreqs, lengths="online")
    assert several.dispatcher is None and "dispatch" not in several.info["plan"].info
    s = summarize(simulate(cl, one, reqs))
    assert s.requests_completed == 200 and s.output_tokens == sum(q.output_tokens for q in reqs)


def test_online_lengths_with_arrivals_learn_for_later_requests():
    cl, reqs = load_inputs("local", "azure-conv", 400)
    s = summarize(simulate(cl, build_scheduler("hybrid", cl, reqs, lengths="online", time_limit_s=1.0), reqs))
    assert s.requests_completed == 400
    prior_mae = np.abs(256 - np.array([q.output_tokens for q in reqs])).mean()
    assert s.prediction_spearman is not None and s.prediction_mae < prior_mae


# -- no policy reads a true length before the finish ------------------------------------------------

PKG = os.path.dirname(hybrid_ray.__file__) + os.sep
_SLOT = Request.__dict__["output_tokens"]
ALLOWED = {("replica.py", "complete"), ("replica.py", "finish_early"),   # the engine ends the sequence
           ("base.py", "predict"),                                    # the oracle (not used here)
           ("predict.py", "history_pairs")}                           # a history sample (quantile)
PEEKS: list[tuple[str, str, int]] = []


class SpyRequest(Request):
    """A Request that records which code reads its true length."""

    @property
    def output_tokens(self):
        f = sys._getframe(1)
        while f is not None and not f.f_code.co_filename.startswith(PKG):
            f = f.f_back                        # dataclass helpers, numpy: the package frame that called them
        if f is not None:
            where = (os.path.basename(f.f_code.co_filename), f.f_code.co_name)
            if where not in ALLOWED:
                PEEKS.append((f.f_code.co_filename[len(PKG):], f.f_code.co_name, f.f_lineno))
        return _SLOT.__get__(self, Request)

    @output_tokens.setter
    def output_tokens(self, value):
        _SLOT.__set__(self, value)


@pytest.mark.parametrize("lengths", ["quantile", "online"])
@pytest.mark.parametrize("policy", policy_names())
def test_no_policy_reads_true_lengths_before_the_finish(policy, lengths):
    cl, plain = load_inputs("paper_llama65b", "gsm8k", 90)
    # two thirds at t=0 (planned), the rest arriving later (routed online), true lengths far from predictions
    reqs = [SpyRequest(q.id, q.prompt_tokens, q.output_tokens * (3 if k % 4 == 0 else 1),
                       0.0 if k < 60 else 0.5 * (k - 59)) for k, q in enumerate(plain)]
    PEEKS.clear()
    sch = build_scheduler(policy, cl, reqs, lengths=lengths, seed=2, time_limit_s=0.5)
    rec = simulate(cl, sch, reqs)
    assert PEEKS == [], f"{policy}/{lengths} read true lengths at {sorted(set(PEEKS))[:5]}"
    assert all(s.finish_s >= 0 and s.generated == s.req.output_tokens for s in rec.sequences)
    assert any(s.predicted_first != s.generated for s in rec.sequences)


# -- --history and the command line -------------------------------------------------------------------

def test_history_from_results_jsonl_and_openai_output(tmp_path):
    res = tmp_path / "res.jsonl"
    with ResultsWriter(res) as w:
        w.write([CompletionRecord("a", "r0", 0.0, 1.0, 2.0, 30, 120), CompletionRecord("b", "r0", 0.0, 1.0, 2.0, 900, 7)])
    assert load_history(res) == [(30, 120), (900, 7)]
    batch = tmp_path / "out.jsonl"
    batch.write_text(json.dumps({"id": "x", "custom_id": "c1", "error": None, "response": {
        "status_code": 200, "body": {"model": "m", "usage": {"prompt_tokens": 12, "completion_tokens": 34}}}})
        + "\n" + json.dumps({"id": "y", "custom_id": "c2", "response": None,
                             "error": {"code": "bad", "message": "no"}}) + "\n")
    assert load_history(batch) == [(12, 34)]


@pytest.mark.parametrize("content, needle", [(None, "no such file"), ("not json\n{}\n", "line 1"),
                                             ("", "no finished request")])
def test_bad_history_is_one_line_naming_the_file(tmp_path, capsys, content, needle):
    path = tmp_path / "hist.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HistoryError):
        load_history(path)
    assert main(["simulate", "--config", "paper_llama65b", "--limit", "20", "--lengths", "online",
                 "--history", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid-ray: error: --history") and str(path) in err and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_online_lengths_with_history_json(tmp_path, capsys):
    out, hist, js = tmp_path / "first.jsonl", tmp_path / "hist.json", tmp_path / "m.json"
    base = ["simulate", "--config", "paper_llama65b", "--policy", "hybrid", "--limit", "150", "--time-limit", "1"]
    assert main(base + ["--lengths", "online", "-o", str(out), "--json", str(hist)]) == 0
    cold = json.loads(hist.read_text())
    assert main(base + ["--lengths", "online", "--history", str(out), "--json", str(js)]) == 0
    warm = json.loads(js.read_text())
    assert warm["length_predictor"] == cold["length_predictor"] == "online" and warm["lengths"] == "online"
    assert warm["prediction_mae"] < cold["prediction_mae"]              # yesterday's traffic helps
    assert warm["prediction_spearman"] > 0.2
    assert "length prediction (online)" in capsys.readouterr().out


# -- the Ray runtime: the driver learns from completions and has the replicas re-predict ----------------

def test_run_with_a_missing_history_fails_before_ray(tmp_path):
    from hybrid_ray.runtime import RunOptions, run

    with pytest.raises(HistoryError, match="nope.jsonl"):
        run(RunOptions(config="paper_llama65b", limit=10, lengths="online", history=str(tmp_path / "nope.jsonl"),
                       progress=False))


@pytest.mark.ray
def test_run_online_lengths_repredicts_on_replicas(ray_session):
    from hybrid_ray.runtime import RunOptions, run

    # plan routing: the queued requests wait on the replicas, where re-predictions reach them (with
    # learned lengths one group binds late by default, and requests then wait centrally)
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 150)
    cluster = dataclasses.replace(cluster, policy={"hybrid": {"dispatch": "plan"}})
    res = run(RunOptions(config="paper_llama65b", policy="hybrid", lengths="online", limit=150, plan_method="lpt",
                         cpus_per_replica=1.0, progress=False), cluster=cluster, requests=requests)
    s, data = res.summary, res.to_dict()
    assert s.requests_completed == 150 and s.length_predictor == "online"
    assert data["messages"]["set_predictions"] >= 1 and data["messages"]["repredict"] >= 4
    # queued work was re-predicted in place (by how much depends on how far the host lets replicas run
    # ahead of the driver's re-predictions: the margin is not asserted)
    assert s.prediction_mae_start < s.prediction_mae
    assert res.record.extra["prediction_versions"] >= data["messages"]["set_predictions"]
