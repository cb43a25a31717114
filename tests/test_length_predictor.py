"""``--lengths learned``: a length predictor that reads the request (issue 27, item 1).

It reads the prompt text, kind, model, system-prompt hash, max_tokens and prompt length, never the
true output; predicts p50/p90 capped at max_tokens; learns from --history (workload files with text,
or a batch input joined with its output) and completions; and on the mixed-task workload with a
600-request history ranks the outputs with a rank correlation of at least 0.7.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from hybrid_ray import mixed_tasks
from hybrid_ray.cli import _default_lengths, build_parser, main
from hybrid_ray.errors import HistoryError, WorkloadError
from hybrid_ray.history import HistoryRow, load_history
from hybrid_ray.metrics import spearman, summarize
from hybrid_ray.openai_batch import read_batch
from hybrid_ray.payload import Payload, SamplingSpec
from hybrid_ray.planning import build_scheduler
from hybrid_ray.policies import learned
from hybrid_ray.policies.learned import LearnedPredictor, features
from hybrid_ray.policies.predict import make_predictor, predict_quantiles
from hybrid_ray.promptinfo import prompt_info
from hybrid_ray.schedulers import policy_names
from hybrid_ray.simulator import simulate
from hybrid_ray.tokens import count_prompt_tokens, estimate_tokens
from hybrid_ray.workload import Request, load_file, load_workload, mixed_task_requests

from helpers import cluster


@pytest.fixture(scope="module")
def mixed():
    """(workload of 1,000, history of 600 with a disjoint seed), as the docs' measurement (there 3,000)."""
    work = mixed_task_requests(1000, 0)
    hist = [HistoryRow(q.prompt_tokens, q.output_tokens, q) for q in mixed_task_requests(600, 1)]
    return work, hist


@pytest.fixture(scope="module")
def fitted(mixed):
    work, hist = mixed
    return make_predictor("learned", work, seed=0, history=hist)


def _truth(reqs) -> np.ndarray:
    return np.array([q.output_tokens for q in reqs], dtype=float)


# -- what it may read ---------------------------------------------------------------------------------

_SLOT = Request.__dict__["output_tokens"]


class Poisoned(Request):
    """A request whose true length cannot be read: any read fails the test."""

    @property
    def output_tokens(self):
        raise AssertionError("a length predictor read Request.output_tokens")

    @output_tokens.setter
    def output_tokens(self, value):
        _SLOT.__set__(self, value)


def _poison(q: Request) -> Poisoned:
    return Poisoned(q.id, q.prompt_tokens, 10 ** 6, q.arrival_s, q.payload, q.info)


def test_never_reads_the_true_output(mixed, fitted):
    work, hist = mixed
    poisoned = [_poison(q) for q in work[:200]]
    p = LearnedPredictor(poisoned, [HistoryRow(r[0], r[1], _poison(r.request)) for r in hist], seed=0)
    for q, bad in zip(work[:200], poisoned):
        assert p.quantiles(bad) == fitted.quantiles(q)
        p.observe(bad, 7)                                  # the length it learns is the one it is told
    # a request it never saw goes through the model: the same answer whatever its output says
    other = dataclasses.replace(work[0], id="unseen")
    assert fitted.quantiles(_poison(other)) == fitted.quantiles(dataclasses.replace(other, output_tokens=1))
    assert np.array_equal(features(_poison(other))[0], features(other)[0])


# -- the distribution -----------------------------------------------------------------------------------

def test_quantiles_are_monotone_and_capped_at_max_tokens(mixed, fitted):
    work, _ = mixed
    for q in work:
        p50, p90 = fitted.quantiles(q)
        assert 1 <= p50 <= p90 <= q.info.max_tokens
        assert fitted.predict(q) == p50 == predict_quantiles(fitted, q)[0]
    story = next(q for q in work if "story" in q.info.text and q.info.max_tokens == 1024)
    tight = dataclasses.replace(story, id="tight", info=dataclasses.replace(story.info, max_tokens=5))
    assert fitted.quantiles(tight) == (5, 5)
    eos = Payload((1, 2, 3), SamplingSpec(max_tokens=77, ignore_eos=True))
    assert fitted.quantiles(Request("eos", 3, 77, payload=eos)) == (77, 77)
    assert predict_quantiles(make_predictor("oracle", work), work[0]) == (work[0].output_tokens,) * 2
    covered = np.mean([q.output_tokens <= fitted.quantiles(q)[1] for q in work])
    assert 0.75 <= covered <= 0.97                        # p90 covers about 90 %


@pytest.mark.parametrize("backend", ["sklearn", "numpy"])
def test_rank_correlation_on_mixed_tasks_with_600_history(mixed, backend, monkeypatch):
    if backend == "sklearn":
        pytest.importorskip("sklearn")
    else:
        monkeypatch.setitem(sys.modules, "sklearn", None)     # `import sklearn` raises ImportError
        assert not learned.sklearn_available()
    work, hist = mixed
    p = make_predictor("learned", work, seed=0, history=hist)
    assert p.model.backend == backend
    pred = np.array([p.predict(q) for q in work], dtype=float)
    rho = spearman(pred, _truth(work))
    assert rho >= 0.7, rho
    # today's prompt-bucket predictors rank far worse on the same history
    assert spearman(np.array([make_predictor("quantile", work, history=hist).predict(q) for q in work], float),
                    _truth(work)) < 0.6


def test_rank_correlation_at_start_in_a_simulated_run(mixed):
    work, hist = mixed
    cl = cluster(count=4, max_batch=32, kv=20_000)
    s = summarize(simulate(cl, build_scheduler("lpt-engine", cl, work, lengths="learned", history=hist), work))
    assert s.length_predictor == "learned" and s.requests_completed == len(work)
    assert s.prediction_spearman >= 0.7 and s.prediction_spearman_start >= 0.7
    assert s.prediction_mae_start is not None


def test_deterministic_given_a_seed(mixed):
    work, hist = mixed
    a = make_predictor("learned", work[:300], seed=3, history=hist)
    b = make_predictor("learned", work[:300], seed=3, history=hist)
    assert a.snapshot().values == b.snapshot().values
    for q, n in zip(work[:120], _truth(work[:120])):
        a.observe(q, int(n))
        b.observe(q, int(n))
    assert a.version == b.version and a.snapshot().values == b.snapshot().values


def test_learns_from_completions_without_history():
    work = mixed_task_requests(400, 2)
    p = make_predictor("learned", work, seed=0)
    assert p.model is None and p.predict(work[0]) == min(256, work[0].info.max_tokens)   # online's prior
    for q in work[:200]:
        p.observe(q, q.output_tokens)
    assert p.model is not None and p.fits >= 3 and p.version >= 1
    rest = work[200:]
    assert spearman(np.array([p.predict(q) for q in rest], float), _truth(rest)) >= 0.7


def test_snapshot_is_plain_data_and_predicts_unseen_requests(fitted, mixed):
    import pickle

    table = pickle.loads(pickle.dumps(fitted.snapshot()))
    work, _ = mixed
    assert table.predict(work[3]) == fitted.predict(work[3])
    unseen = dataclasses.replace(work[3], id="never-seen")
    assert table.quantiles(unseen) == fitted.quantiles(unseen)


# -- workload files with text ---------------------------------------------------------------------------

def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_workload_file_text_is_a_feature_and_prompt_tokens_what_is_charged(tmp_path):
    path = _write(tmp_path, "w.jsonl", [
        {"id": "a", "prompt": "Translate into French: the cat", "prompt_tokens": 40, "output_tokens": 9,
         "max_tokens": 64, "model": "m1"},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "output_tokens": 3},
        {"id": "c", "prompt": "Write a story about a dragon", "output_tokens": 300}])
    a, b, c = load_file(path)
    assert a.prompt_tokens == 40 and a.info.kind == "completion" and a.info.model == "m1" and a.info.max_tokens == 64
    assert b.info.kind == "chat" and b.info.prefix and "Be brief." in b.info.text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (b.prompt_tokens, c.prompt_tokens) == tuple(count_prompt_tokens([msgs, "Write a story about a dragon"]))
    assert load_file(_write(tmp_path, "plain.jsonl", [{"prompt_tokens": 5, "output_tokens": 3}]))[0].info is None


def test_bundled_tokenizer_is_the_tiny_models():
    pytest.importorskip("tokenizers")
    from hybrid_ray.engines.tiny_model import TinyModelArgs
    from hybrid_ray.tokens import BUNDLED_VOCAB, bundled_tokenizer, train_bpe

    text = "Janet's ducks lay 16 eggs per day."
    assert TinyModelArgs().vocab == BUNDLED_VOCAB              # the model directory's tokenizer is this one
    assert bundled_tokenizer().encode(text).ids == train_bpe(TinyModelArgs().vocab).encode(text).ids
    assert count_prompt_tokens([text], tokenizer=len) == [len(text)]
    assert estimate_tokens(text) == -(-len(text) // 4)


@pytest.mark.parametrize("line, needle", [
    ({"prompt": 42, "output_tokens": 3}, "prompt must be a string"),
    ({"prompt": ["a", "b"], "output_tokens": 3}, "prompt must be a string"),
    ({"output_tokens": 3}, "no 'prompt' or 'messages'"),
    ({"messages": "hi", "output_tokens": 3}, "messages must be a non-empty list"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}], "output_tokens": 3}, "not both"),
    ({"prompt": "x", "output_tokens": 30, "max_tokens": 8}, "exceeds max_tokens"),
])
def test_bad_workload_lines_are_one_line_naming_file_and_line(tmp_path, capsys, line, needle):
    path = _write(tmp_path, "bad.jsonl", [{"prompt_tokens": 5, "output_tokens": 3}, line])
    with pytest.raises(WorkloadError, match=needle):
        load_file(path)
    assert main(["simulate", "--workload", str(path), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 2" in err and needle in err and err.count("\n") == 1


# -- --history --------------------------------------------------------------------------------------------

def test_history_from_a_workload_file_with_text(tmp_path):
    path = mixed_tasks.write_jsonl(tmp_path / "hist.jsonl", 50, seed=1)
    rows = load_history(path)
    assert len(rows) == 50 and all(r.request is not None and r.request.info.text for r in rows)
    assert [tuple(r) for r in rows] == [(q.prompt_tokens, q.output_tokens) for q in mixed_task_requests(50, 1)]


def test_history_from_a_batch_output_joined_with_its_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{k}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "m", "max_tokens": 50, "messages": [
                                           {"role": "system", "content": "You label."},
                                           {"role": "user", "content": f"label item {k}"}]}}) + "\n"
                           for k in range(3)))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": f"x{k}", "custom_id": f"c{k}", "error": None, "response": {
        "status_code": 200, "body": {"usage": {"prompt_tokens": 12, "completion_tokens": 3 + k}}}}) + "\n"
                           for k in range(3)))
    rows = load_history([out, inp])
    assert [tuple(r) for r in rows] == [(12, 3), (12, 4), (12, 5)]
    assert all(r.request.info.kind == "chat" and r.request.info.prefix for r in rows)
    assert [tuple(r) for r in load_history(out)] == [(12, 3), (12, 4), (12, 5)]     # counts only
    with pytest.raises(HistoryError, match="holds no output lengths"):
        load_history(inp)
    batch = tmp_path / "b.jsonl"                          # a batch input with the true lengths in it
    mixed_tasks.write_jsonl(batch, 20, seed=1, fmt="batch")
    assert [tuple(r) for r in load_history(batch)] == [(q.prompt_tokens, q.output_tokens)
                                                        for q in mixed_task_requests(20, 1)]


@pytest.mark.parametrize("lines, needle", [
    ([{"prompt": 7, "output_tokens": 2}], "line 1: prompt must be a string"),
    ([{"prompt_tokens": 5}], "line 1: missing key 'output_tokens'"),
    (["", "  "], "no finished request"),
])
def test_bad_history_is_one_line_exit_2(tmp_path, capsys, lines, needle):
    path = _write(tmp_path, "h.jsonl", lines) if lines[0] != "" else tmp_path / "h.jsonl"
    if lines[0] == "":
        path.write_text("\n\n")
    with pytest.raises(HistoryError):
        load_history(path)
    assert main(["simulate", "--config", "paper_llama65b", "--limit", "20", "--lengths", "learned",
                 "--history", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid-ray: error: --history") and str(path) in err and needle in err
    assert err.count("\n") == 1


# -- the generator and the command line ---------------------------------------------------------------

def test_generator_is_seeded_and_outputs_differ_by_task():
    a, tasks = mixed_task_requests(500, 0), mixed_tasks.tasks(500, 0)
    assert a == mixed_task_requests(500, 0) and a != mixed_task_requests(500, 1)
    assert set(tasks) == set(mixed_tasks.TASKS)
    by = {t: np.median([q.output_tokens for q, k in zip(a, tasks) if k == t]) for t in mixed_tasks.TASKS}
    assert by["classification"] < 10 < by["summary"] < by["story"] and by["math"] < by["story"]
    for q in a:
        assert q.output_tokens <= q.info.max_tokens and q.prompt_tokens >= 1 and q.arrival_s == 0.0
    assert load_workload("mixed-tasks:500") == a and len(load_workload("mixed-tasks", limit=10)) == 10


def test_make_workload_and_default_lengths(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    assert main(["make-workload", "mixed-tasks", "--n", "40", "--seed", "1", "-o", str(path)]) == 0
    assert load_file(path) == mixed_task_requests(40, 1)
    batch = tmp_path / "b.jsonl"
    assert main(["make-workload", "mixed-tasks", "--n", "40", "--format", "batch", "-o", str(batch)]) == 0
    got = read_batch(batch).requests
    assert [(q.prompt_tokens, q.output_tokens) for q in got] == [(q.prompt_tokens, q.output_tokens)
                                                                for q in mixed_task_requests(40, 0)]
    parser = build_parser()
    for argv, want in ((["run", "-i", str(batch)], "learned"), (["simulate", "-i", str(batch)], "learned"),
                       (["run", "--workload", "gsm8k"], "oracle"), (["simulate", "--workload", str(path)], "oracle"),
                       (["run", "-i", str(batch), "--lengths", "online"], "online")):
        args = parser.parse_args(argv)
        _default_lengths(args)
        assert args.lengths == want, argv
    assert main(["simulate", "-i", str(batch), "--policy", "lpt-engine", "--history", str(path)]) == 0
    assert "length prediction (learned)" in capsys.readouterr().out


def test_batch_lines_carry_prompt_info(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9}}) + "\n")
    (q,) = read_batch(path).requests
    assert q.info.token_ids == (5, 6, 7) and q.info.kind == "completion" and q.info.max_tokens == 9
    assert prompt_info(text="x" * 10_000).text.__len__() < 3000


# -- no policy reads a true length before the finish, with the learned predictor -----------------------

@pytest.mark.parametrize("policy", policy_names())
def test_no_policy_reads_true_lengths_with_learned_lengths(policy):
    import os

    import hybrid_ray

    pkg = os.path.dirname(hybrid_ray.__file__) + os.sep
    allowed = {("replica.py", "complete"), ("replica.py", "finish_early")}   # the engine ends the sequence
    peeks = []

    class Spy(Request):
        @property
        def output_tokens(self):
            f = sys._getframe(1)
            while f is not None and not f.f_code.co_filename.startswith(pkg):
                f = f.f_back
            if f is not None and (os.path.basename(f.f_code.co_filename), f.f_code.co_name) not in allowed:
                peeks.append((f.f_code.co_filename[len(pkg):], f.f_code.co_name))
            return _SLOT.__get__(self, Request)

        @output_tokens.setter
        def output_tokens(self, value):
            _SLOT.__set__(self, value)

    plain = mixed_task_requests(60, 4)
    reqs = [Spy(q.id, q.prompt_tokens, q.output_tokens, 0.0 if k < 40 else 0.2 * (k - 39), None, q.info)
            for k, q in enumerate(plain)]
    hist = [HistoryRow(q.prompt_tokens, q.output_tokens, q) for q in mixed_task_requests(80, 1)]
    cl = cluster(count=2, max_batch=8, kv=20_000)
    rec = simulate(cl, build_scheduler(policy, cl, reqs, lengths="learned", history=hist, seed=2,
                                       time_limit_s=0.5), reqs)
    assert peeks == [], f"{policy} read true lengths at {sorted(set(peeks))[:5]}"
    assert all(s.finish_s >= 0 for s in rec.sequences)


@pytest.mark.ray
def test_run_with_learned_lengths_pushes_its_tables_to_replicas(ray_session, tmp_path):
    from hybrid_ray.inputs import load_inputs
    from hybrid_ray.runtime import RunOptions, run

    hist = mixed_tasks.write_jsonl(tmp_path / "hist.jsonl", 100, seed=1)
    cluster, requests = load_inputs("paper_llama65b", "mixed-tasks:200")
    cluster = dataclasses.replace(cluster, policy={"hybrid": {"dispatch": "plan"}})
    res = run(RunOptions(config="paper_llama65b", policy="hybrid", lengths="learned", history=[str(hist)],
                         plan_method="lpt", cpus_per_replica=1.0, progress=False), cluster=cluster, requests=requests)
    s, data = res.summary, res.to_dict()
    assert s.requests_completed == 200 and s.length_predictor == "learned"
    assert s.prediction_spearman >= 0.7
    assert res.record.extra["prediction_versions"] >= data["messages"]["set_predictions"] >= 1
