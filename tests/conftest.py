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
