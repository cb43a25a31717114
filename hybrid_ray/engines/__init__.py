"""Engines execute one iteration a policy chose and say how long it took; they never decide what runs."""
from .base import Engine, EngineResult
from .emulated import EmulatedEngine

__all__ = ["Engine", "EngineResult", "EmulatedEngine"]
