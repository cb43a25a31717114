"""TransformersEngine: a real causal LM (Hugging Face transformers) run one iteration at a time.

The replica's policy and ``ReplicaState.begin`` decide what runs; this engine only executes it:
the prefill chunks of ``it.prefill`` and, if ``it.decode``, one token for every running sequence.
Durations are measured wall seconds (``time_scale`` is 1).

Two kinds of request. A count-only request (no payload: emulation studies, presets) gets a
synthetic prompt, greedy outputs and EOS ignored, so it generates exactly ``output_tokens``
tokens, as the state machine assumes. A real request (``req.payload``: an OpenAI batch line
tokenized by the model's own tokenizer) runs its prompt token ids with its sampling (greedy at
temperature 0; else penalties, temperature, top-k, top-p with a per-request ``torch.Generator``
seeded by ``seed``) and stops, in vLLM's order, at EOS (unless ``ignore_eos``), at a stop string
(the text is cut before it, as vLLM does), or at max_tokens. Every real request the engine
finishes comes back as a ``Completion`` in ``EngineResult.completions``; ``ReplicaState.settle``
frees one our state still counts as running (an early stop), which is how the state learns
its true length.

KV cache. Each sequence keeps its own KV buffer (allocated once for prompt + output tokens).
Prefill rows (whole prompts, chunks, recomputes) run as one padded batch: per row ``[its past,
left-padded to the longest][its new tokens, right-padded]``, a mask hiding the past's padding,
explicit position ids; the causal mask keeps real queries off the right padding. Decode rows run
packed into a single row (every past back to back, a 4-D mask letting each new token see only
its own past), so unequal contexts cost their total, not the longest x B. A mixed iteration runs
both forward passes; the measured duration covers both. A preempted sequence loses its cache and
keeps its tokens; its next prefill recomputes prompt + generated tokens, exactly as
``ReplicaState`` counts it, and decoding continues unchanged (a sampling request keeps its
generator). A sequence lost with its replica starts again from its prompt elsewhere.

Synthetic prompts: token ids drawn from a generator seeded by the request id, identical on every
replica and in every process.

Models: a preset name (``tiny``, ``small``, ``llama-7b``, ...; random weights from a fixed seed,
nothing downloaded), a preset with overrides (``llama-7b:layers=4``), or a local model directory
(``from_pretrained(..., local_files_only=True)``). The forward passes run in a worker thread
(``asyncio.to_thread``) so the actor's event loop keeps answering polls and adds.
"""
from __future__ import annotations

import asyncio
import ctypes
import inspect
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HybridRayError
from ..payload import LENGTH, STOP, Completion, Payload, SamplingSpec
from ..replica import Iteration, ReplicaState, Sequence
from .base import EngineResult
from .model_dir import check_model_dir

# LLaMA shapes: hidden, intermediate (FFN), layers, attention heads, KV heads, vocab
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, ffn=172, layers=2, heads=4, kv_heads=4, vocab=256),
    "small": dict(hidden=256, ffn=688, layers=4, heads=8, kv_heads=8, vocab=2048),
    "llama-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama-13b": dict(hidden=5120, ffn=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
}
MAX_POSITIONS = 8192


class EngineSetupError(HybridRayError):
    """The engine's optional dependencies are missing, or its model cannot be found."""


def parse_model(model: str) -> dict[str, int] | None:
    """``PRESET`` or ``PRESET:key=int,...`` -> LLaMA shape; None if it is not a preset (a path)."""
    name, _, over = model.partition(":")
    if name not in PRESETS:
        return None
    shape = dict(PRESETS[name])
    for item in filter(None, over.split(",")):
        key, _, val = item.partition("=")
        if key not in shape or not val.isdigit() or int(val) < 1:
            raise EngineSetupError(f"--model {model}: bad override {item!r}; expected KEY=INT with KEY one of "
                                   f"{', '.join(shape)}")
        shape[key] = int(val)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise EngineSetupError(f"--model {model}: hidden must divide by heads, heads by kv_heads")
    return shape


def check_model(model: str) -> None:
    """Fail early (on the driver, before actors start, no torch import) for a model that is neither a
    preset nor a loadable directory: missing, no config.json or tokenizer, unknown architecture."""
    if parse_model(model) is not None:
        return
    if not Path(model).exists():
        raise EngineSetupError(f"--model {model}: no such model directory, and not a preset "
                               f"({', '.join(PRESETS)}, or PRESET:layers=N,...)")
    check_model_dir(model, "transformers")


def load_model(model: str, device: str = "cpu", dtype: str | None = None, seed: int = 0):
    """The causal LM, in eval mode on ``device``: random LLaMA weights for a preset, else from a directory."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise EngineSetupError(f"the transformers engine needs the [engine] extra ({e}); install with "
                               f"`pip install torch==2.13.0 && pip install -e '.[engine]'`") from None
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    shape = parse_model(model)
    if shape is None:
        check_model(model)
        m = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch_dtype)
        return m.to(device).eval()
    cfg = transformers.LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(seed)
    with torch.device(device):
        m = transformers.LlamaForCausalLM(cfg)
    return m.to(torch_dtype).eval()


def load_tokenizer(model: str):
    """The model directory's own tokenizer, or None (a preset, or a directory without one: synthetic path)."""
    if parse_model(model) is not None or not any((Path(model) / f).is_file()
                                                  for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Token ids that end a real request: the tokenizer's EOS and the generation config's (as vLLM)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return frozenset(ids)


def keep_freed_memory() -> None:
    """Let glibc reuse freed tensor memory instead of returning it to the OS (best effort, Linux).

    Each iteration allocates padded KV temporaries of a few MiB; above glibc's mmap threshold
    every one of them is mapped and page-faulted afresh, which made CPU decode steps 2-3x slower
    and nonlinear in the context length (so no cost model could fit them).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 25)       # M_MMAP_THRESHOLD: 32 MiB, glibc's maximum
        libc.mallopt(-1, 1 << 30)       # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def synthetic_tokens(key: str, n: int, vocab: int) -> list[int]:
    """``n`` token ids in [1, vocab) determined by ``key`` (a request id), in any process."""
    return np.random.default_rng(zlib.crc32(key.encode())).integers(1, vocab, n).tolist()


@dataclass(slots=True, eq=False)
class _Seq:
    tokens: list[int]            # prompt + generated
    prompt: int
    limit: int                   # output tokens to generate at most (the request's output_tokens)
    kv: Any = None               # (prompt + limit, layers, 2, kv_heads, head_dim), token-major, allocated once
    cached: int = 0              # tokens of ``kv`` that are valid
    sampling: SamplingSpec | None = None   # a real request (payload); None: greedy, EOS ignored
    generator: Any = None        # torch.Generator of a sampling request
    counts: dict[int, int] | None = None   # generated token -> count (presence / frequency penalties)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt:]


@dataclass(slots=True)
class StepResult:
    seconds: float                                            # measured wall time of the forward passes
    tokens: dict[str, int] = field(default_factory=dict)      # new token by sequence id
    finished: list[str] = field(default_factory=list)         # sequences that reached their limit or stopped
    completions: dict[str, Completion] = field(default_factory=dict)   # finished real requests


class TransformersEngine:
    """Runs iterations on a transformers causal LM; see the module docstring."""

    time_scale = 1.0
    behind_s = 0.0

    def __init__(self, model: str = "tiny", device: str = "cpu", seed: int = 0, dtype: str | None = None,
                 threads: int | None = None, keep_outputs: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cpu":
            keep_freed_memory()
        self.torch = torch
        self.model_name = model
        self.device = device
        self.seed = seed
        self.model = load_model(model, device, dtype, seed)
        self.tokenizer = load_tokenizer(model)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        cfg = self.model.config
        self.vocab = int(cfg.vocab_size)
        self.layers = int(cfg.num_hidden_layers)
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.2x
        self.keep_outputs = keep_outputs
        self.outputs: dict[str, list[int]] = {}    # generated tokens of finished sequences (keep_outputs)
        self._seqs: dict[str, _Seq] = {}
        self.iterations = 0
        self.warmup()

    def warmup(self, batch: int = 4, prompt: int = 64, steps: int = 8) -> None:
        """A few untimed iterations, so one-time costs (lazy init, allocator growth) stay out of the run."""
        keys = [f"warmup-{i}" for i in range(batch)]
        for k in keys:
            self.add_sequence(k, prompt, steps + 2)
        self.step([(k, 0, prompt) for k in keys], [])
        for _ in range(steps):
            self.step([], keys)
        for k in keys:
            self.forget(k)

    # -- the Engine protocol --------------------------------------------------------------------
    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult:
        self._drop_preempted(state)
        prefill = []
        for s, n in it.prefill:
            self._ensure(s)
            prefill.append((s.id, s.prefilled - n, n))      # begin() already counted this chunk
        decode = [s.id for s in state.running.values()] if it.decode else []
        res = await asyncio.to_thread(self.step, prefill, decode)   # the actor keeps answering polls
        return EngineResult(res.seconds, res.completions)

    def reset_pace(self) -> None:
        """Nothing to pace: a real engine's iterations take the time they take."""

    def reset(self) -> None:
        """Forget every sequence and its cache (after a failed step: they restart from their prompts)."""
        self._seqs.clear()

    # -- sequences ------------------------------------------------------------------------------
    def add_sequence(self, key: str, prompt: int, limit: int, generated: int = 0) -> None:
        """Register a sequence (synthetic prompt; ``generated`` filler tokens if it arrives part-done)."""
        toks = synthetic_tokens(key, prompt + generated, self.vocab)
        self._seqs[key] = _Seq(toks, prompt, limit)

    def add_payload(self, key: str, payload: Payload, limit: int) -> None:
        """Register a real request: its prompt token ids, sampling and stops (see the module docstring)."""
        sp = payload.sampling
        gen = None
        if not sp.greedy:
            gen = self.torch.Generator(device="cpu")
            gen.manual_seed(sp.seed if sp.seed is not None else zlib.crc32(key.encode()) ^ self.seed)
        counts = {} if (sp.presence_penalty or sp.frequency_penalty) else None
        self._seqs[key] = _Seq(list(payload.token_ids), len(payload.token_ids), limit, sampling=sp,
                               generator=gen, counts=counts)

    def forget(self, key: str) -> None:
        self._seqs.pop(key, None)

    def _ensure(self, s: Sequence) -> None:
        if s.id in self._seqs:
            return
        if s.req.payload is None:
            # a sequence that generated tokens elsewhere (moved after a failure) continues from filler tokens
            self.add_sequence(s.id, s.req.prompt_tokens, s.req.output_tokens, s.generated)
            return
        if s.generated:
            raise RuntimeError(f"{s.id}: a real request that generated {s.generated} tokens on another replica "
                               f"reached this one; it must restart from its prompt (generated = 0)")
        self.add_payload(s.id, s.req.payload, s.req.output_tokens)

    def _drop_preempted(self, state: ReplicaState) -> None:
        """Free the cache of sequences that lost their batch slot (recompute preemption)."""
        for key, q in self._seqs.items():
            if q.kv is not None and key not in state.running and key not in state.prefilling:
                q.kv, q.cached = None, 0

    # -- one iteration --------------------------------------------------------------------------
    def step(self, prefill: list[tuple[str, int, int]], decode: list[str]) -> StepResult:
        """Prefill chunks ``(id, start, n)`` and decode ``ids`` by one token; measured, synchronous."""
        t0 = time.perf_counter()
        new: dict[str, int] = {}
        with self.torch.inference_mode():
            if prefill:
                new.update(self._prefill([self._row(k, start, n) for k, start, n in prefill]))
            if decode:
                new.update(self._decode([self._row(k, len(self._seqs[k].tokens) - 1, 1) for k in decode]))
            if self.device.startswith("cuda"):
                self.torch.cuda.synchronize()
        res = StepResult(time.perf_counter() - t0, new)
        for key, tok in new.items():
            q = self._seqs[key]
            q.tokens.append(tok)
            if q.sampling is None:
                if len(q.tokens) - q.prompt < q.limit:
                    continue
            else:
                if q.counts is not None:
                    q.counts[tok] = q.counts.get(tok, 0) + 1
                c = self._stopped(q, tok)
                if c is None:
                    continue
                res.completions[key] = c
            res.finished.append(key)
            if self.keep_outputs:
                self.outputs[key] = q.generated
            del self._seqs[key]
        self.iterations += 1
        return res

    def _stopped(self, q: _Seq, tok: int) -> Completion | None:
        """The completion of a real request that stops at ``tok``, else None. vLLM's order: EOS, a stop
        string (text cut before it), max_tokens. The EOS token counts as generated, not as text."""
        sp = q.sampling
        gen = q.generated
        if tok in self.eos_ids and not sp.ignore_eos:
            return Completion(gen, self._decode_text(gen), STOP)
        if sp.stop:
            text = self._decode_text(gen)
            for stop in sp.stop:
                i = text.find(stop)
                if i >= 0:
                    return Completion(gen, text[:i], STOP)
            if len(gen) >= q.limit:
                return Completion(gen, text, LENGTH)
            return None
        if len(gen) >= q.limit:
            return Completion(gen, self._decode_text(gen), LENGTH)
        return None

    def _decode_text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _row(self, key: str, start: int, n: int) -> tuple[_Seq, str, int, int]:
        q = self._seqs[key]
        if start and start != q.cached:
            raise RuntimeError(f"{key}: cache holds {q.cached} tokens, iteration starts at {start}")
        if start + n > len(q.tokens):
            raise RuntimeError(f"{key}: chunk {start}+{n} beyond its {len(q.tokens)} tokens")
        return q, key, start, n

    def _prefill(self, rows: list[tuple[_Seq, str, int, int]]) -> dict[str, int]:
        """Prompts or chunks as a padded batch: ``[past, left-padded][new tokens, right-padded]`` per row."""
        from transformers import DynamicCache

        torch, dev = self.torch, self.device
        B = len(rows)
        P = max(start for _, _, start, _ in rows)
        N = max(n for _, _, _, n in rows)
        ids = torch.zeros((B, N), dtype=torch.long)
        for b, (q, _, start, n) in enumerate(rows):
            ids[b, :n] = torch.tensor(q.tokens[start:start + n])
        starts = torch.tensor([start for _, _, start, _ in rows])
        kwargs: dict[str, Any] = {}
        cache = DynamicCache()
        if P > 0:
            empty = next(q.kv for q, _, start, _ in rows if start)[:0]
            past = torch.nn.utils.rnn.pad_sequence([q.kv[:start] if start else empty for q, _, start, _ in rows],
                                                   batch_first=True, padding_side="left")   # (B, P, L, 2, H, D)
            cache = DynamicCache([(past[:, :, i, 0].transpose(1, 2), past[:, :, i, 1].transpose(1, 2))
                                  for i in range(past.shape[2])])
            if int(starts.min()) < P:                        # hide the left padding of shorter pasts
                mask = torch.ones((B, P + N), dtype=torch.long)
                mask[:, :P] = (torch.arange(P)[None, :] >= (P - starts)[:, None]).long()
                kwargs["attention_mask"] = mask.to(dev)
        kwargs[self._cache_kw] = cache
        pos = starts[:, None] + torch.arange(N)[None, :]
        out = self.decoder(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=True, **kwargs)
        # the new tokens' KV (appended to ``cache`` in place): (L, 2, B, H, N, D) -> (B, N, L, 2, H, D)
        new = torch.stack([torch.stack((k[:, :, P:], v[:, :, P:])) for k, v in _layer_kv(cache)])
        new = new.permute(2, 4, 0, 1, 3, 5)
        for b, (q, _, start, n) in enumerate(rows):
            self._store(q, start, new[b, :n])
        done = [b for b, (q, _, start, n) in enumerate(rows) if start + n == len(q.tokens)]
        if not done:
            return {}
        last = torch.tensor([rows[b][3] - 1 for b in done], device=dev)
        return self._next_tokens([rows[b][1] for b in done],
                                 out.last_hidden_state[torch.tensor(done, device=dev), last])

    def _decode(self, rows: list[tuple[_Seq, str, int, int]]) -> dict[str, int]:
        """One token per sequence, packed into a single row: no padding, whatever the contexts.

        The cache row is every sequence's past back to back, the input their last tokens, and a
        4-D mask lets each token see only its own past (and itself). Padding to the longest
        context would make a decode step cost ~30 % more on GSM8K-like batches than the
        context-linear cost model says; attending over the whole row costs B x context instead,
        which is cheap at the batch sizes this engine is for.
        """
        from transformers import DynamicCache

        torch, dev = self.torch, self.device
        lens = [start for _, _, start, _ in rows]
        B, C = len(rows), sum(lens)
        past = torch.cat([q.kv[:start] for q, _, start, _ in rows])          # (C, L, 2, H, D)
        cache = DynamicCache([(past[:, i, 0].transpose(0, 1)[None], past[:, i, 1].transpose(0, 1)[None])
                              for i in range(past.shape[1])])
        seg = torch.cat([torch.repeat_interleave(torch.arange(B), torch.tensor(lens)), torch.arange(B)])
        mask = (seg[None, :] == torch.arange(B)[:, None])[None, None]      # (1, 1, B, C + B)
        ids = torch.tensor([[q.tokens[start] for q, _, start, _ in rows]])
        out = self.decoder(input_ids=ids.to(dev), position_ids=torch.tensor([lens]).to(dev),
                           attention_mask=mask.to(dev), use_cache=True, **{self._cache_kw: cache})
        # the new tokens' KV: (L, 2, H, B, D) -> (B, L, 2, H, D)
        new = torch.stack([torch.stack((k[0, :, C:], v[0, :, C:])) for k, v in _layer_kv(cache)])
        new = new.permute(3, 0, 1, 2, 4)
        for b, (q, _, start, _) in enumerate(rows):
            self._store(q, start, new[b:b + 1])
        return self._next_tokens([key for _, key, _, _ in rows], out.last_hidden_state[0])

    def _store(self, q: _Seq, start: int, kv) -> None:
        """Write KV of tokens ``start...`` into the sequence's buffer (allocated at its first use)."""
        if q.kv is None:
            q.kv = kv.new_empty((q.prompt + q.limit, *kv.shape[1:]))
        q.kv[start:start + kv.shape[0]] = kv
        q.cached = start + kv.shape[0]

    def _next_tokens(self, keys: list[str], hidden) -> dict[str, int]:
        """Each row's next token: the argmax, except for requests that sample or have penalties."""
        logits = self.head(hidden)
        toks = logits.argmax(-1).tolist()                    # greedy; .tolist() waits for the device
        for b, key in enumerate(keys):
            q = self._seqs[key]
            sp = q.sampling
            if sp is not None and not (sp.greedy and q.counts is None):
                toks[b] = self._sample(q, logits[b].float().cpu().clone())
        return dict(zip(keys, toks))

    def _sample(self, q: _Seq, logits) -> int:
        """vLLM's order: presence / frequency penalties on generated tokens, then greedy, or temperature,
        top-k, top-p and a draw from the request's own generator."""
        torch, sp = self.torch, q.sampling
        if q.counts:
            ids = torch.tensor(list(q.counts), dtype=torch.long)
            n = torch.tensor(list(q.counts.values()), dtype=logits.dtype)
            logits[ids] -= sp.frequency_penalty * n + sp.presence_penalty
        if sp.greedy:
            return int(logits.argmax())
        logits = logits / sp.temperature
        if 0 < sp.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sp.top_k).values[-1]
            logits[logits < kth] = -float("inf")
        if sp.top_p < 1.0:
            order = torch.argsort(logits, descending=True)
            probs = torch.softmax(logits[order], -1)
            drop = torch.cumsum(probs, -1) - probs > sp.top_p   # keep the smallest prefix reaching top_p
            logits[order[drop]] = -float("inf")
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=q.generator))


def _layer_kv(cache) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a DynamicCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
