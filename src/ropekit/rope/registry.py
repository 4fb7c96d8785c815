"""``Registry``: one shape for every kind of named thing ropekit selects by a string.

Rope types (``ropekit.rope.ROPE_TYPES``) and attention variants
(``ropekit.attention.ATTENTION_VARIANTS``) are both registries of entries that carry a
``name``, a typed ``params`` class (with ``parse(raw, context)``) and a ``source`` citation.
Names are always given explicitly; a name that is neither registered nor an alias raises a
``ValueError`` that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    """What every registry entry has."""

    name: str
    source: str


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries by canonical name, plus aliases that resolve to them."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, E] = {}
        self._aliases: dict[str, str] = {}

    def register(self, entry: E, aliases: tuple[str, ...] = ()) -> E:
        """Add ``entry`` under ``entry.name`` (and its aliases); returns the entry."""
        self._entries[entry.name] = entry
        for alias in aliases:
            self._aliases[alias] = entry.name
        return entry

    def resolve(self, name: object) -> str:
        """The canonical name for ``name`` (an alias or a name); ValueError listing the known ones."""
        if not isinstance(name, str):
            raise ValueError(f"{self.kind} must be named by a string, got {name!r}")
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.known())}")
        return key

    def known(self) -> list[str]:
        """Every accepted name, canonical names first."""
        return sorted(self._entries) + sorted(self._aliases)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __getitem__(self, name: str) -> E:
        return self._entries[self.resolve(name)]

    def get(self, name: str, default: E | None = None) -> E | None:
        key = self._aliases.get(name, name)
        return self._entries.get(key, default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def keys(self):
        return self._entries.keys()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
