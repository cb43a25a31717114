"""Side by side on CPU replicas: hybrid-ray vs vLLM's own scheduler, `vllm run_batch`, Ray Data LLM.

One OpenAI batch file (default: the first N GSM8K questions as ``/v1/chat/completions`` lines,
greedy, seed 0, ``max_tokens`` 128) runs on the same replicas (``--replicas`` engines of the same
model, one core each) through

  (a) hybrid-ray's ``hybrid`` policy: ``hybrid-ray run --engine vllm --policy hybrid -i FILE``
      (our scheduler inside each vLLM engine; a subprocess);
  (b) vLLM's own scheduler behind least-loaded routing: one process per replica, each ``LLM.chat``
      on the lines routed to it (fewest outstanding requests: alternates for a batch), with the
      engine limits hybrid-ray gives vLLM (``max_num_seqs`` = max batch, ...);
  (c) ``vllm run_batch`` on the file split evenly, one process per replica;
  (d) Ray Data LLM (``ray.data.llm.build_processor`` + ``vLLMEngineProcessorConfig``).

Makespan is the generation span, engine start-up excluded: (a) ``run_wall_s`` (hybrid-ray's clock
starts once every engine is ready; it ends at the last completion); (b) and (c) the processes
start their engines, wait at a barrier (a "go" file), then each records the wall-clock times of
its first submission and last completion, and the span is the last end minus the first start;
(d) Ray Data starts engines lazily, so no barrier: first request submitted to an engine (each
row's completion time minus vLLM's ``time_taken_llm``) to the last row through postprocess.
Wall time includes everything (Python, Ray and engine start-up).

    python -m hybrid_ray.bench.vs_vllm --n 200 --replicas 2 --model DIR --out results/vs_vllm.json
    hybrid-ray bench vs-vllm --n 200 --model DIR --out results/vs_vllm.json

Needs vLLM (CPU build) and, for (d), ``ray[data]`` in the interpreter it runs under
(``--python``, default: this one). Everything else here (batch lines, routing, splitting,
ratios, the table) is pure and tested without vLLM (tests/test_bench_vs_vllm.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

SYSTEMS = ("a", "b", "c", "d", "e")
LABELS = {"a": "hybrid-ray (hybrid policy, our scheduler in vLLM)",
          "b": "vLLM's scheduler (LLM.chat), least-loaded routing",
          "c": "vllm run_batch, file split evenly",
          "d": "Ray Data LLM (build_processor)",
          "e": "as (b), engine core in its own process (vLLM's default)"}
HOW = {"a": "run_wall_s: hybrid-ray's clock starts when every engine is ready, ends at the last completion",
       "b": "barrier after engine start-up; first submission to last completion (wall clock, all processes)",
       "c": "barrier after engine start-up (shim around run_batch); first request to last completion",
       "d": "no barrier (engines start lazily): first engine submission (row done - time_taken_llm) to last "
            "row through postprocess",
       "e": "as (b)"}
GSM8K_TEXT = "gsm8k/test.jsonl"
DEFAULT_MAX_TOKENS = 128
MODEL_NAME = "tiny"


# ---------------------------------------------------------------------------------------------
# Pure parts (tested without vLLM)
# ---------------------------------------------------------------------------------------------

def questions_path(explicit: str | None = None) -> Path | None:
    """GSM8K's question text (test.jsonl): ``explicit``, else the project's ../shared/data copy."""
    if explicit:
        return Path(explicit)
    root = Path(__file__).resolve().parents[2]
    for base in (root.parent / "shared" / "data", root / "shared" / "data", Path("/work/shared/data")):
        p = base / GSM8K_TEXT
        if p.is_file():
            return p
    return None


def load_questions(path: str | Path, n: int) -> list[str]:
    """The first ``n`` questions of a GSM8K-format JSONL file (``question`` per line)."""
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            if line.strip():
                out.append(json.loads(line)["question"])
    if len(out) < n:
        raise ValueError(f"{path}: only {len(out)} questions, {n} asked for")
    return out


def make_batch_lines(questions: Iterable[str], max_tokens: int = DEFAULT_MAX_TOKENS, model: str = MODEL_NAME,
                     seed: int = 0, prefix: str = "gsm8k-", ignore_eos: bool = False,
                     system: str | None = None) -> list[dict]:
    """One greedy ``/v1/chat/completions`` line per question (custom_id ``gsm8k-<i>``); ``ignore_eos``
    (vLLM's extension of the body) makes every line generate exactly ``max_tokens``; ``system``: a
    system message every line shares (a prefix vLLM's prefix cache reuses)."""
    extra = {"ignore_eos": True} if ignore_eos else {}
    head = [{"role": "system", "content": system}] if system else []
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": head + [{"role": "user", "content": q}], "max_tokens": max_tokens,
                      "temperature": 0.0, "seed": seed, **extra}}
            for i, q in enumerate(questions)]


def shared_system_prompt(words: int, seed: int = 0) -> str:
    """A long system prompt of ``words`` words drawn from the GSM8K vocabulary (seeded): the shared
    prefix of a batch that shows what prefix caching saves."""
    import random

    from ..mixed_tasks import _gsm8k

    vocab = _gsm8k()[2]
    rng = random.Random(seed)
    return "You are a careful math tutor. " + " ".join(rng.choice(vocab) for _ in range(words))


def write_jsonl(path: str | Path, objs: Iterable[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def least_loaded(n: int, replicas: int, outstanding: list[int] | None = None) -> list[int]:
    """Replica of each of ``n`` requests arriving at once: the one with the fewest outstanding
    requests (lowest index on ties); nothing finishes while a batch is routed, so it alternates."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    load = list(outstanding) if outstanding is not None else [0] * replicas
    if len(load) != replicas:
        raise ValueError("outstanding must have one count per replica")
    out = []
    for _ in range(n):
        k = min(range(replicas), key=lambda r: (load[r], r))
        load[k] += 1
        out.append(k)
    return out


def route(items: list, replicas: int) -> list[list]:
    """``items`` grouped by ``least_loaded`` (each part keeps the file order)."""
    parts: list[list] = [[] for _ in range(replicas)]
    for item, k in zip(items, least_loaded(len(items), replicas)):
        parts[k].append(item)
    return parts


def split_even(items: list, k: int) -> list[list]:
    """``items`` in ``k`` contiguous parts whose sizes differ by at most one (the larger first)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    q, r = divmod(len(items), k)
    parts, i = [], 0
    for j in range(k):
        m = q + (1 if j < r else 0)
        parts.append(items[i:i + m])
        i += m
    return parts


def span(starts: Iterable[float], ends: Iterable[float]) -> float:
    """Generation span over processes: last end minus first start (wall-clock seconds)."""
    s, e = list(starts), list(ends)
    if not s or not e:
        raise ValueError("no timings")
    return max(e) - min(s)


def with_ratios(rows: dict[str, dict], ref: str = "a") -> dict[str, dict]:
    """Add ``makespan_x``, ``wall_x``, ``tok_s_x`` (each system / ``ref``) and ``tok_s`` (output
    tokens / makespan) to every row that has numbers; ratios are None where either side lacks one."""
    def tok_s(r: dict) -> float | None:
        m, t = r.get("makespan_s"), r.get("output_tokens")
        return t / m if m and t is not None else None

    for r in rows.values():
        r["tok_s"] = tok_s(r)
    base = rows.get(ref, {})
    for r in rows.values():
        for key, out in (("makespan_s", "makespan_x"), ("wall_s", "wall_x"), ("tok_s", "tok_s_x")):
            a, b = r.get(key), base.get(key)
            r[out] = a / b if a is not None and b else None
    return rows


def agreement(texts: dict[str, dict[str, str]], ids: list[str]) -> dict[str, Any]:
    """How many of ``ids`` have the same text: per pair of systems, and across all of them."""
    names = sorted(texts)
    pairs = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            pairs[f"{x}={y}"] = sum(1 for c in ids if c in texts[x] and c in texts[y] and texts[x][c] == texts[y][c])
    every = sum(1 for c in ids if names and all(c in texts[s] for s in names)
                and len({texts[s][c] for s in names}) == 1)
    return {"lines": len(ids), "systems": names, "pairs": pairs, "all": every}


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def format_table(rows: dict[str, dict], ref: str = "a") -> str:
    """Markdown: one line per system; a failed system shows its reason instead of numbers."""
    head = ("| system | makespan (generation) | wall (incl. start-up) | output tokens | output tok/s | "
            f"makespan / ({ref}) | wall / ({ref}) | tok/s / ({ref}) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in [k for k in SYSTEMS if k in rows] + sorted(k for k in rows if k not in SYSTEMS):
        r = rows[key]
        name = f"({key}) {r.get('label', LABELS.get(key, key))}"
        if r.get("error"):
            wall = _fmt(r.get("wall_s"), ".1f", " s")
            lines.append(f"| {name} | did not run: {r['error']} | {wall} | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {_fmt(r.get('makespan_s'), '.2f', ' s')} | {_fmt(r.get('wall_s'), '.1f', ' s')} | "
                     f"{_fmt(r.get('output_tokens'), ',d')} | {_fmt(r.get('tok_s'), ',.0f')} | "
                     f"{_fmt(r.get('makespan_x'), '.2f', 'x')} | {_fmt(r.get('wall_x'), '.2f', 'x')} | "
                     f"{_fmt(r.get('tok_s_x'), '.2f', 'x')} |")
    return "\n".join(lines)


def format_agreement(agree: dict[str, Any]) -> str:
    n = agree["lines"]
    parts = [f"({k.replace('=', ') = (')}) {v}/{n}" for k, v in agree["pairs"].items()]
    systems = ", ".join(f"({s})" for s in agree["systems"])
    return (f"identical output text per line (greedy): {'; '.join(parts) or '-'}; "
            f"all of {systems}: {agree['all']}/{n}")


def openai_output_texts(path: str | Path) -> dict[str, tuple[str, int, str]]:
    """custom_id -> (text, completion tokens, finish reason) of an OpenAI batch output file's successes."""
    out = {}
    for o in read_jsonl(path):
        body = ((o.get("response") or {}).get("body")) or {}
        if o.get("error") or not body.get("choices"):
            continue
        ch = body["choices"][0]
        text = (ch.get("message") or {}).get("content") or ch.get("text") or ""
        out[o["custom_id"]] = (text, int((body.get("usage") or {}).get("completion_tokens") or 0),
                               ch.get("finish_reason") or "")
    return out


# ---------------------------------------------------------------------------------------------
# Running the systems (needs vLLM)
# ---------------------------------------------------------------------------------------------

def engine_limits(config: str) -> dict[str, Any]:
    """The limits hybrid-ray's ``VLLMEngine.from_model`` gives vLLM for the config's first group,
    plus a KV cache of the tokens hybrid-ray's state may admit (kv_capacity + a block per sequence)."""
    from ..config import load_cluster

    g = load_cluster(config).groups[0]
    block = 16                                        # vLLM's CPU block size
    return dict(max_num_seqs=g.max_batch_size,
                max_num_batched_tokens=max(g.max_batched_tokens + g.max_batch_size, g.kv_capacity_tokens),
                num_gpu_blocks_override=-(-(g.kv_capacity_tokens + g.max_batch_size * block) // block))
    # prefix caching stays at vLLM's default (on) in every system, hybrid-ray's engine included


def cpu_of(k: int) -> str:
    return str(k % (os.cpu_count() or 1))


def vllm_env(k: int | None) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    if k is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_of(k)
    return env


class Procs:
    """Subprocesses in their own sessions, ended by process group on timeout or exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        f = open(log, "w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        p._log = f  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def wait(self, deadline: float) -> bool:
        """Wait for every process until ``deadline`` (time.time()); False on timeout."""
        for p in self.procs:
            left = deadline - time.time()
            try:
                p.wait(timeout=max(left, 0.01))
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
            p._log.close()  # type: ignore[attr-defined]


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(ln.strip()[:200] for ln in lines[-n:])


def _barrier(work: Path, k: int, timeout: float) -> None:
    """Worker side: say ready, wait for the go file."""
    (work / f"ready{k}").write_text(str(time.time()))
    t_end = time.time() + timeout
    while not (work / "go").exists():
        if time.time() > t_end:
            raise TimeoutError("no go signal")
        time.sleep(0.01)


def _release(work: Path, replicas: int, procs: Procs, deadline: float) -> bool:
    """Parent side: when every worker is ready (or one died), write the go file."""
    while time.time() < deadline:
        if all((work / f"ready{k}").exists() for k in range(replicas)):
            (work / "go").write_text(str(time.time()))
            return True
        if any(p.poll() is not None for p in procs.procs):
            (work / "go").write_text("abort")
            return False
        time.sleep(0.02)
    return False


def _fresh(work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def run_a(o: argparse.Namespace, batch: Path, out_dir: Path, config: str) -> dict:
    exe = str(Path(o.python).parent / "hybrid-ray")
    out, j, log = out_dir / "vs_vllm_a.jsonl", out_dir / "vs_vllm_a.json", out_dir / "vs_vllm_a.log"
    for p in (out, j):
        p.unlink(missing_ok=True)
    cmd = [exe, "run", "--engine", "vllm", "--model", o.model, "--config", config, "--policy", "hybrid",
           "-i", str(batch), "-o", str(out), "--json", str(j), "--no-progress"]
    procs, t0 = Procs(), time.time()
    procs.start(cmd, log)
    ok = procs.wait(t0 + o.timeout)
    wall = time.time() - t0
    procs.kill()
    row: dict[str, Any] = {"cmd": " ".join(cmd), "wall_s": wall, "outputs": str(out)}
    if not ok:
        return row | {"error": f"timed out after {o.timeout:.0f} s"}
    if procs.procs[0].returncode != 0 or not j.exists():
        return row | {"error": f"rc {procs.procs[0].returncode}: {_tail(log)}"}
    data = json.loads(j.read_text())
    row.update(makespan_s=data["run_wall_s"], engine_makespan_s=data["makespan_s"],
               reported_wall_s=data["wall_s"], preemptions=data.get("preemptions"), moves=data.get("moves"))
    return row


def _worker_llm(spec: dict) -> None:
    """(b) one replica: vLLM's own scheduler over the lines routed to it."""
    from vllm import LLM, SamplingParams

    work, k = Path(spec["work"]), spec["k"]
    lines = read_jsonl(spec["part"])
    t0 = time.time()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=spec["max_model_len"],
              seed=0, **spec["limits"])
    convs = [ln["body"]["messages"] for ln in lines]
    params = [SamplingParams(temperature=ln["body"].get("temperature", 1.0), max_tokens=ln["body"]["max_tokens"],
                             seed=ln["body"].get("seed"), ignore_eos=bool(ln["body"].get("ignore_eos", False)))
              for ln in lines]
    llm.chat([[{"role": "user", "content": "warm up"}]], SamplingParams(max_tokens=2), use_tqdm=False)
    t_init = time.time() - t0                          # start-up includes one untimed 2-token warm-up chat
    _barrier(work, k, spec["timeout"])
    start = time.time()
    outs = llm.chat(convs, params, use_tqdm=False) if lines else []
    end = time.time()
    res = [{"custom_id": ln["custom_id"], "text": r.outputs[0].text, "tokens": len(r.outputs[0].token_ids),
            "finish_reason": r.outputs[0].finish_reason} for ln, r in zip(lines, outs)]
    write_jsonl(work / f"out{k}.jsonl", res)
    (work / f"time{k}.json").write_text(json.dumps({"start": start, "end": end, "init_s": t_init}))


def _run_workers(o: argparse.Namespace, mode: str, parts: list[list[dict]], work: Path, extra: dict,
                 multiprocessing: bool = False) -> tuple:
    procs, t0 = Procs(), time.time()
    for k, part in enumerate(parts):
        write_jsonl(work / f"part{k}.jsonl", part)
        spec = dict(work=str(work), k=k, part=str(work / f"part{k}.jsonl"), model=o.model, timeout=o.timeout,
                    out=str(work / f"out{k}.jsonl"), **extra)
        (work / f"spec{k}.json").write_text(json.dumps(spec))
        env = vllm_env(k)
        if multiprocessing:
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        procs.start([o.python, "-m", "hybrid_ray.bench.vs_vllm", "--worker", mode, str(work / f"spec{k}.json")],
                    work / f"log{k}.txt", env=env)
    return _finish_workers(o, work, len(parts), procs, t0)


def _finish_workers(o, work: Path, n: int, procs: Procs, t0: float):
    """Release the workers' shared start signal, wait for them (bounded), kill what is left."""
    deadline = t0 + o.timeout
    released = _release(work, n, procs, deadline)
    ok = released and procs.wait(deadline)
    wall = time.time() - t0
    procs.kill()
    return ok, released, wall, procs


def _collect(o, work: Path, parts: list, ok: bool, released: bool, wall: float, procs: Procs) -> dict:
    row: dict[str, Any] = {"wall_s": wall}
    if not ok:
        bad = next((k for k, p in enumerate(procs.procs) if p.returncode not in (0, None)), 0)
        why = "timed out" if all(p.returncode in (0, None, -15) for p in procs.procs) else \
            f"replica {bad} rc {procs.procs[bad].returncode}"
        return row | {"error": f"{why}{'' if released else ' before every engine was ready'}: "
                               f"{_tail(work / f'log{bad}.txt')}"}
    times = [json.loads((work / f"time{k}.json").read_text()) for k in range(len(parts))]
    row.update(makespan_s=span([t["start"] for t in times], [t["end"] for t in times]),
               per_replica_s=[t["end"] - t["start"] for t in times],
               startup_s=[t.get("init_s") for t in times], lines_per_replica=[len(p) for p in parts])
    return row


def run_b(o: argparse.Namespace, lines: list[dict], out_dir: Path, config: str, key: str = "b") -> dict:
    """(b): engine core in the worker's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); (e): vLLM's default."""
    work = _fresh(out_dir / f"vs_vllm_{key}")
    parts = route(lines, o.replicas)
    ok, released, wall, procs = _run_workers(o, "llm", parts, work, {"limits": engine_limits(config),
                                                                     "max_model_len": o.max_model_len},
                                             multiprocessing=key == "e")
    row = _collect(o, work, parts, ok, released, wall, procs)
    if "error" not in row:
        res = [r for k in range(len(parts)) for r in read_jsonl(work / f"out{k}.jsonl")]
        write_jsonl(out_dir / f"vs_vllm_{key}.jsonl", res)
        row["outputs"] = str(out_dir / f"vs_vllm_{key}.jsonl")
    return row


def run_batch_args(o: argparse.Namespace, part: str, out: str, limits: dict, served: str = MODEL_NAME) -> list[str]:
    """``vllm run_batch``'s arguments (the same engine limits as (b)); ``served`` = the lines' model."""
    args = ["-i", part, "-o", out, "--model", o.model, "--served-model-name", served, "--dtype", "float32",
            "--max-model-len", str(o.max_model_len), "--enforce-eager", "--seed", "0"]
    if not o.run_batch_defaults:
        args += ["--max-num-seqs", str(limits["max_num_seqs"]),
                 "--max-num-batched-tokens", str(limits["max_num_batched_tokens"]),
                 "--num-gpu-blocks-override", str(limits["num_gpu_blocks_override"])]
    return args


def _worker_run_batch(spec: dict) -> None:
    """(c) ``python -m vllm.entrypoints.openai.run_batch ARGS``, with a barrier once the engine is
    built and the times of the first request and the last completion recorded (a shim: the same
    ``main(parse_args())`` the module runs)."""
    import asyncio

    sys.argv = ["run_batch"] + spec["args"]
    from vllm.entrypoints.launchers import run_batch as rb

    work, k = Path(spec["work"]), spec["k"]
    stamps: dict[str, float] = {}
    orig_run_batch, orig_request = rb.run_batch, rb.run_request

    async def timed_run_batch(engine_client, args):
        _barrier(work, k, spec["timeout"])
        return await orig_run_batch(engine_client, args)

    async def timed_request(*a, **kw):
        stamps.setdefault("start", time.time())
        try:
            return await orig_request(*a, **kw)
        finally:
            stamps["end"] = time.time()

    rb.run_batch, rb.run_request = timed_run_batch, timed_request
    asyncio.run(rb.main(rb.parse_args()))
    (work / f"time{k}.json").write_text(json.dumps(stamps))


def run_c(o: argparse.Namespace, lines: list[dict], out_dir: Path, config: str) -> dict:
    work = _fresh(out_dir / "vs_vllm_c")
    parts = split_even(lines, o.replicas)
    limits = engine_limits(config)
    served = lines[0]["body"].get("model") or MODEL_NAME if lines else MODEL_NAME
    args = [run_batch_args(o, str(work / f"part{k}.jsonl"), str(work / f"out{k}.jsonl"), limits, served)
            for k in range(o.replicas)]
    ok, released, wall, procs = _run_workers_c(o, parts, work, args)
    row = _collect(o, work, parts, ok, released, wall, procs)
    row["cmd"] = "python -m vllm.entrypoints.openai.run_batch " + " ".join(args[0])
    if "error" not in row:
        res = [r for k in range(len(parts)) for r in read_jsonl(work / f"out{k}.jsonl")]
        write_jsonl(out_dir / "vs_vllm_c.jsonl", res)
        row["outputs"] = str(out_dir / "vs_vllm_c.jsonl")
    return row


def _run_workers_c(o, parts, work: Path, args: list[list[str]]) -> tuple:
    procs, t0 = Procs(), time.time()
    for k, part in enumerate(parts):
        write_jsonl(work / f"part{k}.jsonl", part)
        spec = dict(work=str(work), k=k, args=args[k], timeout=o.timeout)
        (work / f"spec{k}.json").write_text(json.dumps(spec))
        env = vllm_env(k)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")          # as `run_batch` runs by default
        procs.start([o.python, "-m", "hybrid_ray.bench.vs_vllm", "--worker", "run-batch",
                     str(work / f"spec{k}.json")], work / f"log{k}.txt", env=env)
    return _finish_workers(o, work, len(parts), procs, t0)


def _worker_raydata(spec: dict) -> None:
    """(d) Ray Data LLM on a local Ray of ``replicas`` CPUs, the notes' CPU settings."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    t0 = time.time()
    lines = read_jsonl(spec["batch"])
    ray.init(num_cpus=spec["replicas"], include_dashboard=False, log_to_driver=False)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    limits = dict(spec["limits"])
    cfg = vLLMEngineProcessorConfig(
        model_source=spec["model"], concurrency=(spec["replicas"], spec["replicas"]), batch_size=8,
        log_engine_metrics=False,          # True needs ray[serve] (vLLM's Ray metrics import ray.serve)
        engine_kwargs=dict(dtype="float32", enforce_eager=True, max_model_len=spec["max_model_len"], seed=0,
                           **limits),
        placement_group_config={"bundles": [{"CPU": 0.5}]}, runtime_env={"env_vars": env},
        chat_template_stage={"num_cpus": 0.1}, tokenize_stage={"num_cpus": 0.1},
        detokenize_stage={"num_cpus": 0.1})
    small = {"num_cpus": 0.1}

    def pre(row: dict) -> dict:
        b = row["body"]
        return {"custom_id": row["custom_id"], "messages": b["messages"],
                "sampling_params": {"temperature": b.get("temperature", 1.0), "max_tokens": b["max_tokens"],
                                    "seed": b.get("seed"), "ignore_eos": bool(b.get("ignore_eos", False))}}

    def post(row: dict) -> dict:
        return {"custom_id": row["custom_id"], "text": row["generated_text"],
                "tokens": int(row["num_generated_tokens"]), "taken": float(row["time_taken_llm"]),
                "done": time.time()}

    proc = build_processor(cfg, preprocess=pre, postprocess=post, preprocess_map_kwargs=small,
                           postprocess_map_kwargs=small)
    ds = ray.data.from_items([{"custom_id": ln["custom_id"], "body": ln["body"]} for ln in lines])
    t_setup = time.time() - t0
    rows = proc(ds).take_all()
    ray.shutdown()
    res = [{k: r[k] for k in ("custom_id", "text", "tokens")} for r in rows]
    write_jsonl(spec["out"], res)
    starts = [r["done"] - r["taken"] for r in rows if r["taken"] >= 0]
    Path(spec["time"]).write_text(json.dumps({"start": min(starts), "end": max(r["done"] for r in rows),
                                              "setup_s": t_setup, "engine_s": [r["taken"] for r in rows]}))


def run_d(o: argparse.Namespace, batch: Path, out_dir: Path, config: str) -> dict:
    work = _fresh(out_dir / "vs_vllm_d")
    spec = dict(batch=str(batch), model=o.model, replicas=o.replicas, limits=engine_limits(config),
                max_model_len=o.max_model_len, out=str(out_dir / "vs_vllm_d.jsonl"), time=str(work / "time.json"))
    (work / "spec.json").write_text(json.dumps(spec))
    Path(spec["out"]).unlink(missing_ok=True)
    procs, t0 = Procs(), time.time()
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    procs.start([o.python, "-m", "hybrid_ray.bench.vs_vllm", "--worker", "raydata", str(work / "spec.json")],
                work / "log.txt", env=env)
    ok = procs.wait(t0 + o.timeout)
    wall = time.time() - t0
    procs.kill()
    row: dict[str, Any] = {"wall_s": wall}
    if not ok:
        return row | {"error": f"timed out after {o.timeout:.0f} s (on CPU: {_tail(work / 'log.txt', 2)})"}
    if procs.procs[0].returncode != 0:
        return row | {"error": f"rc {procs.procs[0].returncode}: {_tail(work / 'log.txt')}"}
    t = json.loads((work / "time.json").read_text())
    row.update(makespan_s=t["end"] - t["start"], setup_s=t["setup_s"], outputs=spec["out"])
    return row


def _texts(key: str, row: dict) -> dict[str, tuple[str, int, str]]:
    """custom_id -> (text, tokens, finish) of a system's outputs."""
    path = row.get("outputs")
    if not path or not Path(path).exists():
        return {}
    if key in ("a", "c"):
        return openai_output_texts(path)
    return {r["custom_id"]: (r["text"], int(r["tokens"]), r.get("finish_reason") or "") for r in read_jsonl(path)}


def _replica_config(config: str, replicas: int, out_dir: Path) -> str:
    """The config with its (single) group's count set to ``replicas`` (written next to the results)."""
    from ..config import load_cluster

    cl = load_cluster(config)
    if cl.num_replicas == replicas:
        return config
    import yaml

    src = Path(cl.source) if Path(str(cl.source)).is_file() else Path(config)
    data = yaml.safe_load(src.read_text())
    if len(data["groups"]) != 1:
        raise SystemExit(f"{config}: --replicas needs a config with one group")
    data["groups"][0]["count"] = replicas
    p = out_dir / f"vs_vllm_config_{replicas}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(p)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(prog="python -m hybrid_ray.bench.vs_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="GSM8K questions (default 200)")
    p.add_argument("--replicas", type=int, default=2, help="engines, one core each (default 2)")
    p.add_argument("--model", default=None, help="model directory (default: build one with "
                   "hybrid_ray.engines.tiny_model into the output folder)")
    p.add_argument("--config", default=str(root / "cluster_configs" / "cpu_vllm.yaml"),
                   help="cluster YAML whose first group's limits every system gets (default cpu_vllm.yaml)")
    p.add_argument("--input", default=None, help="an OpenAI chat batch file instead of GSM8K")
    p.add_argument("--system-words", type=int, default=0, help="GSM8K lines share a system prompt of this many "
                   "words (default 0: none); prefix caching, on in every system as in vLLM, reuses it")
    p.add_argument("--questions", default=None, help="GSM8K test.jsonl (default ../shared/data/gsm8k/test.jsonl)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max_tokens per line (default 128)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ignore-eos", action="store_true", help="every line generates exactly --max-tokens (the same "
                   "work everywhere, as hybrid-ray's token-count path does)")
    p.add_argument("--systems", default="abcde", help="which of a b c d e to run (default abcde; e = (b) with "
                   "the engine core in its own process)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per system (default 300)")
    p.add_argument("--python", default=sys.executable, help="interpreter with vLLM (default: this one)")
    p.add_argument("--run-batch-defaults", action="store_true",
                   help="(c): run_batch's own engine defaults instead of the config's limits")
    p.add_argument("--out", default="results/vs_vllm.json", help="JSON; the batch, outputs and vs_vllm.md go "
                   "next to it (default results/vs_vllm.json)")
    return p.parse_args(argv)


def default_model(out_dir: Path) -> str:
    """The tiny LLaMA built offline into the output folder (once)."""
    from ..engines.tiny_model import build_tiny_model

    d = out_dir / "tiny_model"
    if not (d / "config.json").exists():
        build_tiny_model(str(d), seed=0)
    return str(d)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        spec = json.loads(Path(argv[2]).read_text())
        {"llm": _worker_llm, "run-batch": _worker_run_batch, "raydata": _worker_raydata}[argv[1]](spec)
        return {}
    o = parse_args(argv)
    out = Path(o.out)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    o.model = str(Path(o.model).resolve()) if o.model else default_model(out_dir)
    config = _replica_config(o.config, o.replicas, out_dir)
    batch = out_dir / "vs_vllm_batch.jsonl"
    if o.input:
        lines = read_jsonl(o.input)[:o.n]
    else:
        qp = questions_path(o.questions)
        if qp is None:
            raise SystemExit("GSM8K question text not found: pass --questions PATH/test.jsonl or --input FILE")
        lines = make_batch_lines(load_questions(qp, o.n), o.max_tokens, ignore_eos=o.ignore_eos,
                                 system=shared_system_prompt(o.system_words) if o.system_words > 0 else None)
    write_jsonl(batch, lines)
    print(f"{len(lines)} chat lines -> {batch}; model {o.model}; {o.replicas} replicas, one core each; "
          f"limits {engine_limits(config)}", flush=True)
    runners = {"a": lambda: run_a(o, batch, out_dir, config), "b": lambda: run_b(o, lines, out_dir, config),
               "c": lambda: run_c(o, lines, out_dir, config), "d": lambda: run_d(o, batch, out_dir, config),
               "e": lambda: run_b(o, lines, out_dir, config, "e")}
    rows: dict[str, dict] = {}
    texts: dict[str, dict[str, str]] = {}
    for key in [k for k in SYSTEMS if k in o.systems]:
        print(f"({key}) {LABELS[key]} ...", flush=True)
        load0 = os.getloadavg()[0]
        try:
            row = runners[key]()
        except Exception as exc:                     # noqa: BLE001 -- one system failing must not stop the rest
            row = {"error": f"{type(exc).__name__}: {exc}"}
        row.update(label=LABELS[key], how=HOW[key], loadavg_1m=[load0, os.getloadavg()[0]])
        got = _texts(key, row) if "error" not in row else {}
        if got:
            row["output_tokens"] = sum(t for _, t, _ in got.values())
            row["completed"] = len(got)
            row["finish_stop"] = sum(1 for *_, f in got.values() if f == "stop")
            texts[key] = {c: t for c, (t, _, _) in got.items()}
        elif "error" not in row:
            row["error"] = "no outputs"
        rows[key] = row
        print(f"    {json.dumps({k: v for k, v in row.items() if k not in ('how', 'label', 'cmd')})}", flush=True)
    with_ratios(rows)
    ids = [ln["custom_id"] for ln in lines]
    agree = agreement(texts, ids)
    table = format_table(rows)
    empty = {k: sum(1 for t in v.values() if not t) for k, v in texts.items()}
    notes = [f"{len(lines)} GSM8K chat lines, max_tokens {o.max_tokens}, greedy (temperature 0, seed 0)"
             f"{', ignore_eos' if o.ignore_eos else ''}; "
             f"{o.replicas} replicas, one core each; model {o.model}",
             format_agreement(agree)]
    if any(empty.values()):
        notes.append("empty output texts: " + ", ".join(f"({k}) {v}" for k, v in empty.items() if v))
    notes += [f"({k}) makespan: {HOW[k]}" for k in rows]
    md = table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print("\n" + md)
    data = {"n": len(lines), "replicas": o.replicas, "model": o.model, "config": config,
            "max_tokens": o.max_tokens, "limits": engine_limits(config), "systems": rows, "agreement": agree,
            "empty_texts": empty, "batch": str(batch)}
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return data


if __name__ == "__main__":
    main()
