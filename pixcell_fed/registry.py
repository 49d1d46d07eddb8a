"""Registries by name (encoders, generators, audit tests, training recipes).

A registry refuses duplicate names and lists the valid names when asked for an unknown one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pixcell_fed.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories or objects of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            if name in self._items:
                raise RegistryError(
                    f"duplicate {self.kind} name {name!r}", hint="pick a name that is not registered yet"
                )
            self._items[name] = obj
            return obj

        return add(item) if item is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}",
                hint=f"valid {self.kind} names: {', '.join(sorted(self._items)) or '(none)'}",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
