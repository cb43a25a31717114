"""`hybrid-ray run`: run a workload on Ray actors (emulated or real engines), with ``simulate``'s metrics.

The public API: ``RunOptions`` in, ``RunResult`` out, ``run``. The work is in ``actors/``: the
driver (``actors/driver.py``), reaching Ray and checking its resources (``actors/session.py``),
and the replica, controller and planner actors. Ray is imported only there, inside functions,
so ``import hybrid_ray`` and ``hybrid-ray simulate`` never load it.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .actors.session import Terminated, connect_ray, sigterm_interrupts
from .config import ClusterSpec
from .engines.factory import engine_spec
from .errors import ControllerLostError, ReplicasLostError, RuntimeSetupError
from .inputs import load_inputs
from .results import PLAIN
from .runspec import RunOptions, RunResult, engine_label
from .workload import Request

if TYPE_CHECKING:
    from .actors.driver import Driver

__all__ = ["RunOptions", "RunResult", "run", "prepare", "resolve_engine", "engine_label", "connect_ray",
           "RuntimeSetupError", "ReplicasLostError", "ControllerLostError", "Terminated"]


def resolve_engine(opts: RunOptions, cluster: ClusterSpec) -> RunOptions:
    """``--engine`` wins, else the config's ``engine:``, else emulated; model and device fall back to the
    config's when it names the same engine kind."""
    ce = cluster.engine
    kind = opts.engine or (ce.kind if ce is not None else "emulated")
    same = ce is not None and ce.kind == kind
    return replace(opts, engine=kind,
                   model=opts.model if opts.model is not None else (ce.model if same else None),
                   device=opts.device if opts.device is not None else (ce.device if same else "cpu"))


def _model_counter(model: str | None):
    """A ``--model`` directory's tokenizer as a token counter (workload lines with text but no
    prompt_tokens are counted by it); None (the bundled tokenizer) for a preset or no model."""
    if not model or not Path(model).is_dir():
        return None
    from .prompts import load_prompt_encoder
    from .tokens import prompt_counter
    try:
        return prompt_counter(load_prompt_encoder(model))
    except Exception:                  # not loadable here: engine_spec reports the directory's problem
        return None


def prepare(opts: RunOptions, cluster: ClusterSpec | None = None, requests: list[Request] | None = None
            ) -> tuple[RunOptions, ClusterSpec, list[Request], int]:
    """Inputs for a run: (options with the engine and output resolved, cluster with time_scale applied,
    requests still to run, requests skipped)."""
    if cluster is None or requests is None:
        cluster, requests = load_inputs(opts.config, opts.workload, opts.limit, opts.seed,
                                        tokenizer=_model_counter(opts.model))
    opts = resolve_engine(opts, cluster)
    if opts.time_scale is not None:
        if not opts.time_scale > 0:
            raise RuntimeSetupError(f"--time-scale must be > 0, got {opts.time_scale}")
        cluster = replace(cluster, time_scale=float(opts.time_scale))
    if engine_spec(opts.engine, opts.model, opts.device) is not None:   # checks the extra and the model
        cluster = replace(cluster, time_scale=1.0)   # a real engine's iterations take real time
    ids = [q.id for q in requests]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise RuntimeSetupError(f"request ids must be unique (the runtime tracks requests by id); repeated: {dup}")
    output = opts.output
    skipped = 0
    if opts.resume:
        if output and Path(output).resolve() != Path(opts.resume).resolve():
            raise RuntimeSetupError(f"--resume {opts.resume} appends to that file; drop --output {output} "
                                    f"or make it the same file")
        if not Path(opts.resume).exists():
            raise RuntimeSetupError(f"--resume {opts.resume}: no such results file (a new run writes one with "
                                    f"--output {opts.resume})")
        done = (opts.output_format or PLAIN).read(opts.resume).ids
        output = opts.resume
        before = len(requests)
        requests = [q for q in requests if q.id not in done]
        skipped = before - len(requests)
    elif output and Path(output).exists() and Path(output).stat().st_size > 0:
        raise RuntimeSetupError(f"--output {output} already exists; pass --resume {output} to continue that run, "
                                f"or choose another file")
    return replace(opts, output=output), cluster, requests, skipped


def prepare_batch(opts: RunOptions, cluster: ClusterSpec | None = None, requests: list[Request] | None = None
                  ) -> tuple[RunOptions, ClusterSpec | None, list[Request] | None]:
    """An OpenAI batch workload (``openai_batch``, the format adapter): parse it (with the model's own
    tokenizer when a real engine runs a model directory), write its error lines, and set the output
    format and the resume file. Other workloads pass through unchanged."""
    from . import openai_batch

    if requests is not None or not openai_batch.is_batch_workload(opts.workload):
        return opts, cluster, requests
    if cluster is None:
        from .config import load_cluster
        cluster = load_cluster(opts.config)
    opts = resolve_engine(opts, cluster)
    encoder = None
    if engine_spec(opts.engine, opts.model, opts.device) is not None and opts.model \
            and Path(opts.model).is_dir():               # checked: a bad model directory fails here
        from .prompts import load_prompt_encoder
        encoder = load_prompt_encoder(opts.model)
    return openai_batch.prepare_batch_run(opts, cluster, encoder=encoder)


def run(opts: RunOptions, hook: Callable[[Driver], None] | None = None, *, cluster: ClusterSpec | None = None,
        requests: list[Request] | None = None, scheduler=None) -> RunResult:
    """Run a workload on Ray (emulated or real engines) and return the same metrics as ``simulate``.

    ``cluster``/``requests`` replace ``opts.config``/``opts.workload``; ``scheduler`` replaces the
    named policy (the router, controller and policy objects must be picklable by cloudpickle).
    When the run ends, the output format finalizes the file (an OpenAI batch output: input order).
    SIGTERM (main thread) raises ``Terminated``, a ``KeyboardInterrupt``: the run unwinds as on Ctrl-C.
    """
    with sigterm_interrupts():
        return _run(opts, hook, cluster=cluster, requests=requests, scheduler=scheduler)


def _run(opts: RunOptions, hook: Callable[[Driver], None] | None, *, cluster: ClusterSpec | None,
         requests: list[Request] | None, scheduler) -> RunResult:
    t0 = time.perf_counter()
    opts, cluster, requests = prepare_batch(opts, cluster, requests)   # an OpenAI batch: -o is the resume file
    opts, cluster, todo, skipped = prepare(opts, cluster, requests)
    fmt = opts.output_format or PLAIN
    if not todo:
        fmt.finish(opts.output)
        return RunResult(None, None, time.perf_counter() - t0, 0.0, cluster.time_scale, skipped=skipped,
                         output=opts.output, engine=engine_label(opts))
    from .actors.driver import Driver

    result = Driver(opts, cluster, todo, scheduler=scheduler, hook=hook, skipped=skipped).run()
    fmt.finish(opts.output)
    return result
