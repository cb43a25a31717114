"""OpenAI batch files: parsing, token sources, malformed lines, output lines, resume, simulate / plan / run."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from dataclasses import replace

import pytest

from hybrid_ray.cli import build_parser, main
from hybrid_ray.config import load_cluster
from hybrid_ray.inputs import load_inputs
from hybrid_ray.openai_batch import (CHARS_PER_TOKEN, CHAT_MESSAGE_OVERHEAD_TOKENS, DEFAULT_MAX_TOKENS, BatchLine,
                                     BatchLineError,
                                     BatchPath, check_batch_feasible, estimate_tokens, format_error, format_success,
                                     is_batch_workload, output_lines, parse_line, prepare_batch_run, read_batch,
                                     read_output)
from hybrid_ray.results import CompletionRecord, ErrorLine, ResultsWriter
from hybrid_ray.runtime import RunOptions, run

COMP, CHAT = "/v1/completions", "/v1/chat/completions"


def _line(cid, body, url=COMP, method="POST") -> str:
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


def _parse(cid="q", body=None, url=COMP, **kw) -> BatchLine:
    out = parse_line(_line(cid, body if body is not None else {"prompt": "hello world"}, url), 1, **kw)
    assert isinstance(out, BatchLine), out
    return out


# -- parsing ----------------------------------------------------------------------------------------

def test_documented_estimate():
    assert CHARS_PER_TOKEN == 4 and CHAT_MESSAGE_OVERHEAD_TOKENS == 4
    assert DEFAULT_MAX_TOKENS == {COMP: 16, CHAT: 256}
    assert [estimate_tokens("x" * n) for n in (1, 4, 5, 8, 401)] == [1, 1, 2, 2, 101]


def test_completions_body():
    b = _parse("c1", {"model": "llama", "prompt": "x" * 41, "max_tokens": 7})
    assert b.request.id == b.custom_id == "c1" and b.url == COMP and b.model == "llama"
    assert b.request.prompt_tokens == 11 and b.prompt_source == "estimate"       # ceil(41 / 4)
    assert b.request.output_tokens == b.max_tokens == 7 and b.request.arrival_s == 0.0
    default = _parse("c2", {"prompt": ["x" * 8]})                                 # a list holding one prompt
    assert default.request.output_tokens == 16 and default.request.prompt_tokens == 2
    assert default.model == "hybrid-ray-emulated"
    ids = _parse("c3", {"prompt": [5, 6, 7, 8, 9], "max_tokens": 3})              # token ids: exact
    assert ids.request.prompt_tokens == 5 and ids.prompt_source == "prompt_token_ids"
    assert _parse("c4", {"prompt": [[1, 2, 3]]}).request.prompt_tokens == 3


def test_chat_body():
    msgs = [{"role": "system", "content": "x" * 10},
            {"role": "user", "content": [{"type": "text", "text": "y" * 7}, {"type": "image_url", "image_url": {}},
                                         {"type": "text", "text": "z"}]},
            {"role": "assistant", "content": None}]
    b = _parse("h", {"messages": msgs, "max_tokens": 99, "max_completion_tokens": 40}, CHAT)
    assert b.request.prompt_tokens == (4 + 3) + (4 + 2) + (4 + 0)                # 4 + ceil(chars / 4) each
    assert b.request.output_tokens == 40                                          # max_completion_tokens wins
    assert _parse("h", {"messages": msgs[:1], "max_tokens": 99}, CHAT).request.output_tokens == 99
    assert _parse("h", {"messages": msgs[:1]}, CHAT).request.output_tokens == 256
    assert _parse("h", {"messages": msgs[:1]}, CHAT, chat_max_tokens=64).request.output_tokens == 64


@pytest.mark.parametrize("extra, tokenizer, expected, source", [
    ({"prompt_token_ids": [1] * 9, "prompt_tokens": 50}, len, 9, "prompt_token_ids"),
    ({"prompt_tokens": 50}, len, 50, "prompt_tokens"),
    ({}, len, 40, "tokenizer"),                        # the "tokenizer" here counts characters
    ({}, None, 10, "estimate"),
])
def test_prompt_token_sources_in_priority_order(extra, tokenizer, expected, source):
    b = _parse("p", {"prompt": "a" * 40, **extra}, tokenizer=tokenizer)
    assert (b.request.prompt_tokens, b.prompt_source) == (expected, source)


def test_tokenizer_for_chat_adds_message_overhead():
    b = _parse("p", {"messages": [{"role": "user", "content": "abc"}, {"role": "user", "content": "de"}]}, CHAT,
               tokenizer=len)
    assert b.request.prompt_tokens == (4 + 3) + (4 + 2) and b.prompt_source == "tokenizer"


def test_explicit_output_tokens_bounded_by_max_tokens():
    assert _parse("o", {"prompt": "a", "max_tokens": 50, "output_tokens": 12}).request.output_tokens == 12
    capped = _parse("o", {"prompt": "a", "max_tokens": 50, "output_tokens": 80})
    assert capped.request.output_tokens == 50 and capped.max_tokens == 50


GOOD = {"prompt": "hello", "max_tokens": 4}


def test_sampling_fields_are_parsed_with_vllm_defaults():
    from hybrid_ray.openai_batch import _sampling

    default = _sampling({}, 16)
    assert (default.max_tokens, default.temperature, default.top_p, default.top_k, default.seed, default.stop,
            default.presence_penalty, default.frequency_penalty, default.ignore_eos) == \
        (16, 1.0, 1.0, 0, None, (), 0.0, 0.0, False)
    sp = _sampling({"temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 3, "stop": "\n\n",
                    "presence_penalty": 1, "frequency_penalty": -0.5, "ignore_eos": True}, 8)
    assert sp.greedy and (sp.top_p, sp.top_k, sp.seed, sp.stop) == (0.5, 0, 3, ("\n\n",))
    assert (sp.presence_penalty, sp.frequency_penalty, sp.ignore_eos) == (1.0, -0.5, True)
    assert _sampling({"stop": ["a", "bc"], "temperature": None}, 8).stop == ("a", "bc")   # null = default
    b = _parse("s", {"prompt": "hi", "temperature": 0.7, "stop": ["x"], "user": "u1", "logprobs": None})
    assert b.request.payload is None                    # emulated: counts only, as before


@pytest.mark.parametrize("extra, words", [
    ({"logprobs": 2}, "body.logprobs is not supported"),
    ({"logit_bias": {"5": 1}}, "body.logit_bias is not supported"),
    ({"tools": [{"type": "function"}]}, "body.tools is not supported"),
    ({"response_format": {"type": "json_object"}}, "body.response_format is not supported"),
    ({"n": 2}, "body.n = 2"),
    ({"stream": True}, "stream"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k must be an integer >= -1"),
    ({"top_k": 2.5}, "top_k must be an integer >= -1"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"stop": ""}, "stop must be a non-empty string"),
    ({"stop": ["a", 3]}, "stop must be a non-empty string"),
    ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
])
def test_unsupported_or_out_of_range_sampling_is_an_error_line(extra, words):
    out = parse_line(_line("q", {"prompt": "hi", **extra}), 3)
    assert isinstance(out, BatchLineError) and out.code == "invalid_request" and out.custom_id == "q"
    assert out.message.startswith("line 3: ") and words in out.message


@pytest.mark.parametrize("bad, cid, code", [
    ('{"custom_id": "x", "method": ', "line-2", "invalid_json_line"),
    ("[1, 2, 3]", "line-2", "invalid_json_line"),
    (json.dumps({"method": "POST", "url": COMP, "body": GOOD}), "line-2", "missing_required_parameter"),
    (json.dumps({"custom_id": 7, "method": "POST", "url": COMP, "body": GOOD}), "line-2",
     "missing_required_parameter"),
    (json.dumps({"custom_id": "b", "method": "POST", "url": COMP}), "b", "missing_required_parameter"),
    (json.dumps({"custom_id": "b", "method": "POST", "body": GOOD}), "b", "missing_required_parameter"),
    (_line("b", GOOD, url="/v1/embeddings"), "b", "invalid_url"),
    (_line("b", GOOD, method="GET"), "b", "invalid_method"),
    (_line("b", {"prompt": "hi", "max_tokens": 0}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "max_tokens": -3}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "max_tokens": "16"}), "b", "invalid_request"),
    (_line("b", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, CHAT), "b",
     "invalid_request"),
    (_line("b", {"prompt": ""}), "b", "invalid_request"),
    (_line("b", {"prompt": []}), "b", "invalid_request"),
    (_line("b", {"max_tokens": 3}), "b", "missing_required_parameter"),
    (_line("b", {"messages": []}, CHAT), "b", "invalid_request"),
    (_line("b", {"messages": [{"content": "no role"}]}, CHAT), "b", "invalid_request"),
    (_line("b", {"prompt": ["one", "two"]}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "n": 2}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "stream": True}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "prompt_tokens": 0}), "b", "invalid_request"),
    (_line("b", {"prompt": "hi", "prompt_token_ids": []}), "b", "invalid_request"),
    (_line("a", GOOD), "a", "duplicate_custom_id"),            # line 1 already has custom_id "a"
])
def test_malformed_line_is_one_error_and_the_rest_parses(tmp_path, bad, cid, code):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line("a", GOOD), bad, _line("c", GOOD)]) + "\n\n")
    batch = read_batch(path)
    assert [q.id for q in batch.requests] == ["a", "c"] and batch.ids == {"a": "a", "c": "c"}
    assert len(batch.errors) == 1 and batch.n_lines == 3
    e = batch.errors[0]
    assert (e.custom_id, e.line, e.code) == (cid, 2, code)
    assert e.message.startswith("line 2: ")
    out = e.to_output()
    assert out["custom_id"] == cid and out["response"] is None and out["error"]["code"] == code
    assert out["error"]["line"] == 2


def test_duplicate_of_a_malformed_line_is_a_duplicate(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line("a", {"prompt": ""}), _line("a", GOOD), "oops", _line("b", GOOD)]) + "\n")
    batch = read_batch(path)
    assert [q.id for q in batch.requests] == ["b"]
    assert [(e.custom_id, e.line, e.code) for e in batch.errors] == [
        ("a", 1, "invalid_request"), ("a", 2, "duplicate_custom_id"), ("line-3", 3, "invalid_json_line")]


def test_limit_seed_empty_and_missing(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_line(f"r{i}", GOOD) for i in range(10)) + "\n")
    assert [q.id for q in read_batch(path, limit=3).requests] == ["r0", "r1", "r2"]
    sample = [q.id for q in read_batch(path, limit=4, seed=1).requests]
    assert len(sample) == 4 and sample == sorted(sample, key=lambda s: int(s[1:]))
    from hybrid_ray.errors import WorkloadError
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(WorkloadError, match="empty OpenAI batch file"):
        read_batch(tmp_path / "empty.jsonl")
    with pytest.raises(WorkloadError, match="no such OpenAI batch file"):
        read_batch(tmp_path / "nope.jsonl")


def test_too_long_for_every_replica_is_an_error_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(_line("ok", GOOD) + "\n" + _line("huge", {"prompt_tokens": 39_990, "prompt": "x",
                                                              "max_tokens": 20}) + "\n")
    batch = check_batch_feasible(read_batch(path), load_cluster("local"))       # KV 40,000 tokens
    assert [q.id for q in batch.requests] == ["ok"] and list(batch.lines) == ["ok"]
    (e,) = batch.errors
    assert (e.custom_id, e.code, e.line) == ("huge", "context_length_exceeded", 2) and "40000" in e.message


def test_detection(tmp_path):
    batch, plain = tmp_path / "b.jsonl", tmp_path / "p.jsonl"
    batch.write_text("garbage\n" + _line("a", GOOD) + "\n")
    plain.write_text('{"prompt_tokens": 3, "output_tokens": 4}\n')
    assert is_batch_workload(str(batch)) and is_batch_workload(batch)
    assert not is_batch_workload(str(plain)) and not is_batch_workload("gsm8k")
    assert not is_batch_workload(str(tmp_path / "missing.jsonl"))
    assert is_batch_workload(BatchPath(str(plain)))                  # -i forces the batch reading
    _, reqs = load_inputs("local", str(plain))                       # the plain loader is untouched
    assert reqs[0].prompt_tokens == 3 and reqs[0].id == "p-1"
    _, reqs = load_inputs("local", str(batch))
    assert [q.id for q in reqs] == ["a"]
    args = build_parser().parse_args(["run", "-i", str(batch), "-o", "out.jsonl"])
    assert isinstance(args.workload, BatchPath) and args.workload == str(batch) and args.output == "out.jsonl"
    assert build_parser().parse_args(["plan"]).workload == "gsm8k"


# -- output lines -------------------------------------------------------------------------------------

REC = CompletionRecord("q7", "llama7b-2", 0.0, 0.25, 1.5, 30, 16, 1)


def test_success_line_format():
    out = format_success(REC, "q7", url=COMP, model="m", max_tokens=16, created=123)
    assert set(out) == {"id", "custom_id", "response", "error", "hybrid_ray"}
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "q7" and out["error"] is None
    resp = out["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "m"
    assert body["created"] == 123
    assert body["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 30, "completion_tokens": 16, "total_tokens": 46}
    assert out["hybrid_ray"] == {"replica": "llama7b-2", "arrival_s": 0.0, "first_token_s": 0.25, "finish_s": 1.5,
                                 "preemptions": 1}
    chat = format_success(REC, "q7", url=CHAT, model="m", max_tokens=64)["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert chat["choices"][0]["finish_reason"] == "stop"                # 16 < max_tokens 64
    assert format_success(REC, "q7")["id"] == out["id"]                 # stable ids
    assert format_success(REC, "q8")["id"] != out["id"]


def test_error_line_format():
    out = format_error("line-4", "invalid_json_line", "line 4: invalid JSON", line=4)
    assert out == {"id": out["id"], "custom_id": "line-4", "response": None,
                   "error": {"code": "invalid_json_line", "message": "line 4: invalid JSON", "line": 4}}
    assert out["id"].startswith("batch_req_")


def test_output_file_read_back(tmp_path):
    """read_output understands OpenAI lines: records keyed by custom_id, errors, which ids they settle."""
    path = tmp_path / "out.jsonl"
    lines = [format_success(REC, "q7", max_tokens=16),
             format_error("line-4", "invalid_json_line", "bad", line=4),
             format_error("q1", "duplicate_custom_id", "dup", line=9),
             format_error("q2", "context_length_exceeded", "long", line=3),
             {"id": "vllm-1", "custom_id": "v", "response": {"status_code": 200, "body": {}}, "error": None},
             {"id": "vllm-2", "custom_id": "w", "response": {"status_code": 400}, "error": "boom"}]
    with ResultsWriter(path) as w:
        w.write_lines(json.dumps(x) for x in lines)
    res = read_output(path)
    assert res.records[0] == replace(REC, text="", finish_reason="length")   # the line's text and reason
    assert [r.id for r in res.records] == ["q7", "v"]
    assert [e.code for e in res.errors] == ["invalid_json_line", "duplicate_custom_id", "context_length_exceeded", ""]
    assert isinstance(res.errors[0], ErrorLine) and res.errors[0].line == 4
    assert res.ids == {"q7", "v", "q2", "w"}                 # line-keyed errors settle no request
    half = json.dumps(format_success(REC, "q9"))
    with path.open("a") as fh:
        fh.write(half[: len(half) // 2])
    assert read_output(path).truncated_tail
    with ResultsWriter(path, append=True, formatter=lambda r: json.dumps(format_success(r))) as w:
        w.write([REC])
    res = read_output(path)
    assert not res.truncated_tail and res.duplicates == ["q7"]


def test_reorder_puts_the_output_in_input_order(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([_line("a", GOOD), "nope", _line("b", GOOD), _line("c", {"prompt": ""}),
                              _line("d", GOOD)]) + "\n")
    batch = read_batch(inp)
    fmt = batch.output_format()
    rec = lambda cid: CompletionRecord(cid, "r-0", 0.0, 0.1, 0.2, 2, 4, 0)   # noqa: E731
    lines = [fmt.format(rec("d")), json.dumps({"custom_id": "zz", "response": None, "error": "other tool"}),
             fmt.format(rec("b")), *(json.dumps(e.to_output()) for e in batch.errors), fmt.format(rec("a"))]
    out.write_text("\n".join(lines) + "\n")
    fmt.finish(out)
    got = [(o["custom_id"], (o["error"] or {}).get("line") if isinstance(o["error"], dict) else o["error"])
           for o in output_lines(out)]
    assert got == [("a", None), ("line-2", 2), ("b", None), ("c", 4), ("d", None), ("zz", "other tool")]
    before = out.read_bytes()
    fmt.finish(out)
    assert out.read_bytes() == before                                   # idempotent


def test_resume_writes_error_lines_once(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([_line("a", GOOD), "nope", _line("b", {"prompt": ""}), _line("a", GOOD)]) + "\n")
    opts = RunOptions(config="local", workload=str(inp), output=str(out), progress=False)
    o1, cluster, reqs = prepare_batch_run(opts)
    assert [q.id for q in reqs] == ["a"] and o1.resume == str(out) and o1.output == str(out)
    first = out.read_text()
    assert len(first.splitlines()) == 3
    o2, _, _ = prepare_batch_run(opts)
    assert out.read_text() == first                            # not duplicated on resume
    assert o2.output_format is not None
    rec = CompletionRecord("a", "llama7b-0", 0.0, 0.1, 0.2, 2, 4, 0)
    assert json.loads(o2.output_format.format(rec))["response"]["body"]["usage"]["completion_tokens"] == 4
    assert prepare_batch_run(RunOptions(workload="gsm8k"))[2] is None       # other workloads: untouched


# -- simulate / plan / run on the same file -------------------------------------------------------------

def make_batch(path: Path, n: int, seed: int = 0) -> list[str]:
    """n lines, mostly valid (completions and chat), a few malformed; the custom_id each line's output has."""
    rng = random.Random(seed)
    lines, expect = [], []
    for i in range(n):
        cid = f"req-{i:04d}"
        if i % 100 == 17:
            lines.append('{"custom_id": "' + cid + '", "body": ')             # cut short: unparseable
            expect.append(f"line-{i + 1}")
            continue
        if i % 100 == 42:
            lines.append(_line(cid, {"prompt": "x", "max_tokens": 0}))
        elif i % 250 == 99:
            lines.append(_line("req-0000", GOOD))                             # duplicate custom_id
            expect.append("req-0000")
            continue
        elif i % 2:
            msgs = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "w " * rng.randint(20, 600)}]
            lines.append(_line(cid, {"model": "llama-7b", "messages": msgs,
                                     "max_completion_tokens": rng.randint(16, 256)}, CHAT))
        else:
            lines.append(_line(cid, {"model": "llama-7b", "prompt": "v " * rng.randint(20, 600),
                                     "max_tokens": rng.randint(16, 256)}))
        expect.append(cid)
    path.write_text("\n".join(lines) + "\n")
    return expect


def check_output(out: Path, expect: list[str]) -> tuple[int, int]:
    """Every input line has exactly one output line with its custom_id; return (success, error) counts."""
    objs = output_lines(out)
    first_line = {}
    for n, cid in enumerate(expect, 1):
        first_line.setdefault(cid, n)
    answered = Counter()
    for o in objs:
        line = o["error"]["line"] if o["error"] is not None else first_line[o["custom_id"]]
        assert expect[line - 1] == o["custom_id"]
        answered[line] += 1
    assert answered == Counter(range(1, len(expect) + 1))
    ok = sum(o["error"] is None for o in objs)
    return ok, len(objs) - ok


def assert_input_order(out, expect) -> None:
    """The output's lines follow the input's: each line's input position (error lines: their ``line``)
    increases down the file."""
    first_line = {}
    for n, cid in enumerate(expect, 1):
        first_line.setdefault(cid, n)
    at = [o["error"]["line"] if o["error"] is not None else first_line[o["custom_id"]] for o in output_lines(out)]
    assert at == sorted(at)


def test_simulate_and_plan_take_a_batch_file(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "sim.jsonl"
    expect = make_batch(inp, 300)
    assert main(["simulate", "-i", str(inp), "-o", str(out), "--json", str(tmp_path / "m.json")]) == 0
    ok, bad = check_output(out, expect)
    assert bad == 3 + 3 + 1 and ok == 300 - bad
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["requests_completed"] == ok
    finishes = [o["hybrid_ray"]["finish_s"] for o in output_lines(out) if o["error"] is None]
    assert max(finishes) == pytest.approx(data["makespan_s"])
    assert_input_order(out, expect)                  # as vllm run_batch writes it
    for o in output_lines(out):
        if o["error"] is None:
            usage = o["response"]["body"]["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert main(["plan", "-i", str(inp), "--method", "lpt"]) == 0
    assert "planned makespan" in capsys.readouterr().out
    assert main(["simulate", "--workload", str(inp), "--limit", "50"]) == 0     # auto-detected
    assert "simulating 48 requests" in capsys.readouterr().out


# -- on Ray ---------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_thousand_lines_end_to_end_on_ray(ray_session, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expect = make_batch(inp, 1000)
    assert main(["run", "-i", str(inp), "-o", str(out), "--config", "local", "--time-scale", "0.005",
                 "--no-progress", "--json", str(tmp_path / "m.json")]) == 0
    ok, bad = check_output(out, expect)
    data = json.loads((tmp_path / "m.json").read_text())
    assert bad == 10 + 10 + 4 and ok == 1000 - bad == data["requests_completed"]
    assert read_output(out).duplicates == []
    assert_input_order(out, expect)                               # rewritten in input order at the end
    assert data["failed_replicas"] == 0
    assert main(["run", "-i", str(inp), "-o", str(out), "--config", "local", "--no-progress"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert check_output(out, expect) == (ok, bad)                 # a rerun adds nothing


@pytest.mark.ray
def test_interrupted_batch_resumes_without_duplicates(ray_session, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expect = make_batch(inp, 1000, seed=1)

    class Crash(Exception):
        pass

    def hook(d):
        if d.done >= 300:
            raise Crash()

    opts = RunOptions(config="local", workload=str(inp), output=str(out), time_scale=0.005, progress=False)
    with pytest.raises(Crash):
        run(opts, hook=hook)
    before = read_output(out)
    assert 300 <= len(before.records) < 976 and len(before.errors) == 24
    half = json.dumps(format_success(REC, "req-0999"))
    with out.open("a") as fh:
        fh.write(half[: len(half) // 2])                           # the driver died mid-line
    res = run(opts)
    assert res.skipped == len(before.records)
    assert res.summary.requests_completed == 976 - len(before.records)
    after = read_output(out)
    assert after.duplicates == [] and not after.truncated_tail
    assert check_output(out, expect) == (976, 24)
    assert_input_order(out, expect)
