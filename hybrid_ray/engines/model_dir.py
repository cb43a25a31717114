"""Checks on a local model directory, made on the driver before any replica starts.

A real engine loads its model inside a replica actor; a directory that is missing, has no
tokenizer, or names an architecture transformers does not know would only fail there, after Ray
and the other actors started. These checks read files only (no torch import): ``dir(transformers)``
lists the model classes without importing them.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import HybridRayError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelDirError(HybridRayError):
    """A model directory cannot serve the real path; the message names it and what is missing."""


def read_config(path: str | Path) -> dict:
    """The directory's config.json as a dict (ModelDirError if absent or not a JSON object)."""
    p = Path(path)
    cfg = p / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"--model {p}: no config.json in the model directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelDirError(f"--model {p}: config.json cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"--model {p}: config.json must hold a JSON object")
    return data


def check_model_dir(path: str | Path, engine: str = "transformers") -> None:
    """Raise ModelDirError unless ``path`` is a directory with a config.json, a tokenizer
    (tokenizer.json or tokenizer_config.json) and an architecture transformers can load."""
    p = Path(path)
    if not p.exists():
        raise ModelDirError(f"--model {p}: no such model directory")
    if not p.is_dir():
        raise ModelDirError(f"--model {p}: not a directory (a model directory holds config.json, the weights "
                            f"and the tokenizer)")
    cfg = read_config(p)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelDirError(f"--model {p}: no tokenizer in the model directory (neither "
                            f"{' nor '.join(TOKENIZER_FILES)}); the {engine} engine tokenizes the batch's "
                            f"prompts with the model's own tokenizer")
    archs = cfg.get("architectures")
    if archs is None:
        return                      # transformers then goes by model_type; let the loader decide
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ModelDirError(f"--model {p}: config.json 'architectures' must be a non-empty list of class names")
    try:
        import transformers
    except ImportError:
        return                      # engine_spec reports the missing extra
    known = set(dir(transformers))
    unknown = [a for a in archs if a not in known]
    if unknown:
        raise ModelDirError(f"--model {p}: architecture {', '.join(unknown)} (config.json 'architectures') is "
                            f"unknown to transformers {transformers.__version__}; the {engine} engine cannot load it")


def context_length(path: str | Path) -> int | None:
    """The model's context in tokens: the smaller of config.json's ``max_position_embeddings`` and
    the tokenizer's ``model_max_length`` (when given and sane); None if neither is known."""
    p = Path(path)
    limits = []
    try:
        cfg = read_config(p)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                limits.append(v)
                break
    except ModelDirError:
        pass
    try:
        tc = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        v = tc.get("model_max_length") if isinstance(tc, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**9:   # HF's "no limit" is 1e30
            limits.append(v)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None
