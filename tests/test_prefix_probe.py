"""Prefix caching on a real engine, without the engine: ``hash_ids`` from token ids (the simulator and the
planner see real batch lines' sharing), the engine's probe as the replica state's source of hits, and
``usage.prompt_tokens_details.cached_tokens`` in the OpenAI batch output. vLLM's side is in
test_engine_vllm.py and test_vllm_batch.py."""
from __future__ import annotations

import json
import pickle
import random

from hybrid_ray.engines.base import engine_prefix_caching
from hybrid_ray.openai_batch import CHAT_URL, format_success, parse_line, parse_output_line, read_batch
from hybrid_ray.payload import prompt_hash_ids
from hybrid_ray.prefix_cache import HASH_BLOCK_TOKENS, block_keys
from hybrid_ray.replica import MIXED, PREFILL, Iteration, ReplicaState, SchedulingError, Sequence
from hybrid_ray.results import CompletionRecord
from hybrid_ray.workload import Request, check_hash_ids

import pytest
import yaml

from helpers import cluster


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(32000) for _ in range(n)]


# -- hash_ids from token ids ----------------------------------------------------------------------

def test_hash_ids_one_chained_id_per_512_tokens():
    rng = random.Random(0)
    shared = ids(rng, 700)
    a, b = shared + ids(rng, 400), shared + ids(rng, 30)
    ha, hb = prompt_hash_ids(a), prompt_hash_ids(b)
    assert len(ha) == 3 and len(hb) == 2                       # 1100 and 730 tokens: the last block partial
    assert ha[0] == hb[0] and ha[1] != hb[1]                   # the first 512 tokens agree, the next do not
    assert prompt_hash_ids(list(a)) == ha == prompt_hash_ids(tuple(a))      # deterministic, any sequence type
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in ha + hb)
    check_hash_ids(ha, len(a))                                 # the workload files' rule holds
    assert prompt_hash_ids([]) == () and len(prompt_hash_ids(ids(rng, 512))) == 1
    assert len(prompt_hash_ids(ids(rng, 513))) == 2
    # chained: an equal later block after a different first one gets another id
    c = ids(rng, 512) + a[512:]
    assert prompt_hash_ids(c)[1:] != ha[1:] and not set(prompt_hash_ids(c)) & set(ha)
    # a partial block only matches an equal one
    assert prompt_hash_ids(a[:600])[1] != prompt_hash_ids(a[:601])[1]
    # the simulator's engine blocks: shared exactly up to the 512-block the prompts agree on
    ka, kb = block_keys(ha, len(a), 16), block_keys(hb, len(b), 16)
    assert ka[:32] == kb[:32] and not set(ka[32:]) & set(kb)


def test_batch_lines_with_token_ids_carry_hash_ids(tmp_path):
    rng = random.Random(1)
    system = ids(rng, 1100)
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": system + ids(rng, 50), "max_tokens": 8}} for k in range(4)]
    lines.append({"custom_id": "ids", "method": "POST", "url": CHAT_URL,
                  "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                           "prompt_token_ids": system + [7], "max_tokens": 8}})
    lines.append({"custom_id": "text", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "m", "prompt": "no ids here", "max_tokens": 8}})
    p = tmp_path / "b.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    batch = read_batch(p)
    req = {q.id: q for q in batch.requests}
    assert req["q0"].hash_ids == prompt_hash_ids(lines[0]["body"]["prompt"])
    assert len({req[f"q{k}"].hash_ids[:2] for k in range(4)}) == 1      # two shared 512-blocks
    assert req["ids"].hash_ids[:2] == req["q0"].hash_ids[:2]
    assert req["text"].hash_ids is None                                  # counted from text: no ids


class FakeEncoder:
    """``prompts.PromptEncoder``'s surface: a real engine's tokenizer."""
    context, name = 4096, "fake"

    def completion(self, prompt: str) -> list[int]:
        return [1] + [ord(c) for c in prompt]

    def chat(self, messages: list[dict]) -> list[int]:
        return [1] + [ord(c) for m in messages for c in f"<{m['role']}>{m['content']}"]

    def check_ids(self, x: list[int]) -> list[int]:
        return x


def test_real_lines_get_hash_ids_from_the_models_ids():
    system = "You are a careful assistant. " * 40                          # ~1,160 tokens here
    a, b = ({"custom_id": k, "method": "POST", "url": CHAT_URL,
             "body": {"model": "m", "max_tokens": 8,
                      "messages": [{"role": "system", "content": system}, {"role": "user", "content": k}]}}
            for k in ("first question", "second one"))
    la, lb = (parse_line(json.dumps(x), 1, encoder=FakeEncoder()) for x in (a, b))
    assert la.request.hash_ids == prompt_hash_ids(la.request.payload.token_ids)
    assert la.request.hash_ids[:2] == lb.request.hash_ids[:2] and la.request.hash_ids[2] != lb.request.hash_ids[2]


# -- the engine's probe as the state's source of hits ---------------------------------------------

class FakeProbe:
    """A real engine's prefix cache as ``ReplicaState.prefix_probe`` sees it: ``hits`` now, and where
    the step starts each admission (``more``: blocks the step's earlier chunks fill)."""

    def __init__(self, hits: dict[str, int], more: dict[str, int] | None = None):
        self.hits, self.more = hits, more or {}
        self.admitted: list[list[tuple[str, int]]] = []

    def hit(self, s):
        return self.hits.get(s.id, 0)

    def admit(self, chunks):
        self.admitted.append([(s.id, end) for s, end in chunks])
        return [self.more.get(s.id, self.hit(s)) if s.status == 0 else -1 for s, _ in chunks]


class Engine:
    prefix_caching = False

    def __init__(self, probe):
        self.prefix_probe = probe


def probed_state(probe, kv=3000) -> ReplicaState:
    r = ReplicaState(cluster(count=1, max_batch=8, kv=kv).replicas()[0])
    engine_prefix_caching(Engine(probe), r)
    assert r.prefix is None and r.prefix_probe is probe
    return r


def test_the_state_plans_from_the_engines_hits_and_counts_them_as_its_kv():
    probe = FakeProbe({"a": 256})
    r = probed_state(probe)
    a = Sequence(Request("a", 400, 4, hash_ids=(9,)), 4)
    r.add([a])
    assert a.keys is None                                     # the state's own model is off
    assert r.prefill_rest(a) == 144 and r.admit_kv(a) == 256  # the hit is skipped, and held as its own KV
    it = Iteration(PREFILL, [(a, 144)])
    assert r.begin(it) is it
    assert probe.admitted == [[("a", 400)]]                   # (sequence, the token its chunk ends at)
    assert a.prefilled == 400 and a.cached_tokens == 256 and r.kv_used == 400
    assert it.tokens == 144 and it.attn_sq == 144 * (2 * 256 + 144)    # priced as a continuation
    r.complete(it, 0.0, 1.0)
    assert r.kv_used == 401
    assert pickle.loads(pickle.dumps(r)).prefix_probe is None          # handed back without the engine
    assert r.prefix_probe is probe


def test_hits_on_blocks_the_same_step_fills_keep_the_chunks_end():
    """The engine finds more than the policy saw (blocks an earlier chunk of the step fills): the chunk's
    first tokens become hits, its end (and so its KV) stays where the policy put it."""
    probe = FakeProbe({}, more={"b": 256, "c": 128})
    r = probed_state(probe)
    a, b, c = (Sequence(Request(k, 400, 4), 4) for k in "abc")
    r.add([a, b, c])
    it = Iteration(PREFILL, [(a, 400), (b, 400), (c, 300)])
    assert r.begin(it) is it
    assert it.prefill == [(a, 400), (b, 144), (c, 172)]
    assert (a.cached_tokens, b.cached_tokens, c.cached_tokens) == (0, 256, 128)
    assert (b.prefilled, c.prefilled) == (400, 300) and r.kv_used == 1100
    assert it.tokens == 400 + 144 + 172
    done = r.complete(it, 0.0, 1.0)
    assert not done and set(r.running) == {"a", "b"} and set(r.prefilling) == {"c"}


def test_a_hit_at_or_past_the_chunks_end_is_a_scheduling_error():
    r = probed_state(FakeProbe({}, more={"a": 256}))
    a = Sequence(Request("a", 400, 4), 4)
    r.add([a])
    with pytest.raises(SchedulingError, match="cache hit"):
        r.begin(Iteration(PREFILL, [(a, 200)]))


def test_kv_pressure_counts_the_hits_of_the_admitted():
    """A mixed step preempts running sequences to make room for the hits its admissions take."""
    probe = FakeProbe({})
    r = probed_state(probe, kv=700)
    a = Sequence(Request("a", 300, 50), 50)
    r.add([a])
    r.complete(r.begin(Iteration(PREFILL, [(a, 300)])), 0.0, 1.0)
    b = Sequence(Request("b", 400, 4), 4)
    r.add([b])
    probe.hits["b"] = 384
    it = r.begin(Iteration(MIXED, [(b, 16)], decode=True))
    assert a.preemptions == 1 and it.kind == PREFILL and b.cached_tokens == 384 and r.kv_used == 400


def test_without_a_probe_nothing_changes():
    r = ReplicaState(cluster(count=1, max_batch=8, kv=3000).replicas()[0])
    engine_prefix_caching(object(), r)
    assert r.prefix is None and r.prefix_probe is None
    a = Sequence(Request("a", 400, 4, hash_ids=(1,)), 4)
    r.add([a])
    assert r.prefill_rest(a) == 400 and r.admit_kv(a) == 0


# -- output ---------------------------------------------------------------------------------------

def test_cached_tokens_in_usage_and_read_back():
    real = CompletionRecord("q", "r-0", 0.0, 0.1, 0.5, 400, 8, 0, "text", "stop", 256)
    usage = format_success(real, url=CHAT_URL)["response"]["body"]["usage"]
    assert usage == {"prompt_tokens": 400, "completion_tokens": 8, "total_tokens": 408,
                     "prompt_tokens_details": {"cached_tokens": 256}}
    assert parse_output_line(format_success(real, url=CHAT_URL), "x").cached_tokens == 256
    miss = CompletionRecord("q", "r-0", 0.0, 0.1, 0.5, 400, 8, 0, "text", "stop", 0)
    assert format_success(miss)["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    emulated = CompletionRecord("q", "r-0", 0.0, 0.1, 0.5, 400, 8, 0)
    assert "prompt_tokens_details" not in format_success(emulated)["response"]["body"]["usage"]
    modelled = CompletionRecord("q", "r-0", 0.0, 0.1, 0.5, 400, 8, 0, cached_tokens=384)
    assert format_success(modelled)["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 384


def test_simulate_sees_the_sharing_of_a_batch_with_token_ids(tmp_path):
    """``simulate -i batch.jsonl`` on lines given as token ids: their hash_ids let the simulator's prefix
    cache serve the shared 1,536 tokens, and the output lines report it."""
    from hybrid_ray.cli import main

    rng = random.Random(2)
    system = ids(rng, 3 * HASH_BLOCK_TOKENS)
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": system + ids(rng, 40), "max_tokens": 8}} for k in range(6)]
    inp, out, cfg = tmp_path / "b.jsonl", tmp_path / "o.jsonl", tmp_path / "one.yaml"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg.write_text(yaml.safe_dump(cluster(count=1).to_dict()))
    assert main(["simulate", "-i", str(inp), "-o", str(out), "--config", str(cfg), "--policy", "vllm"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    cached = [g["response"]["body"]["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for g in got]
    assert sorted(cached) == [0] + [3 * HASH_BLOCK_TOKENS] * 5
