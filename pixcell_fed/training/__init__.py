"""Training recipes for the pooled synthetic set, by name: ``classifier`` and ``ssl``.

Every recipe has one protocol, ``run(pool_dir, out_dir, config) -> TrainResult``, and its registry entry carries
its config class, so a caller builds the config and runs the recipe without knowing which one it is.
``get_recipe(name)`` returns the :class:`Recipe`; the registry lists valid names in its error. Heavy libraries
(torch, timm, lightly) are imported by the recipe modules, not here.

The DP fine-tune on the sites' real tiles is not a pool recipe: its pure training parts (local DP-SGD, the
compatibility check, FedAvg) are :mod:`pixcell_fed.training.dp`; its rounds belong to the federation
(:mod:`pixcell_fed.federation.dp_rounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    from pixcell_fed.training.models import ModelSpec


@dataclass(frozen=True)
class TrainResult:
    """What a recipe produced: the checkpoint folder, the model's spec and the training curve."""

    checkpoint: Path
    spec: ModelSpec
    history: list[dict]


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``run(pool_dir, out_dir, config) -> TrainResult`` and the frozen config class it takes."""

    name: str
    run: Callable[[Any, Any, Any], TrainResult]
    config_class: type

    def __call__(self, pool_dir: str | Path, out_dir: str | Path, config: Any) -> TrainResult:
        if not isinstance(config, self.config_class):
            raise TypeError(f"recipe {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}")
        return self.run(pool_dir, out_dir, config)


RECIPES: Registry[Recipe] = Registry("training recipe")

_RECIPE_MODULES = ("pixcell_fed.training.classifier", "pixcell_fed.training.ssl")


def register_recipe(name: str, config_class: type) -> Callable:
    """Decorator: register ``run(pool_dir, out_dir, config)`` as recipe ``name`` taking ``config_class``."""

    def add(run: Callable) -> Callable:
        RECIPES.register(name, Recipe(name=name, run=run, config_class=config_class))
        return run

    return add


def _load_recipes() -> None:
    import importlib

    for module in _RECIPE_MODULES:
        importlib.import_module(module)


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (imports the recipe modules on first use)."""
    _load_recipes()
    return RECIPES.get(name)


def recipe_names() -> list[str]:
    _load_recipes()
    return RECIPES.names()
