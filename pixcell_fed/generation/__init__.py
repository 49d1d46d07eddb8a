"""Synthesis with PixCell: the checkpoint-exact transformer, the local-folder loader and the guided sampler.

Importing this package is cheap; torch and diffusers are imported by the submodules that need them.
"""

from __future__ import annotations

from pixcell_fed.lazy import lazy_exports

_LAZY = {
    "PixCellTransformer2DModel": "pixcell_fed.generation.transformer",
    "load_pixcell": "pixcell_fed.generation.loader",
    "read_pixcell_variant": "pixcell_fed.generation.loader",
    "PixCellPipeline": "pixcell_fed.generation.sampler",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = list(_LAZY)
