"""The pure parts of the side-by-side bench (hybrid_ray/bench/vs_vllm.py); nothing here needs vLLM."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybrid_ray.bench import vs_vllm as vs
from hybrid_ray.openai_batch import read_batch

CPU_TINY = str(Path(__file__).resolve().parents[1] / "cluster_configs" / "cpu_tiny.yaml")


def test_batch_lines_are_greedy_chat_lines(tmp_path):
    qs = ["What is 2 + 2?", "Janet has 3 ducks.", "A robe takes 2 bolts."]
    lines = vs.make_batch_lines(qs, max_tokens=64)
    assert [ln["custom_id"] for ln in lines] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    for ln, q in zip(lines, qs):
        assert ln["method"] == "POST" and ln["url"] == "/v1/chat/completions"
        b = ln["body"]
        assert b["messages"] == [{"role": "user", "content": q}]
        assert b["max_tokens"] == 64 and b["temperature"] == 0.0 and b["seed"] == 0
    path = vs.write_jsonl(tmp_path / "b.jsonl", lines)
    assert vs.read_jsonl(path) == lines
    batch = read_batch(path)                   # hybrid-ray's own reader accepts every line
    assert not batch.errors and [r.id for r in batch.requests] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert all(r.output_tokens == 64 for r in batch.requests)


def test_load_questions_first_n(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(5)))
    assert vs.load_questions(p, 3) == ["q0", "q1", "q2"]
    with pytest.raises(ValueError):
        vs.load_questions(p, 6)


def test_least_loaded_alternates_for_a_batch():
    assert vs.least_loaded(5, 2) == [0, 1, 0, 1, 0]
    assert vs.least_loaded(7, 3) == [0, 1, 2, 0, 1, 2, 0]
    assert vs.least_loaded(4, 2, outstanding=[3, 0]) == [1, 1, 1, 0]   # fills the idle one first
    assert vs.least_loaded(0, 2) == []
    with pytest.raises(ValueError):
        vs.least_loaded(3, 0)
    parts = vs.route(list("abcde"), 2)
    assert parts == [["a", "c", "e"], ["b", "d"]]


def test_split_even_is_contiguous_and_balanced():
    items = list(range(11))
    parts = vs.split_even(items, 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert sum(parts, []) == items
    assert vs.split_even(list(range(200)), 2) == [list(range(100)), list(range(100, 200))]
    assert vs.split_even([1], 2) == [[1], []]
    with pytest.raises(ValueError):
        vs.split_even(items, 0)


def test_span_is_last_end_minus_first_start():
    assert vs.span([10.0, 10.5], [12.0, 13.25]) == pytest.approx(3.25)
    with pytest.raises(ValueError):
        vs.span([], [])


def test_ratios_against_a():
    rows = {"a": {"makespan_s": 10.0, "wall_s": 60.0, "output_tokens": 2000},
            "b": {"makespan_s": 8.0, "wall_s": 30.0, "output_tokens": 2000},
            "c": {"makespan_s": 20.0, "wall_s": 90.0, "output_tokens": 1000},
            "d": {"error": "needs a GPU", "wall_s": 5.0}}
    vs.with_ratios(rows)
    assert rows["a"]["tok_s"] == pytest.approx(200.0)
    assert rows["a"]["makespan_x"] == rows["a"]["wall_x"] == rows["a"]["tok_s_x"] == pytest.approx(1.0)
    assert rows["b"]["makespan_x"] == pytest.approx(0.8)
    assert rows["b"]["wall_x"] == pytest.approx(0.5)
    assert rows["b"]["tok_s"] == pytest.approx(250.0) and rows["b"]["tok_s_x"] == pytest.approx(1.25)
    assert rows["c"]["tok_s"] == pytest.approx(50.0) and rows["c"]["tok_s_x"] == pytest.approx(0.25)
    assert rows["d"]["tok_s"] is None and rows["d"]["makespan_x"] is None
    assert rows["d"]["wall_x"] == pytest.approx(5.0 / 60.0)


def test_ratios_without_a_reference():
    rows = {"b": {"makespan_s": 2.0, "wall_s": 10.0, "output_tokens": 100}}
    vs.with_ratios(rows)
    assert rows["b"]["tok_s"] == pytest.approx(50.0) and rows["b"]["makespan_x"] is None


def test_table_formatting():
    rows = {"a": {"makespan_s": 10.0, "wall_s": 60.0, "output_tokens": 25600},
            "b": {"makespan_s": 8.0, "wall_s": 30.0, "output_tokens": 25600},
            "d": {"error": "Ray Data LLM asks for a GPU", "wall_s": 12.34}}
    md = vs.format_table(vs.with_ratios(rows))
    lines = md.splitlines()
    assert lines[0].startswith("| system | makespan")
    assert all(ln.count("|") == lines[0].count("|") for ln in lines[:4])
    assert lines[2].startswith("| (a) hybrid-ray") and "| 10.00 s | 60.0 s | 25,600 | 2,560 | 1.00x | 1.00x | 1.00x |" in lines[2]
    assert "| 8.00 s | 30.0 s | 25,600 | 3,200 | 0.80x | 0.50x | 1.25x |" in lines[3]
    assert "did not run: Ray Data LLM asks for a GPU | 12.3 s | - |" in lines[4]


def test_agreement_counts_identical_lines():
    ids = ["x", "y", "z"]
    texts = {"a": {"x": "1", "y": "2", "z": "3"}, "b": {"x": "1", "y": "2", "z": "4"}, "c": {"x": "1", "y": "9"}}
    ag = vs.agreement(texts, ids)
    assert ag["pairs"] == {"a=b": 2, "a=c": 1, "b=c": 1}
    assert ag["all"] == 1 and ag["lines"] == 3
    s = vs.format_agreement(ag)
    assert "(a) = (b) 2/3" in s and "all of (a), (b), (c): 1/3" in s


def test_openai_output_texts(tmp_path):
    ok = {"id": "1", "custom_id": "q1", "error": None, "response": {"status_code": 200, "body": {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2}}}}
    bad = {"id": "2", "custom_id": "q2", "response": {"status_code": 404, "body": None},
           "error": {"message": "no such model"}}
    p = vs.write_jsonl(tmp_path / "o.jsonl", [ok, bad])
    assert vs.openai_output_texts(p) == {"q1": ("hi", 2, "stop")}


def test_engine_limits_match_what_hybrid_ray_gives_vllm():
    lim = vs.engine_limits(CPU_TINY)
    assert lim["max_num_seqs"] == 8
    assert lim["max_num_batched_tokens"] == max(2048 + 8, 2048)
    assert lim["num_gpu_blocks_override"] == math.ceil((2048 + 8 * 16) / 16)
    assert "enable_prefix_caching" not in lim              # vLLM's default (on), as every system runs


def test_run_batch_arguments():
    class O:
        model, max_model_len, run_batch_defaults = "/m", 1024, False
    args = vs.run_batch_args(O, "in.jsonl", "out.jsonl", vs.engine_limits(CPU_TINY))
    assert args[:6] == ["-i", "in.jsonl", "-o", "out.jsonl", "--model", "/m"]
    assert "--enforce-eager" in args and args[args.index("--max-num-seqs") + 1] == "8"
    assert args[args.index("--served-model-name") + 1] == vs.MODEL_NAME
    O.run_batch_defaults = True
    assert "--max-num-seqs" not in vs.run_batch_args(O, "i", "o", {})


def test_ignore_eos_lines(tmp_path):
    lines = vs.make_batch_lines(["q"], max_tokens=16, ignore_eos=True)
    assert lines[0]["body"]["ignore_eos"] is True
    assert "ignore_eos" not in vs.make_batch_lines(["q"])[0]["body"]
    batch = read_batch(vs.write_jsonl(tmp_path / "b.jsonl", lines))
    assert not batch.errors and batch.requests[0].output_tokens == 16


def test_a_shared_system_prompt_heads_every_line_and_limits_keep_prefix_caching_on():
    sysp = vs.shared_system_prompt(200)
    assert len(sysp.split()) >= 200 and sysp == vs.shared_system_prompt(200)
    lines = vs.make_batch_lines(["a", "b"], system=sysp)
    assert [ln["body"]["messages"][0] for ln in lines] == [{"role": "system", "content": sysp}] * 2
    assert [ln["body"]["messages"][1]["content"] for ln in lines] == ["a", "b"]
    assert "enable_prefix_caching" not in vs.engine_limits("cpu_vllm")          # vLLM's default: on
    o = vs.parse_args(["--model", "M"])
    assert "--no-enable-prefix-caching" not in vs.run_batch_args(o, "in", "out", vs.engine_limits("cpu_vllm"))
