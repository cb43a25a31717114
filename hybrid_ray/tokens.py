"""Counting a prompt text's tokens, for workload lines that give the text but no ``prompt_tokens``.

The count is what the simulator charges, so it should be the model's: ``count_prompt_tokens`` takes
a tokenizer (``prompt_counter(encoder)`` wraps a model directory's, ``prompts.PromptEncoder``), and
without one uses the bundled tokenizer: the byte-level BPE the offline tiny model is built with
(``engines/tiny_model.py``, trained on the bundled GSM8K text in about 0.2 s, once per process; it needs
``tokenizers``, which the ``[engine]`` extra brings). Without ``tokenizers``, the OpenAI batch adapter's
estimate: ``ceil(characters / 4)``, and for a chat ``4 + ceil(characters / 4)`` per message.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

Counter = Callable[[Any], int]     # a completion prompt (str) or chat messages ([{role, content}]) -> tokens

CHARS_PER_TOKEN = 4                # openai_batch's estimate (kept equal to it: tests/test_length_predictor.py)
CHAT_MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: Any) -> int:
    """The character estimate: ceil(len / 4); a chat: 4 + ceil(len / 4) per message."""
    if isinstance(text, str):
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
    return max(1, sum(CHAT_MESSAGE_OVERHEAD_TOKENS + math.ceil(len(m["content"]) / CHARS_PER_TOKEN) for m in text))


def _chat_text(messages: list[dict]) -> str:
    """The tiny model's chat template (``engines/tiny_model.CHAT_TEMPLATE``) with the generation prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages) + "<|assistant|>\n"


# the tiny model's tokenizer (engines/tiny_model.py builds its model directory with ``train_bpe``): here,
# below the engines, so that loading a workload does not import them
BUNDLED_VOCAB = 512                                 # = engines.tiny_model.TinyModelArgs.vocab (tested)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")           # ids 0, 1, 2 (LLaMA's)


def training_text() -> list[str]:
    """The bundled GSM8K test questions and answers (what the tokenizer learns its merges from)."""
    import json
    from importlib.resources import files

    out = []
    with files("hybrid_ray").joinpath("data", "gsm8k", "test.jsonl").open("r", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                out += [row["question"], row["answer"]]
    return out


def train_bpe(vocab: int):
    """A byte-level BPE (``tokenizers.Tokenizer``) of ``vocab`` ids trained on ``training_text()``, with
    LLaMA's special tokens and a BOS prefix; needs ``tokenizers`` (ImportError without it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", bos)])
    return tok


@functools.lru_cache(maxsize=1)
def bundled_tokenizer():
    """The tiny model's byte-level BPE (``train_bpe(BUNDLED_VOCAB)``), or None without ``tokenizers``."""
    try:
        return train_bpe(BUNDLED_VOCAB)
    except ImportError:
        return None


def prompt_counter(encoder) -> Counter:
    """A model directory's tokenizer (``prompts.PromptEncoder``) as a counter: its completion ids, or its
    chat template's ids for messages (as vLLM's server makes them)."""
    return lambda text: len(encoder.completion(text)) if isinstance(text, str) else len(encoder.chat(text))


def count_prompt_tokens(texts: Sequence[Any], tokenizer: Counter | None = None) -> list[int]:
    """Token counts (>= 1) of prompts (strings) or chats (lists of {role, content}): ``tokenizer`` (a
    callable text -> count), else the bundled tokenizer, else the character estimate."""
    if tokenizer is not None:
        return [max(1, int(tokenizer(t))) for t in texts]
    tok = bundled_tokenizer()
    if tok is None:
        return [estimate_tokens(t) for t in texts]
    plain = [t if isinstance(t, str) else _chat_text(t) for t in texts]
    return [max(1, len(e.ids)) for e in tok.encode_batch(plain)]
