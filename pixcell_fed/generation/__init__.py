"""Synthesis with PixCell: the checkpoint-exact transformer, the local-folder loader and the guided sampler.

Importing this package is cheap; torch and diffusers are imported by the submodules that need them.
"""

from __future__ import annotations

_LAZY = {
    "PixCellTransformer2DModel": "pixcell_fed.generation.transformer",
    "load_pixcell": "pixcell_fed.generation.loader",
    "PixCellPipeline": "pixcell_fed.generation.sampler",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pixcell_fed.generation' has no attribute {name!r}")


__all__ = list(_LAZY)
