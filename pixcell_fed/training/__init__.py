"""Training recipes for the pooled synthetic set, by name: ``classifier``, ``ssl`` and ``dp_finetune``.

``get_recipe(name)`` returns the recipe's entry point; the registry lists valid names in its error. Heavy
libraries (torch, timm, opacus, lightly) are imported by the recipe modules, not here.
"""

from __future__ import annotations

from typing import Any

from pixcell_fed.registry import Registry

RECIPES: Registry[Any] = Registry("training recipe")

_RECIPE_MODULES = ("pixcell_fed.training.classifier", "pixcell_fed.training.ssl", "pixcell_fed.training.dp_finetune")


def get_recipe(name: str) -> Any:
    """The registered recipe ``name`` (imports the recipe modules on first use)."""
    import importlib

    for module in _RECIPE_MODULES:
        importlib.import_module(module)
    return RECIPES.get(name)


def recipe_names() -> list[str]:
    import importlib

    for module in _RECIPE_MODULES:
        importlib.import_module(module)
    return RECIPES.names()
