"""A mixed-task text workload generator: five task kinds whose output lengths differ by task.

``lines(n, seed)`` makes ``n`` requests, all arriving at t = 0 (a batch), each one of five tasks:

================  =====  ==============================================================  ===================
task              share  prompt                                                          true output tokens
================  =====  ==============================================================  ===================
classification    25 %   a label question over 1-4 sentences                             1-8
summary           20 %   a summary instruction over an 8-60 sentence document            60-200 (longer docs longer)
story             15 %   a story request (topic, characters, sometimes a word count)     300-1000
translation       20 %   a translation instruction over a GSM8K question or 1-12         about the source's
                         sentences                                                       length x the language's ratio
math              20 %   a GSM8K question, with or without a step-by-step instruction    100-300 (from the reference
                                                                                         answer's length)
================  =====  ==============================================================  ===================

Prompts are realistic texts built from four templates per task (the instruction at the start, or
at the end), the bundled GSM8K questions (``data/gsm8k``) and random words drawn from their
vocabulary. Half the requests are chats (a system prompt, generic or task-specific, and a user
message), half completions; two models, one 20 % more verbose on open-ended tasks; ``max_tokens``
is the task's usual bound for half the requests and a generic 1024 for the others, and the true
length is capped by it. ``prompt_tokens`` is consistent with the text: the OpenAI batch adapter's
estimate, ``ceil(characters / 4)`` (a chat: ``4 + ceil(characters / 4)`` per message), the same on
every install. Seeded (``random.Random``, string seed): the same ``(n, seed)`` gives the same
requests everywhere; different seeds give independent draws (the history of 600 requests in the
docs uses seed 1, the workload seed 0).

The generator knows each request's task (``tasks(n, seed)``); the requests
(``workload.mixed_task_requests``, ``--workload mixed-tasks[:N[:SEED]]``) do not carry it: a length predictor sees only the prompt, its length, kind, model, system-prompt hash and
max_tokens (``workload.PromptInfo``). ``write_jsonl`` writes the workload file
(``hybrid-ray make-workload mixed-tasks``), which ``--workload FILE`` and ``--history FILE`` read.
"""
from __future__ import annotations

import functools
import json
from importlib.resources import files
import random
import re
from pathlib import Path

from .promptinfo import prompt_info
from .tokens import estimate_tokens

NAME = "mixed-tasks"
DEFAULT_N = 3000
TASKS: tuple[str, ...] = ("classification", "summary", "story", "translation", "math")
SHARES: tuple[float, ...] = (0.25, 0.20, 0.15, 0.20, 0.20)
MODELS: dict[str, float] = {"llama-2-7b-chat": 1.0, "mistral-7b-instruct": 1.2}   # verbosity (open-ended tasks)
TASK_MAX_TOKENS = {"classification": 16, "summary": 256, "story": 1024, "translation": 1024, "math": 512}
GENERIC_MAX_TOKENS = 1024
LANGUAGES = {"French": 1.25, "German": 1.15, "Spanish": 1.2, "Italian": 1.2, "Japanese": 0.9}
GENERIC_SYSTEM = "You are a helpful assistant."
TASK_SYSTEM = {
    "classification": "You are a precise text classifier. Reply with the label only.",
    "summary": "You are an expert editor who writes concise, faithful summaries.",
    "story": "You are a creative writer with a vivid imagination.",
    "translation": "You are a professional translator.",
    "math": "You are a careful math tutor who explains every step.",
}
TEMPLATES = {
    "classification": (
        "Classify the sentiment of the following review as positive, negative or neutral. Answer with one "
        "word.\n\nReview: {text}\nSentiment:",
        "Is the following message spam or not spam? Reply with a single label.\n\n{text}",
        "Which category fits this support ticket best: billing, technical, account or other? Answer with the "
        "category only.\n\nTicket: {text}",
        "{text}\n\nLabel the topic of the text above (sports, politics, business, science, entertainment).",
    ),
    "summary": (
        "Summarize the following article in a few sentences.\n\n{text}",
        "{text}\n\nTL;DR:",
        "Write a short summary (three to five sentences) of this text:\n{text}",
        "Give me the key points of the following report as one brief paragraph.\n\n{text}",
    ),
    "story": (
        "Write a short story about {a} and {b} who {c}.",
        "Tell me a bedtime story featuring {a}, set in {b}. Make it long and detailed, with dialogue.",
        "Write a creative fiction piece of about {words} words about {a} and {c}.",
        "Continue this story for several paragraphs: {text}",
    ),
    "translation": (
        "Translate the following text into {lang}:\n\n{text}",
        "Please translate to {lang}. Keep the meaning and the tone.\n{text}",
        "{text}\n\nTranslate the text above into {lang}.",
        "Render this passage in {lang}: {text}",
    ),
    "math": (
        "Solve the following problem step by step and give the final answer.\n\n{text}",
        "Question: {text}\nAnswer: Let's think step by step.",
        "{text}\nShow your reasoning, then write the final answer after '####'.",
        "{text}",
    ),
}


@functools.lru_cache(maxsize=1)
def _gsm8k() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(questions, reference-answer LLaMA token counts, vocabulary) of the bundled GSM8K test set."""
    questions, answers = [], []
    data = files("hybrid_ray").joinpath("data", "gsm8k")
    with data.joinpath("test.jsonl").open("r", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                questions.append(json.loads(line)["question"])
    with data.joinpath("test_llama_token_counts.csv").open("r", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            answers.append(int(line.split(",")[2]))
    words = sorted({w.lower() for q in questions for w in re.findall(r"[A-Za-z]{3,12}", q)})
    return tuple(questions), tuple(answers), tuple(words)


def _sentence(rng: random.Random, words: tuple[str, ...]) -> str:
    ws = [rng.choice(words) for _ in range(rng.randint(6, 18))]
    return ws[0].capitalize() + " " + " ".join(ws[1:]) + "."


def _sentences(rng: random.Random, words: tuple[str, ...], lo: int, hi: int) -> str:
    return " ".join(_sentence(rng, words) for _ in range(rng.randint(lo, hi)))


def _make(task: str, rng: random.Random) -> tuple[str, int, str | None]:
    """(user prompt text, true output tokens before the model's verbosity and the cap, how it scales)."""
    questions, answers, words = _gsm8k()
    template = rng.choice(TEMPLATES[task])
    if task == "classification":
        text = template.format(text=_sentences(rng, words, 1, 4))
        return text, rng.choice((1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8)), None
    if task == "summary":
        k = rng.randint(8, 60)
        doc = " ".join(_sentence(rng, words) for _ in range(k))
        out = 60 + 140 * (0.5 * rng.random() + 0.5 * (k - 8) / 52)
        return template.format(text=doc), round(out), "verbose"
    if task == "story":
        target = rng.choice((300, 400, 500, 600, 700))
        text = template.format(a=rng.choice(words), b=rng.choice(words), c=" ".join(rng.sample(words, 4)),
                               words=target, text=_sentence(rng, words))
        out = 1.35 * target if "{words}" in template else rng.uniform(300, 1000)
        return text, round(min(1000, max(300, out * rng.lognormvariate(0, 0.12)))), "verbose"
    if task == "translation":
        src = rng.choice(questions) if rng.random() < 0.5 else _sentences(rng, words, 1, 12)
        lang = rng.choice(sorted(LANGUAGES))
        out = estimate_tokens(src) * LANGUAGES[lang] * rng.lognormvariate(0, 0.1)
        return template.format(text=src, lang=lang), max(4, round(out)), None
    j = rng.randrange(len(questions))                                   # math
    out = min(300, max(100, 60 + 1.2 * answers[j] * rng.lognormvariate(0, 0.15)))
    return template.format(text=questions[j]), round(out), "verbose"


class Line:
    """One generated line: what the workload file holds (the full text) and its ``PromptInfo``."""

    __slots__ = ("id", "prompt_tokens", "output_tokens", "prompt", "model", "max_tokens", "info")

    def __init__(self, id, prompt_tokens, output_tokens, prompt, model, max_tokens, info):
        self.id, self.prompt_tokens, self.output_tokens = id, prompt_tokens, output_tokens
        self.prompt, self.model, self.max_tokens, self.info = prompt, model, max_tokens, info

    def to_dict(self) -> dict:
        d = {"id": self.id, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
             "max_tokens": self.max_tokens, "model": self.model}
        d["prompt" if isinstance(self.prompt, str) else "messages"] = self.prompt
        return d

    def to_batch_line(self) -> dict:
        """An OpenAI batch input line: the true length as ``body.output_tokens`` and the count as
        ``body.prompt_tokens`` (hybrid-ray's extensions for simulation studies, docs/openai_batch.md)."""
        chat = not isinstance(self.prompt, str)
        body = {"model": self.model, "messages" if chat else "prompt": self.prompt, "max_tokens": self.max_tokens,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens}
        return {"custom_id": self.id, "method": "POST", "url": "/v1/chat/completions" if chat else "/v1/completions",
                "body": body}


def _lines(n: int, seed: int, prefix: str) -> tuple[list[Line], list[str]]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    rng = random.Random(f"{NAME}:{seed}")
    models = sorted(MODELS)
    out, tasks = [], []
    for k in range(n):
        task = rng.choices(TASKS, weights=SHARES)[0]
        text, length, scales = _make(task, rng)
        model = rng.choice(models)
        if scales == "verbose":
            length = round(length * MODELS[model])
        max_tokens = TASK_MAX_TOKENS[task] if rng.random() < 0.5 else GENERIC_MAX_TOKENS
        length = max(1, min(length, max_tokens))
        if rng.random() < 0.5:                                          # a chat
            system = TASK_SYSTEM[task] if rng.random() < 0.5 else GENERIC_SYSTEM
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": text}]
            info = prompt_info(messages=prompt, model=model, max_tokens=max_tokens)
        else:
            prompt = text
            info = prompt_info(text=text, kind="completion", model=model, max_tokens=max_tokens)
        out.append(Line(f"{prefix}-{k}", estimate_tokens(prompt), length, prompt, model, max_tokens, info))
        tasks.append(task)
    return out, tasks


def lines(n: int = DEFAULT_N, seed: int = 0, prefix: str = NAME) -> list[Line]:
    """``n`` seeded mixed-task lines (ids ``<prefix>-<k>``); ``workload.mixed_task_requests`` makes them
    requests (all at t = 0)."""
    return _lines(n, seed, prefix)[0]


def tasks(n: int = DEFAULT_N, seed: int = 0) -> list[str]:
    """The task of each of ``lines(n, seed)`` (for studies: a predictor never sees it)."""
    return _lines(n, seed, NAME)[1]


def write_jsonl(path: str | Path, n: int = DEFAULT_N, seed: int = 0, fmt: str = "workload") -> Path:
    """Write the workload: ``fmt`` workload, one JSON line per request (id, prompt or messages,
    prompt_tokens, output_tokens, max_tokens, model), read by ``--workload FILE`` and ``--history FILE``;
    or batch, OpenAI batch input lines (``Line.to_batch_line``), read by ``-i FILE``."""
    if fmt not in ("workload", "batch"):
        raise ValueError(f"fmt must be workload or batch, got {fmt!r}")
    rows, _ = _lines(n, seed, NAME)
    p = Path(path)
    with p.open("w", encoding="utf-8") as fh:
        for x in rows:
            fh.write(json.dumps(x.to_dict() if fmt == "workload" else x.to_batch_line(), ensure_ascii=False) + "\n")
    return p


def parse_spec(spec: str) -> tuple[int, int] | None:
    """``mixed-tasks`` -> (3000, 0); ``mixed-tasks:N`` -> (N, 0); ``mixed-tasks:N:SEED``; else None."""
    if spec == NAME:
        return DEFAULT_N, 0
    m = re.fullmatch(rf"{NAME}:(\d+)(?::(-?\d+))?", spec)
    if m is None or int(m.group(1)) < 1:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


__all__ = ["NAME", "TASKS", "Line", "lines", "tasks", "write_jsonl", "parse_spec"]
