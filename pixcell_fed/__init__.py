"""pixcell-fed: federated, privacy-preserving synthesis of H&E tiles with PixCell.

Data flows one way: slide -> tile -> embedding -> synthetic tile -> audit -> bundle -> pool -> model -> site metrics.
Importing the package has no side effects; heavy libraries are imported by the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "PixCellTransformer2DModel": "pixcell_fed.generation.transformer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pixcell_fed' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
