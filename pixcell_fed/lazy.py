"""Lazy re-exports for package ``__init__`` files: importing a package stays cheap (no torch, no pandas)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) only when ``name`` is first used."""

    def __getattr__(name: str) -> Any:  # noqa: N807  # a module's __getattr__ (PEP 562)
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
