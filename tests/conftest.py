"""Fixtures shared by test modules."""
import pytest


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module (8 logical CPUs: emulated replicas only sleep)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA model directory (real BPE tokenizer, chat template, random weights), built once
    per test session offline (``hybrid_ray.engines.tiny_model``); skipped without the [engine] extra."""
    for mod in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(mod)
    from hybrid_ray.engines.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
