"""Adapters for other libraries (optional dependencies, imported on demand).

``flashops.integrations.transformers`` works after a plain ``import flashops``: the adapters load on first
access, and each imports its library only when called.
"""

import importlib

_ADAPTERS = ("transformers",)


def __getattr__(name: str):
    if name in _ADAPTERS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
