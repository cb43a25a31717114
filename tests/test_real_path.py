"""Real prompts in, real completions out: a batch file through the transformers engine gives, line for
line, what transformers' own ``generate`` gives on the same model (tokens, text, finish reason).

The model is the offline tiny LLaMA (``tiny_model_dir``): a real BPE tokenizer and chat template,
random weights with a boosted EOS, so some greedy lines stop (EOS) and others hit max_tokens.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrid_ray.cli import main                                          # noqa: E402
from hybrid_ray.config import ClusterSpec, ReplicaGroupSpec              # noqa: E402
from hybrid_ray.engines.transformers import TransformersEngine           # noqa: E402
from hybrid_ray.openai_batch import (CONTEXT_LENGTH_EXCEEDED, INVALID_REQUEST, format_success,  # noqa: E402
                                     output_lines, read_batch)
from hybrid_ray.payload import LENGTH, STOP                              # noqa: E402
from hybrid_ray.profiling import run_replica                             # noqa: E402
from hybrid_ray.prompts import load_prompt_encoder                       # noqa: E402
from hybrid_ray.results import CompletionRecord                          # noqa: E402
from hybrid_ray.runtime import RunOptions, run                           # noqa: E402
from hybrid_ray.workload import load_gsm8k_questions                     # noqa: E402

from helpers import COST                                                 # noqa: E402

COMP, CHAT = "/v1/completions", "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[1]


def _line(cid: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def make_batch(path: Path, n: int = 16, bad: bool = True) -> list[str]:
    """Greedy completion and chat lines (text and token-id prompts, max tokens 6..40), and, with
    ``bad``, three lines that must become error lines; returns the custom_ids in line order."""
    qs = load_gsm8k_questions(n)
    lines, ids = [], []
    for i, q in enumerate(qs):
        mt = (6, 16, 28, 40)[i % 4]
        if i % 3 == 2:
            body = {"model": "tiny", "messages": [{"role": "user", "content": q}], "max_completion_tokens": mt}
            url = CHAT
        else:
            body = {"model": "tiny", "prompt": q if i % 5 else [1, 40 + i, 41, 42, 43], "max_tokens": mt}
            url = COMP
        body["temperature"] = 0
        lines.append(_line(f"q{i}", url, body))
        ids.append(f"q{i}")
        if bad and i == 4:
            lines.append(_line("bad-logprobs", COMP, {"prompt": q, "logprobs": 2, "max_tokens": 4}))
            lines.append(_line("bad-temp", COMP, {"prompt": q, "temperature": -1, "max_tokens": 4}))
            lines.append(_line("too-long", COMP, {"prompt": " ".join(qs) * 3, "max_tokens": 4}))
            ids += ["bad-logprobs", "bad-temp", "too-long"]
    path.write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return load_prompt_encoder(tiny_model_dir)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()


def reference(model, tok, ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> tuple[list[int], str, str]:
    """transformers' greedy ``generate`` + decode, with vLLM's stop rules: (tokens, text, finish reason)."""
    eos = tok.eos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens, pad_token_id=eos)
    gen = out[0, len(ids):].tolist()
    for k in range(1, len(gen) + 1):
        text = tok.decode(gen[:k], skip_special_tokens=True)
        if gen[k - 1] == eos:
            return gen[:k], text, STOP
        for s in stop:
            if s in text:
                return gen[:k], text[:text.index(s)], STOP
    return gen, tok.decode(gen, skip_special_tokens=True), LENGTH


def _cluster(kv: int, max_batch: int = 4) -> ClusterSpec:
    return ClusterSpec("t", (ReplicaGroupSpec("g", 1, max_batch, kv, COST, 8192),))


# -- parsing with the model's tokenizer -----------------------------------------------------------

def test_prompts_are_tokenized_as_vllm_does(tmp_path, encoder):
    inp = tmp_path / "in.jsonl"
    make_batch(inp, 8)
    batch = read_batch(inp, encoder=encoder)
    tok = encoder.tokenizer
    q = load_gsm8k_questions(8)
    comp, chat, given = batch.lines["q1"], batch.lines["q2"], batch.lines["q0"]
    assert list(comp.request.payload.token_ids) == tok(q[1]).input_ids and comp.request.payload.token_ids[0] == 1
    text = tok.apply_chat_template([{"role": "user", "content": q[2]}], tokenize=False, add_generation_prompt=True)
    assert list(chat.request.payload.token_ids) == tok(text, add_special_tokens=False).input_ids
    assert list(given.request.payload.token_ids) == [1, 40, 41, 42, 43]           # token ids as given
    for b in batch.lines.values():
        r = b.request
        assert r.prompt_tokens == len(r.payload.token_ids) and r.output_tokens == r.payload.sampling.max_tokens
        assert r.payload.sampling.greedy and r.payload.group == "tiny" and b.prompt_source == "model"
    codes = {e.custom_id: e.code for e in batch.errors}
    assert codes == {"bad-logprobs": INVALID_REQUEST, "bad-temp": INVALID_REQUEST,
                     "too-long": CONTEXT_LENGTH_EXCEEDED}


def test_max_tokens_is_capped_by_the_context_and_ids_by_the_vocabulary(tmp_path, encoder):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([_line("a", COMP, {"prompt": [3 + i % 500 for i in range(1000)], "max_tokens": 500}),
                              _line("b", COMP, {"prompt": [3 + i % 500 for i in range(1024)], "max_tokens": 5}),
                              _line("c", COMP, {"prompt": [1, 512], "max_tokens": 5})]) + "\n")
    batch = read_batch(inp, encoder=encoder)
    assert batch.lines["a"].request.output_tokens == 1024 - 1000 == batch.lines["a"].max_tokens
    codes = {e.custom_id: (e.code, e.message) for e in batch.errors}
    assert codes["b"][0] == CONTEXT_LENGTH_EXCEEDED and "1024 tokens" in codes["b"][1]
    assert codes["c"][0] == INVALID_REQUEST and "out of the vocabulary" in codes["c"][1]


# -- the engine, in process (no Ray) --------------------------------------------------------------

def test_engine_matches_generate_in_process(tmp_path, tiny_model_dir, encoder, reference_model):
    inp = tmp_path / "in.jsonl"
    make_batch(inp, 16, bad=False)
    batch = read_batch(inp, encoder=encoder)
    engine = TransformersEngine(str(tiny_model_dir), threads=1)
    state = run_replica(engine, _cluster(kv=300), batch.requests)            # small KV: preemptions
    assert state.preempted_total > 0 and len(state.finished) == len(batch.requests)
    reasons = Counter()
    for s in state.finished:
        c = s.completion
        toks, text, finish = reference(reference_model, encoder.tokenizer, list(s.req.payload.token_ids),
                                       s.req.output_tokens)
        assert (c.token_ids, c.text, c.finish_reason) == (toks, text, finish), s.id
        assert s.generated == len(toks)                     # the state learned the true length
        rec = CompletionRecord.from_sequence(s)
        line = batch.lines[s.id]
        body = format_success(rec, s.id, url=line.url, model=line.model, max_tokens=line.max_tokens)["response"]["body"]
        choice = body["choices"][0]
        assert (choice.get("text") if line.url == COMP else choice["message"]["content"]) == text
        assert choice["finish_reason"] == finish and body["usage"]["completion_tokens"] == len(toks)
        reasons[finish] += 1
    assert reasons[STOP] > 0 and reasons[LENGTH] > 0
    assert state.kv_used == 0 and not engine._seqs


def test_stop_strings_sampling_and_ignore_eos(tmp_path, tiny_model_dir, encoder, reference_model):
    tok = encoder.tokenizer
    q = load_gsm8k_questions(6)
    ids = tok(q[3]).input_ids
    full, text, _ = reference(reference_model, tok, ids, 30)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    inp = tmp_path / "in.jsonl"
    lines = [_line("stop", COMP, {"prompt": q[3], "max_tokens": 30, "temperature": 0, "stop": [stop]}),
             _line("ign", COMP, {"prompt": q[0], "max_tokens": 40, "temperature": 0, "ignore_eos": True}),
             _line("s1", COMP, {"prompt": q[1], "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 50,
                                "seed": 7}),
             _line("s2", COMP, {"prompt": q[1], "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 50,
                                "seed": 7}),
             _line("k1", COMP, {"prompt": q[2], "max_tokens": 20, "temperature": 1.0, "top_k": 1, "seed": 3}),
             _line("pen", COMP, {"prompt": q[2], "max_tokens": 20, "temperature": 0, "presence_penalty": 2.0,
                                 "frequency_penalty": 1.0})]
    inp.write_text("\n".join(lines) + "\n")
    batch = read_batch(inp, encoder=encoder)
    engine = TransformersEngine(str(tiny_model_dir), threads=1)
    state = run_replica(engine, _cluster(kv=4000, max_batch=8), batch.requests)
    got = {s.id: s.completion for s in state.finished}
    want = reference(reference_model, tok, ids, 30, (stop,))
    assert (got["stop"].token_ids, got["stop"].text, got["stop"].finish_reason) == want
    assert stop not in got["stop"].text and len(got["stop"].token_ids) < 30
    assert len(got["ign"].token_ids) == 40 and got["ign"].finish_reason == LENGTH
    assert got["s1"].token_ids == got["s2"].token_ids                 # same seed, same draws
    greedy, _, _ = reference(reference_model, tok, tok(q[2]).input_ids, 20)
    assert got["k1"].token_ids == greedy                              # top_k 1 is greedy
    assert len(got["pen"].token_ids) <= 20
    assert {s.id: s.generated for s in state.finished} == {k: len(c.token_ids) for k, c in got.items()}


# -- bad input: one line, exit 2, before any replica starts ----------------------------------------

@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
@pytest.mark.parametrize("case", ["missing", "no-tokenizer", "unknown-arch"])
def test_bad_model_directory_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, case, engine):
    import shutil

    inp = tmp_path / "in.jsonl"
    make_batch(inp, 2, bad=False)
    d = tmp_path / "model"
    if case != "missing":
        shutil.copytree(tiny_model_dir, d)
    if case == "no-tokenizer":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").unlink()
    if case == "unknown-arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["FooBarForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    if engine == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed here")
    code = main(["run", "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--config", "cpu_tiny",
                 "--engine", engine, "--model", str(d), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(d) in err[0]
    assert {"missing": "no such model directory", "no-tokenizer": "no tokenizer",
            "unknown-arch": "FooBarForCausalLM"}[case] in err[0]
    assert not (tmp_path / "out.jsonl").exists()                   # nothing ran, nothing written


# -- on Ray: the whole path ------------------------------------------------------------------------

def _config(tmp_path: Path, kv: int = 360) -> str:
    text = (ROOT / "cluster_configs" / "cpu_tiny.yaml").read_text()
    text = text.replace("kv_capacity_tokens: 2048", f"kv_capacity_tokens: {kv}")
    assert f"kv_capacity_tokens: {kv}" in text
    p = tmp_path / "cpu_tiny_small_kv.yaml"
    p.write_text(text)
    return str(p)


def _check_outputs(out: Path, ids: list[str], batch, encoder, reference_model) -> Counter:
    """One line per input line, in input order; every success equals transformers' generate."""
    objs = output_lines(out)
    assert [o["custom_id"] for o in objs] == ids                      # input order, each id once
    reasons = Counter()
    for o in objs:
        if o["error"] is not None:
            continue
        b = batch.lines[o["custom_id"]]
        toks, text, finish = reference(reference_model, encoder.tokenizer, list(b.request.payload.token_ids),
                                       b.request.output_tokens)
        body = o["response"]["body"]
        choice = body["choices"][0]
        assert (choice["text"] if b.url == COMP else choice["message"]["content"]) == text, o["custom_id"]
        assert choice["finish_reason"] == finish and body["usage"]["completion_tokens"] == len(toks)
        assert body["usage"]["prompt_tokens"] == b.request.prompt_tokens
        reasons[finish] += 1
    return reasons


@pytest.mark.ray
def test_batch_run_on_ray_matches_generate(ray_session, tmp_path, tiny_model_dir, encoder, reference_model):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = make_batch(inp, 16)
    opts = RunOptions(startup_timeout_s=600, config=_config(tmp_path), workload=str(inp), output=str(out), policy="hybrid",
                      engine="transformers", model=str(tiny_model_dir), progress=False, plan_time_limit_s=1.0)
    res = run(opts)
    assert res.summary.requests_completed == 16 and res.engine.startswith("transformers")
    assert sum(st.preempted_total for st in res.record.replicas) > 0
    batch = read_batch(inp, encoder=encoder)
    reasons = _check_outputs(out, ids, batch, encoder, reference_model)
    assert reasons[STOP] > 0 and reasons[LENGTH] > 0
    errors = {o["custom_id"]: o["error"]["code"] for o in output_lines(out) if o["error"] is not None}
    assert errors == {"bad-logprobs": INVALID_REQUEST, "bad-temp": INVALID_REQUEST, "too-long": CONTEXT_LENGTH_EXCEEDED}


@pytest.mark.ray
def test_replica_lost_mid_generation_restarts_from_the_prompt(ray_session, tmp_path, tiny_model_dir, encoder,
                                                              reference_model):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = make_batch(inp, 16, bad=False)
    killed = {}

    def hook(d):
        if not killed:
            killed["at"] = d.done
            ray_session.kill(d.handles[1])

    opts = RunOptions(startup_timeout_s=600, config=_config(tmp_path, kv=2048), workload=str(inp), output=str(out), engine="transformers",
                      model=str(tiny_model_dir), progress=False, heartbeat_timeout_s=60)
    res = run(opts, hook=hook)
    assert killed["at"] < 16 and res.failed_replicas and res.summary.requests_completed == 16
    _check_outputs(out, ids, read_batch(inp, encoder=encoder), encoder, reference_model)
