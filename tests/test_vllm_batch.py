"""The product on real vLLM: an OpenAI batch file in, real completions out, our scheduler inside vLLM.

`hybrid-ray run -i batch.jsonl -o out.jsonl --engine vllm --model DIR --config CFG --policy hybrid`
on 2 CPU vLLM replicas (a tiny LLaMA built offline), through preemptions (a small KV cache) and
controller moves (a hair-trigger controller), must return for every line exactly what vLLM's own
``LLM.generate`` / ``LLM.chat`` returns with the same model and parameters: text, completion
token count and finish_reason. Runs where vLLM imports (CI's vLLM step).
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
    kv_capacity_tokens: 700       # small: the hybrid policy has to preempt
    max_batched_tokens: 512
    resources: {CPU: 1}
    cost_model:
      prefill: {floor_s: 0.0026, base_s: 0.0024, per_token_s: 8.8e-06, per_token_sq_s: 1.0e-09}
      decode: {base_s: 0.0009, per_seq_s: 2.5e-05, per_ctx_token_s: 2.0e-07}
policy:
  hybrid: {interval_s: 0.02, threshold_s: 0.0, rel_threshold: 0.0, max_moves: 8, dispatch: plan}
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


def reference(model_dir: str, lines: list[dict]) -> dict[str, tuple[str, int, str]]:
    """vLLM's own answers: LLM.generate for completions, LLM.chat for chat lines."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=1024)
    out = {}
    for line in lines:
        b = line["body"]
        sp = SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"])
        if line["url"] == "/v1/chat/completions":
            res = llm.chat(b["messages"], sp, use_tqdm=False)[0].outputs[0]
        else:
            res = llm.generate([b["prompt"]], sp, use_tqdm=False)[0].outputs[0]
        out[line["custom_id"]] = (res.text, len(res.token_ids), res.finish_reason)
    del llm
    return out


def test_batch_file_through_planned_vllm_equals_vllm_generate(tiny_model_dir, tmp_path, capsys):
    lines = batch_lines()
    inp, out, cfg, js = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "cfg.yaml", tmp_path / "run.json"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg.write_text(CONFIG)
    rc = main(["run", "-i", str(inp), "-o", str(out), "--engine", "vllm", "--model", str(tiny_model_dir),
               "--config", str(cfg), "--policy", "hybrid", "--json", str(js), "--startup-timeout", "600"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == [x["custom_id"] for x in lines]           # input order
    summary = json.loads(js.read_text())
    assert summary["preemptions"] > 0                     # the small KV made the policy preempt
    assert summary["moves"] > 0                           # the controller moved queued requests
    want = reference(str(tiny_model_dir), lines)
    reasons = set()
    for g in got:
        body = g["response"]["body"]
        choice = body["choices"][0]
        text = choice["message"]["content"] if g["custom_id"].startswith("chat") else choice["text"]
        mine = (text, body["usage"]["completion_tokens"], choice["finish_reason"])
        assert mine == want[g["custom_id"]], g["custom_id"]
        reasons.add(choice["finish_reason"])
    assert reasons == {"stop", "length"}                  # the scaled EOS row stops some early
