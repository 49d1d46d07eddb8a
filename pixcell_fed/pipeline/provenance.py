"""What is saved beside every output: package and library versions, the resolved config, model identities."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from pixcell_fed import __version__

_LIBRARIES = (
    "torch",
    "diffusers",
    "timm",
    "flwr",
    "opacus",
    "openslide-python",
    "openslide-bin",
    "cryptography",
    "numpy",
    "pandas",
)


def versions() -> dict[str, Any]:
    """pixcell-fed's version, Python's, and the installed versions of the libraries results depend on."""
    found: dict[str, Any] = {"pixcell-fed": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
