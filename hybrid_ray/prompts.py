"""A model's own tokenizer applied to batch prompts the way vLLM's OpenAI server applies it.

A real run schedules by the prompt's true token count and hands the engine the very ids vLLM
would run: a completion prompt is ``tokenizer(prompt).input_ids`` (special tokens added, e.g.
LLaMA's ``<s>``); chat messages go through the model's chat template with the generation prompt,
then ``tokenizer(text, add_special_tokens=False)`` (the template already holds them). Token-id
prompts are used as given. Format-agnostic: ``openai_batch`` calls it per line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engines.model_dir import context_length


class PromptError(ValueError):
    """This prompt cannot be encoded (no chat template, a token id out of the vocabulary)."""


@dataclass(slots=True)
class PromptEncoder:
    tokenizer: Any                 # a transformers tokenizer
    context: int | None            # the model's context in tokens (None: unknown)
    name: str                      # the model directory

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def completion(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError(f"the model {self.name} has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_ids(self, ids: list[int]) -> list[int]:
        """Token ids given by the line: each must be in the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is out of the vocabulary (0..{self.vocab_size - 1})")
        return ids


def load_prompt_encoder(model: str | Path) -> PromptEncoder:
    """The encoder of a local model directory (checked first by ``engines.engine_spec``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    return PromptEncoder(tok, context_length(model), str(model))


__all__ = ["PromptEncoder", "PromptError", "load_prompt_encoder"]
