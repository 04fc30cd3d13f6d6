"""A small name -> factory registry, shared by architectures, datasets and method presets.

Modelled on torchvision's ``models/_api.py``: duplicate names are refused, unknown names raise
an error that lists the valid ones (so the CLI can show it as a one-line message).
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, item: T | None = None):
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            return obj

        return add(item) if item is not None else add

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        return [(k, self._items[k]) for k in self.names()]


Factory = Callable[..., object]
