"""Engines execute one iteration a policy chose and say how long it took; they never decide what runs.

``factory`` builds one by name; ``base`` is the protocol, ``emulated``, ``transformers`` and
``vllm`` the engines. This package imports none of them (a submodule's import runs it first).
"""
