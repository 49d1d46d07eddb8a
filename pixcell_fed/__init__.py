"""pixcell-fed: federated, privacy-preserving synthesis of H&E tiles with PixCell.

Data flows one way: slide -> tile -> embedding -> synthetic tile -> audit -> bundle -> pool -> model -> site metrics.
Importing the package has no side effects; heavy libraries are imported by the functions that need them.
"""

from __future__ import annotations

from pixcell_fed.lazy import lazy_exports

__version__ = "0.2.0"

_LAZY = {
    "PixCellTransformer2DModel": "pixcell_fed.generation.transformer",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["__version__", *_LAZY]  # noqa: PLE0604  # _LAZY's keys are the lazily exported names
