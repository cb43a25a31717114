"""Iteration-time model of one replica: how long a prefill, decode or mixed iteration takes.

Why this form (fitted on the measured H100 profiles in ``shared/data/profiles``):

* Decode is memory-bandwidth bound: every step streams the weights once (``base``), plus a
  small per-sequence cost and the KV-cache read, linear in the total context of the batch::

      decode(B, C) = base + per_seq * B + per_ctx_token * C        (C = sum of contexts)

* Prefill is bandwidth bound for short prompts (128 and 256 tokens cost about one decode step)
  and compute bound for long ones, plus causal attention, quadratic in each prompt's length::

      prefill(T, A) = max(floor, base + per_token * T) + per_token_sq * A
      T = sum of prompt tokens,  A = sum of c_i * (2 * prefix_i + c_i) over the chunks c_i
      (a whole prompt is one chunk with no prefix: L_i^2; the chunks of a prompt sum to L_i^2)

* A mixed (chunked-prefill) iteration runs the chunks and one token of every decoding sequence
  through the same weights: it costs at least the decode alone, and when the chunk makes it
  compute bound, the decode tokens add their linear cost::

      mixed = max(decode(B, C), prefill(T, A) + per_seq * B + per_ctx_token * C)

All times are float seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True, slots=True)
class PrefillCost:
    floor_s: float
    base_s: float
    per_token_s: float
    per_token_sq_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DecodeCost:
    base_s: float
    per_seq_s: float
    per_ctx_token_s: float


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill: PrefillCost
    decode: DecodeCost

    # -- evaluation (hot path: plain float arithmetic, no allocation) --------------------------
    def prefill_time(self, tokens: int, attn_sq: float) -> float:
        """One prefill iteration over ``tokens`` prompt tokens with attention work ``attn_sq``."""
        p = self.prefill
        lin = p.base_s + p.per_token_s * tokens
        return (lin if lin > p.floor_s else p.floor_s) + p.per_token_sq_s * attn_sq

    def decode_time(self, batch: int, ctx_tokens: int) -> float:
        """One decode step of ``batch`` sequences holding ``ctx_tokens`` tokens of context."""
        d = self.decode
        return d.base_s + d.per_seq_s * batch + d.per_ctx_token_s * ctx_tokens

    def mixed_time(self, tokens: int, attn_sq: float, batch: int, ctx_tokens: int) -> float:
        """A chunked-prefill iteration: prefill chunks plus one decode token per running sequence."""
        if tokens == 0:
            return self.decode_time(batch, ctx_tokens)
        if batch == 0:
            return self.prefill_time(tokens, attn_sq)
        d = self.decode
        dec = self.decode_time(batch, ctx_tokens)
        pre = self.prefill_time(tokens, attn_sq) + d.per_seq_s * batch + d.per_ctx_token_s * ctx_tokens
        return dec if dec > pre else pre

    def prompt_prefill_time(self, lengths: Iterable[int]) -> float:
        """Prefill of whole prompts (no cached prefix) in one iteration."""
        tokens = 0
        sq = 0
        for n in lengths:
            tokens += n
            sq += n * n
        return self.prefill_time(tokens, sq)

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"prefill": asdict(self.prefill), "decode": asdict(self.decode)}

    def scaled(self, factor: float, decode_factor: float | None = None) -> "CostModel":
        """Every time multiplied by ``factor`` (e.g. 1/efficiency of tensor parallelism); decode's by
        ``decode_factor`` instead where given (calibration scales the two phases separately)."""
        p, d = self.prefill, self.decode
        f, g = factor, factor if decode_factor is None else decode_factor
        return CostModel(
            PrefillCost(p.floor_s * f, p.base_s * f, p.per_token_s * f, p.per_token_sq_s * f),
            DecodeCost(d.base_s * g, d.per_seq_s * g, d.per_ctx_token_s * g),
        )
