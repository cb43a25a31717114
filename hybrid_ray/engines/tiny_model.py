"""A tiny LLaMA model directory built offline: real tokenizer, chat template, random weights.

Tests and demos of the real path (``--engine transformers|vllm`` over an OpenAI batch file) need
a model directory that both transformers and vLLM load like any Hugging Face checkpoint, without
downloading anything. ``build_tiny_model`` writes one:

* ``tokenizer.json``: a byte-level BPE trained with ``tokenizers`` on the bundled GSM8K test set
  (questions and answers), special tokens ``<unk>`` ``<s>`` ``</s>`` (ids 0, 1, 2 as in LLaMA)
  and a post-processor that prepends ``<s>``; ``tokenizer_config.json`` with a Jinja chat template;
* ``config.json`` + ``model.safetensors``: a ``LlamaForCausalLM`` with seeded random weights,
  untied embeddings, head dim 64 (vLLM's CPU attention rejects smaller heads), and the EOS row of
  ``lm_head`` scaled by ``eos_scale``, so a share of greedy requests stop early (EOS) and the
  others at max_tokens: both finish reasons occur;
* ``generation_config.json``.

Idempotent: a directory already holding a complete model built with the same arguments is
returned as is (``hybrid_ray_tiny_model.json`` records them). Needs torch, transformers and
tokenizers (the ``[engine]`` extra).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HybridRayError
from ..tokens import SPECIAL_TOKENS, train_bpe

MARKER = "hybrid_ray_tiny_model.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", MARKER)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class TinyModelError(HybridRayError):
    """The target exists and is not a tiny model directory, or the [engine] extra is missing."""


@dataclass(frozen=True, slots=True)
class TinyModelArgs:
    seed: int = 0
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 2
    layers: int = 2
    ffn: int = 256
    vocab: int = 512
    max_positions: int = 1024
    eos_scale: float = 3.0


def build_tiny_model(path: str | Path, *, seed: int = 0, hidden: int = 128, heads: int = 2, kv_heads: int = 2,
                     layers: int = 2, ffn: int = 256, vocab: int = 512, max_positions: int = 1024,
                     eos_scale: float = 3.0) -> Path:
    """Write (or find) a tiny LLaMA model directory at ``path``; see the module docstring."""
    args = TinyModelArgs(seed, hidden, heads, kv_heads, layers, ffn, vocab, max_positions, float(eos_scale))
    if hidden % heads or heads % kv_heads or hidden // heads != 64:
        raise TinyModelError(f"tiny model: hidden / heads must be 64 (vLLM's CPU attention) and heads must "
                             f"divide by kv_heads; got hidden={hidden}, heads={heads}, kv_heads={kv_heads}")
    p = Path(path)
    if _complete(p, args):
        return p
    if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not (p / MARKER).is_file())):
        raise TinyModelError(f"{p}: exists and is not a tiny model directory; choose a new or empty directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent))
    try:
        _write(tmp, args)
        if p.exists():
            shutil.rmtree(p)                       # empty, or an earlier tiny model with other arguments
        os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return p


def _complete(p: Path, args: TinyModelArgs) -> bool:
    try:
        recorded = json.loads((p / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == asdict(args) and all((p / f).is_file() for f in FILES)


def _write(d: Path, a: TinyModelArgs) -> None:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise TinyModelError(f"building a tiny model needs the [engine] extra ({e}): "
                             f"pip install torch==2.13.0 && pip install -e '.[engine]'") from None
    tok = train_bpe(a.vocab)
    tok.save(str(d / "tokenizer.json"))
    unk, bos, eos = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": a.max_positions, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False}, indent=2))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.max_positions, tie_word_embeddings=False, bos_token_id=bos,
        eos_token_id=eos)
    torch.manual_seed(a.seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[eos] *= a.eos_scale
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos)
    model.save_pretrained(str(d), safe_serialization=True)
    (d / MARKER).write_text(json.dumps(asdict(a), indent=2))


__all__ = ["TinyModelArgs", "TinyModelError", "build_tiny_model"]
